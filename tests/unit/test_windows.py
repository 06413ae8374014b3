"""Training crops, rescaling, colour standardisation, sliding windows and full-image inference at any image
size."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from envs.metrics import reference_topology, segmentation_metrics
from envs.synthetic import generate_fundus
from envs.types import VesselSample
from envs.windows import (
    Box,
    crop_box,
    crop_sample,
    jitter_sample,
    rescale_probs,
    rescale_sample,
    standardize_sample,
    stitch,
    window_boxes,
)
from policies.evaluation import Inference, predict_probs
from raysys.config_io import load_config, replace
from raysys.data import TrainView, dataset_for_split


def _sample(h: int = 150, w: int = 131) -> VesselSample:
    s = generate_fundus(3, max(h, w))
    return crop_sample(s, Box(0, 0, h, w))


def test_crop_box_holds_enough_fov_and_is_seeded() -> None:
    fov = np.zeros((300, 300), bool)
    fov[100:300, 100:300] = True
    boxes = [crop_box(fov, 100, np.random.default_rng(i), min_fov=0.9) for i in range(20)]
    assert all(fov[b.slices].mean() >= 0.9 and (b.h, b.w) == (100, 100) for b in boxes)
    again = crop_box(fov, 100, np.random.default_rng(7), min_fov=0.9)
    assert again == boxes[7]
    # No position satisfies the bar: the draw with the most FOV comes back instead of an error.
    corner = np.zeros((300, 300), bool)
    corner[:120, :120] = True
    fracs = [
        corner[crop_box(corner, 100, np.random.default_rng(1), min_fov=1.1, tries=k).slices].mean()
        for k in (1, 4, 16, 64)
    ]
    assert fracs == sorted(fracs) and fracs[-1] > fracs[0]


def test_crop_sample_pads_small_images_to_the_crop() -> None:
    s = _sample(50, 70)
    c = crop_sample(s, Box(0, 0, 50, 64), size=64)
    assert c.image.shape == (64, 64, 3) and c.mask.shape == (64, 64)
    assert not c.fov[50:].any() and not c.mask[50:].any() and (c.image[50:] == 0).all()
    assert np.array_equal(c.mask[:50], s.mask[:, :64]) and c.id == f"{s.id}@0,0"


def test_window_boxes_cover_every_pixel_with_the_overlap() -> None:
    boxes = window_boxes(584, 565, 256, overlap=0.25)
    cover = np.zeros((584, 565), int)
    for b in boxes:
        cover[b.slices] += 1
        assert (b.h, b.w) == (256, 256)
    assert cover.min() >= 1
    ys = sorted({b.y0 for b in boxes})
    assert all(b - a <= 256 - 64 for a, b in itertools.pairwise(ys))  # >= 25% shared
    assert window_boxes(100, 80, 256) == [Box(0, 0, 100, 80)]  # smaller than a window: one window
    fov = np.zeros((584, 565), bool)
    fov[:100, :100] = True
    assert all(fov[b.slices].any() for b in window_boxes(584, 565, 128, fov=fov))
    with pytest.raises(ValueError, match="overlap"):
        window_boxes(10, 10, 4, overlap=1.0)


def test_stitching_a_constant_gives_the_constant_everywhere() -> None:
    boxes = window_boxes(97, 203, 64, overlap=0.5)
    out = stitch([np.full((b.h, b.w), 0.3, np.float32) for b in boxes], boxes, 97, 203)
    np.testing.assert_allclose(out, 0.3, rtol=1e-5)


def test_rescale_keeps_shapes_and_maps_probabilities_back() -> None:
    s = _sample(150, 131)
    half = rescale_sample(s, 0.5)
    assert half.image.shape == (75, 66, 3) and half.mask.shape == (75, 66) and half.fov.shape == (75, 66)
    # No vessel vanishes (a 1-px one stays 1 px on the coarse grid, so its share at most doubles) and the
    # tree does not fall apart into more components.
    assert 0.8 * s.mask.mean() < half.mask.mean() < 2.0 * s.mask.mean()
    from skimage.measure import label

    assert label(half.mask, connectivity=2).max() <= label(s.mask, connectivity=2).max()
    line = np.zeros((40, 40), bool)
    line[:, 7] = True  # a 1-px capillary
    thin = rescale_sample(
        dataclasses.replace(s, image=s.image[:40, :40], mask=line, fov=s.fov[:40, :40]), 0.5
    )
    assert thin.mask[:, 3].all() and thin.mask.sum() == 20
    assert rescale_sample(s, 1.0) is s
    assert rescale_probs(np.ones((75, 66), np.float32), 150, 131).shape == (150, 131)


def _pixelwise(images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """A 'model' whose logit depends on each pixel alone: windows must reproduce it exactly."""
    return torch.from_numpy(images[..., 1].astype(np.float32) / 32.0 - 4.0)


@pytest.mark.parametrize("window", [None, 48, 64])
def test_windowed_inference_equals_whole_image_for_a_pixelwise_model(window) -> None:
    samples = [_sample(150, 131), _sample(99, 77)]
    whole = predict_probs(_pixelwise, samples)
    windowed = predict_probs(_pixelwise, samples, Inference(window=window, overlap=0.25, batch_size=3))
    for s, a, b in zip(samples, whole, windowed, strict=True):
        assert b.shape == s.mask.shape
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert (b[~s.fov] == 0).all()


def test_keyed_inference_passes_stable_window_keys() -> None:
    seen: list[tuple] = []

    def fn(images, prompts, keys):
        seen.extend(keys)
        return _pixelwise(images, prompts)

    samples = [_sample(150, 131)]
    predict_probs(fn, samples, Inference(window=64), keyed=True)
    first = list(seen)
    predict_probs(fn, samples, Inference(window=64), keyed=True)
    assert seen[len(first) :] == first and len(set(first)) == len(first)


def test_scaled_inference_reports_at_native_resolution() -> None:
    s = _sample(150, 131)
    probs = predict_probs(_pixelwise, [s], Inference(scale=0.5))[0]
    assert probs.shape == (150, 131)
    whole = predict_probs(_pixelwise, [s])[0]
    inside = s.fov & np.roll(s.fov, 2, 0) & np.roll(s.fov, -2, 1)
    assert np.abs(probs - whole)[inside].mean() < 0.05


def test_train_view_crops_agree_across_views_and_change_per_iteration() -> None:
    cfg = load_config(None, ["data.kind=drive", "data.root=x", "data.crop=64", "run.seed=3"])
    samples = [_sample(150, 131), _sample(120, 140)]
    a, b = TrainView(cfg.data, samples, crop=64, seed=3), TrainView(cfg.data, samples, crop=64, seed=3)
    key_a, crop_a = a.get(1, 5)
    key_b, crop_b = b.get(1, 5)
    assert key_a == key_b and np.array_equal(crop_a.image, crop_b.image)
    assert crop_a.image.shape == (64, 64, 3) and crop_a.fov.mean() >= 0.5
    assert len({a.get(1, it)[0] for it in range(10)}) > 1
    scaled = TrainView(replace(cfg, ["data.scale=0.5"]).data, samples, crop=32 * 2, seed=3)
    assert scaled[0].mask.shape == (75, 66) and scaled.get(0, 1)[1].mask.shape == (64, 64)
    whole = TrainView(cfg.data, samples, crop=None, seed=3)
    assert whole.get(0, 5) == ((0,), samples[0]) and not whole.cropped
    folder = ["data.kind=drive", "data.root=x"]
    assert load_config(None, folder).train_crop == 128
    assert load_config(None, [*folder, "data.crop=0"]).train_crop is None
    assert load_config(None, []).train_crop is None  # synthetic: whole images
    sa2va = [*folder, "policy.kind=sa2va", "policy.checkpoint=x", "policy.trust_remote_code=true"]
    assert load_config(None, sa2va).train_crop is None  # Sa2VA sees whole images, as it was trained


def test_jittered_train_view_is_seeded_changes_pixels_only_inside_the_fov_and_keeps_labels() -> None:
    cfg = load_config(None, ["data.kind=drive", "data.root=x", "rollout.jitter=0.4", "run.seed=3"])
    samples = [_sample(150, 131), _sample(120, 140)]
    a, b = (TrainView(cfg.data, samples, crop=64, seed=3, jitter=0.4) for _ in range(2))
    plain = TrainView(cfg.data, samples, crop=64, seed=3)
    (key_a, jit), (key_b, again), (key_p, orig) = a.get(1, 5), b.get(1, 5), plain.get(1, 5)
    assert key_a == key_b and np.array_equal(jit.image, again.image)
    assert key_a != key_p and key_a[: len(key_p)] == key_p  # same crop, its own feature-cache entry
    assert jit.id == orig.id and np.array_equal(jit.mask, orig.mask) and np.array_equal(jit.fov, orig.fov)
    assert not np.array_equal(jit.image, orig.image)
    assert np.array_equal(jit.image[~jit.fov], orig.image[~orig.fov])  # outside the FOV: untouched
    assert a.varies and not TrainView(cfg.data, samples, crop=None, seed=3).varies
    images = [a.get(1, it)[1].image for it in range(6)]
    assert len({im.tobytes() for im in images}) == 6  # a new draw every iteration
    whole = TrainView(cfg.data, samples, crop=None, seed=3, jitter=0.4)
    stds = [whole.get(0, it)[1].image[..., 1][samples[0].fov].std() for it in range(20)]
    assert max(stds) / min(stds) > 1.5  # the green channel's contrast inside the FOV really varies
    assert np.array_equal(jitter_sample(samples[0], np.random.default_rng(0), 0.0).image, samples[0].image)
    with pytest.raises(ValueError, match=r"rollout\.jitter"):
        load_config(None, ["rollout.jitter=-0.1"])


@pytest.mark.parametrize("size", [(67, 93), (130, 128), (101, 101)])
def test_tiny_policy_returns_logits_at_any_image_size(size) -> None:
    from policies.tiny import TinySa2VA

    torch.manual_seed(0)
    model = TinySa2VA().eval()
    h, w = size
    images = np.random.default_rng(0).integers(0, 255, (2, h, w, 3), dtype=np.uint8)
    with torch.no_grad():
        logits = model(images, ["vessels", "vessels"])
        feats = model.encode(images)
        again = model(images, ["vessels", "vessels"], features=feats)
    assert logits.shape == (2, h, w) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, again)
    # The same as padding by hand (edge pixels repeated at the bottom and right) and cropping back.
    ph, pw = -h % 4, -w % 4
    padded = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    with torch.no_grad():
        by_hand = model(padded, ["vessels", "vessels"])[:, :h, :w]
    torch.testing.assert_close(logits, by_hand)


def test_images_without_vessels_are_reported_apart_not_averaged(caplog) -> None:
    from policies.evaluation import evaluate_probs

    s = _sample(64, 64)
    empty = dataclasses.replace(s, id="empty", mask=np.zeros_like(s.mask))
    probs = [np.where(s.mask, 0.9, 0.1).astype(np.float32), np.zeros(s.mask.shape, np.float32)]
    res = evaluate_probs(probs, [s, empty])
    assert res.n_without_vessels == 1 and [r["has_vessels"] for r in res.per_image] == [True, False]
    assert res.mean["dice"] == pytest.approx(res.per_image[0]["dice"])  # not averaged with the empty 1.0
    assert "no vessel pixel" in caplog.text and "empty" in caplog.text
    with pytest.raises(ValueError, match="none of the 1 labelled images has a vessel pixel"):
        evaluate_probs(probs[1:], [empty])


def test_each_samples_ground_truth_topology_is_computed_once_across_evaluations(monkeypatch) -> None:
    import policies.evaluation as ev

    calls = []
    monkeypatch.setattr(ev, "reference_topology", lambda m, f: calls.append(1) or reference_topology(m, f))
    s = _sample(64, 64)
    probs = [np.where(s.mask, 0.9, 0.1).astype(np.float32)]
    at_half, at_high = ev.evaluate_probs(probs, [s]), ev.evaluate_probs(probs, [s], threshold=0.95)
    assert len(calls) == 1  # a second threshold (or validation) on the same sample reuses it
    assert at_half.per_image[0] == {
        "id": s.id,
        "has_vessels": True,
        **segmentation_metrics(probs[0] >= 0.5, s.mask, s.fov),
    }
    assert at_high.per_image[0]["dice"] == 0.0
    ev.evaluate_probs(probs, [dataclasses.replace(s)])  # another sample object: computed for it
    assert len(calls) == 2


def test_standardize_maps_two_sites_exposures_to_the_same_image() -> None:
    s = _sample()
    # The same eye under another camera: darker, less contrast, another colour balance, a shifted FOV edge.
    x = s.image.astype(np.float32) * np.float32([0.6, 0.8, 1.3]) + np.float32([10, -5, 4])
    other = dataclasses.replace(s, image=np.clip(x, 0, 255).astype(np.uint8))
    a, b = standardize_sample(s), standardize_sample(other)
    (mean, std) = np.float32([190, 85, 25]), np.float32([40, 28, 12])
    for out in (a, b):
        inside = out.image[out.fov].astype(np.float32)
        # Clipping at 0..255 moves a little of the mass: near, not exactly, the reference.
        np.testing.assert_allclose(inside.mean(0), mean, atol=3.0)
        np.testing.assert_allclose(inside.std(0), std, rtol=0.12)
        assert out.image.dtype == np.uint8 and out.image.shape == s.image.shape
        np.testing.assert_array_equal(out.mask, s.mask)
        np.testing.assert_array_equal(out.fov, s.fov)
    raw = np.abs(s.image[s.fov].astype(int) - other.image[s.fov].astype(int)).mean()
    assert np.abs(a.image[s.fov].astype(int) - b.image[s.fov].astype(int)).mean() < raw / 5


def test_standardize_leaves_a_flat_channel_flat_and_finite() -> None:
    s = _sample(64, 64)
    flat = s.image.copy()
    flat[..., 2] = 7
    out = standardize_sample(dataclasses.replace(s, image=flat))
    assert np.unique(out.image[..., 2][s.fov]).tolist() == [25]


def test_data_standardize_applies_to_every_split_it_loads() -> None:
    from envs.datasets import load_dataset

    base = ["data.size=64", "data.n_train=2", "data.n_val=1", "data.n_test=1", "data.prompt=vessels please"]
    plain, std = (load_config(None, [*base, f"data.standardize={v}"]).data for v in ("false", "true"))
    for split in ("train", "val", "test"):
        for p, q in zip(
            dataset_for_split(plain, split, load=load_dataset),
            dataset_for_split(std, split, load=load_dataset),
            strict=True,
        ):
            np.testing.assert_array_equal(q.image, standardize_sample(p).image)
            assert q.prompts == p.prompts == ("vessels please",)
            np.testing.assert_array_equal(q.mask, p.mask)
