"""GT reward: hand-worked numbers, bounds on any input, empty conventions, config validation, tiles."""

from __future__ import annotations

import dataclasses
import typing

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk
from skimage.measure import label as sk_label
from skimage.morphology import skeletonize

from envs.rewards import (
    TERMS,
    MultiObjectiveReward,
    RewardConfig,
    RewardResult,
    RewardWeights,
    TiledRewards,
    _check_finite,
)

pytestmark = pytest.mark.unit

ALL_TERMS = RewardWeights(dice=0.5, recall=0.2, topology=0.2, length=0.1, cldice=0.3, betti=0.1)


# --------------------------------------------------------------------------------------------- shapes


def hline(length: int, *, shape: tuple[int, int] = (9, 120), row: int = 4, start: int = 5) -> np.ndarray:
    """A 1-px horizontal line (its own skeleton, no junction, one component)."""
    m = np.zeros(shape, dtype=bool)
    m[row, start : start + length] = True
    return m


def t_shape(size: int = 30) -> np.ndarray:
    """A 1-px 'T' (43 px): bar row 5 cols 3-26, stem col 15 rows 5-24; one junction."""
    m = np.zeros((size, size), dtype=bool)
    m[5, 3:27] = True
    m[5:25, 15] = True
    return m


def degenerate_and_random_masks(seed: int, shape: tuple[int, int] = (40, 40)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = [
        np.zeros(shape, dtype=bool),
        np.ones(shape, dtype=bool),
        np.indices(shape).sum(axis=0) % 2 == 0,  # checkerboard: all diagonal links, many holes
    ]
    single = np.zeros(shape, dtype=bool)
    single[rng.integers(0, shape[0]), rng.integers(0, shape[1])] = True
    out.append(single)
    for sigma in (0.0, 1.0, 2.5):
        noise = rng.random(shape)
        if sigma:
            noise = ndi.gaussian_filter(noise, sigma)
        out.append(noise > np.quantile(noise, rng.uniform(0.3, 0.95)))
    return out


# ------------------------------------------------------------------------------------ hand-worked


def test_perfect_prediction_scores_six() -> None:
    # Thick T vs itself: dice 1 -> 10; recall 1 >= 0.85 -> 0; jp = jg = 1 and equal component counts
    # -> topology 1 x 5 = 5; length ratio 1 -> 0. Total = 0.5*10 + 0.2*0 + 0.2*5 + 0.1*0 = 6.0.
    gt = ndi.binary_dilation(t_shape(), iterations=1)
    r = MultiObjectiveReward()(gt, gt)
    assert isinstance(r, RewardResult) and r.source == "gt"
    assert (r.components["dice"], r.components["recall"], r.components["topology"]) == (10.0, 0.0, 5.0)
    assert r.components["length"] == 0.0
    assert r.total == pytest.approx(6.0)
    assert r.total == pytest.approx(MultiObjectiveReward().bounds()[1])  # the best possible total


def test_empty_prediction_and_gt_is_perfect() -> None:
    empty = np.zeros((16, 16), dtype=bool)
    r = MultiObjectiveReward(RewardConfig(weights=ALL_TERMS))(empty, empty)
    # dice 10, recall 0, topology 5, length 0, cldice 1 x 10, betti 0:
    # 0.5*10 + 0.2*5 + 0.3*10 = 9.0 (the maximum of this weighting).
    assert r.total == pytest.approx(9.0)
    assert r.components["cldice"] == 10.0 and r.components["betti"] == 0.0


def test_recall_below_and_above_target() -> None:
    reward = MultiObjectiveReward()
    gt = hline(100)
    # 80 of 100 GT pixels, no false positive: TP 80, FP 0, FN 20.
    #   dice = 160/180 -> 80/9 = 8.889; recall 0.8 < 0.85 -> (0.8 - 0.85) x 20 = -1.0;
    #   no junctions, one component each -> topology 5; length 80/100 -> -0.2 x 5 = -1.0.
    #   total = 0.5 x 80/9 + 0.2 x (-1) + 0.2 x 5 + 0.1 x (-1) = 5.1444
    r = reward(hline(80), gt)
    assert r.components["recall"] == pytest.approx(-1.0)
    assert r.components["length"] == pytest.approx(-1.0)
    assert r.total == pytest.approx(0.5 * 80 / 9 - 0.2 + 1.0 - 0.1)
    # 90 of 100: recall 0.9 >= 0.85 -> 0; dice 180/190; length -0.1 x 5 = -0.5.
    r = reward(hline(90), gt)
    assert r.components["recall"] == 0.0
    assert r.total == pytest.approx(0.5 * 10 * 180 / 190 + 0.0 + 1.0 - 0.05)


def test_empty_gt_or_empty_prediction() -> None:
    reward = MultiObjectiveReward()
    empty = np.zeros((9, 120), dtype=bool)
    # Prediction of 10 px, empty GT: dice 0; recall term 0 (nothing to miss); no junctions -> js 1,
    # components 1 vs 0 -> 1 - 0.1 = 0.9 -> 4.5; GT skeleton empty -> ratio 2 -> -5.
    # total = 0 + 0 + 0.2 x 4.5 + 0.1 x (-5) = 0.4
    r = reward(hline(10), empty)
    assert r.components["recall"] == 0.0
    assert r.total == pytest.approx(0.4)
    # Empty prediction, 100-px GT: recall 0 -> -0.85 x 20 = -17; topology 4.5; ratio 0 -> -5.
    # total = 0 + 0.2 x (-17) + 0.2 x 4.5 + 0.1 x (-5) = -3.0
    r = reward(empty, hline(100))
    assert r.components["recall"] == pytest.approx(-17.0)
    assert r.total == pytest.approx(-3.0)


def test_topology_term_cases() -> None:
    reward = MultiObjectiveReward()
    gt = hline(100)
    # A 2-px gap: 98 px in two pieces. js = 1 (no junctions), |b0 err| = 1 -> (1 - 0.1) x 5 = 4.5.
    # dice 196/198; recall 0.98 -> 0; length 98/100 -> -0.02 x 5 = -0.1.
    cut = gt.copy()
    cut[4, 50:52] = False
    r = reward(cut, gt)
    assert r.components["topology"] == pytest.approx(4.5)
    assert r.components["betti0_err_raw"] == 1.0
    assert r.total == pytest.approx(0.5 * 10 * 196 / 198 + 0.2 * 4.5 + 0.1 * (-0.1))
    # The T's bar alone misses the only GT junction: js = min(0, 1)/1 = 0, same component count -> 0.
    t = t_shape()
    bar = t.copy()
    bar[6:, :] = False
    r = reward(bar, t)
    assert r.components["junction_score_raw"] == 0.0 and r.components["topology"] == 0.0
    # A spurious junction where the GT has none: js = 1/(1 + 1) = 0.5 -> 2.5.
    r = reward(t, bar)
    assert r.components["topology"] == pytest.approx(2.5)
    # Thirty stray pixels: 1 - 0.1 x 30 = -2, clipped to -1 -> -5 (bounded however many fragments).
    noisy = gt.copy()
    noisy[8, 0:120:4] = True
    r = reward(noisy, gt)
    assert r.components["betti0_err_raw"] == 30.0
    assert r.components["topology"] == pytest.approx(-5.0)


def test_length_term_is_clipped() -> None:
    reward = MultiObjectiveReward()
    # GT skeleton 5 px, prediction 50 px: ratio 10 -> clipped to 2 -> -|1 - 2| x 5 = -5.
    r = reward(hline(50), hline(5))
    assert r.components["length_ratio_raw"] == 2.0
    assert r.components["length"] == pytest.approx(-5.0)
    # Half the length: ratio 0.5 -> -2.5.
    assert reward(hline(20), hline(40)).components["length"] == pytest.approx(-2.5)


def test_weights_are_configurable() -> None:
    gt = hline(100)
    pred = hline(80)
    dice_only = MultiObjectiveReward(
        RewardConfig(weights=RewardWeights(dice=1.0, recall=0.0, topology=0.0, length=0.0))
    )
    r = dice_only(pred, gt)
    assert r.total == pytest.approx(r.components["dice"]) == pytest.approx(80 / 9)
    assert "cldice" not in r.components and "betti" not in r.components
    # clDice term: 1-px lines are their own skeletons: Tprec = 80/80, Tsens = 80/100 -> clDice 8/9.
    cl = MultiObjectiveReward(
        RewardConfig(weights=RewardWeights(dice=0, recall=0, topology=0, length=0, cldice=1))
    )
    r = cl(pred, gt)
    assert r.components["cldice_raw"] == pytest.approx(2 * 0.8 / 1.8)
    assert r.total == pytest.approx(10 * 2 * 0.8 / 1.8)
    # Betti term: a ring vs a filled disk has one hole too many -> -(0 + 1) x 1 = -1.
    ring = np.zeros((21, 21), dtype=bool)
    ring[disk((10, 10), 8)] = True
    full = ring.copy()
    ring[disk((10, 10), 4)] = False
    betti = MultiObjectiveReward(
        RewardConfig(weights=RewardWeights(dice=0, recall=0, topology=0, length=0, betti=1))
    )
    r = betti(ring, full)
    assert (r.components["betti0_err_raw"], r.components["betti1_err_raw"]) == (0.0, 1.0)
    assert r.total == pytest.approx(-1.0)
    # Thirty stray pixels vs an empty GT: 30 Betti errors, clipped at betti_clip = 10 -> -10.
    stray = np.zeros((9, 120), dtype=bool)
    stray[4, 0:120:4] = True
    assert betti(stray, np.zeros_like(stray)).total == pytest.approx(-10.0)
    # Scales change the term: dice_scale 1 -> dice term = Dice.
    r = MultiObjectiveReward(RewardConfig(dice_scale=1.0))(pred, gt)
    assert r.components["dice"] == pytest.approx(8 / 9)


def test_connectivity_counts_only_pieces_on_the_vessels() -> None:
    # GT: one 100-px vessel. Prediction: that vessel broken into 3 pieces, plus 2 stray blobs off it.
    gt = hline(100, shape=(16, 120), row=4, start=10)
    pred = gt.copy()
    pred[4, [40, 70]] = False
    pred[12, 20:23] = pred[12, 60:63] = True
    conn = MultiObjectiveReward(
        RewardConfig(weights=RewardWeights(dice=0, recall=0, topology=0, length=0, connectivity=1))
    )
    r = conn(pred, gt)
    # 5 components against 1 (Betti-0 error 4), of which 3 touch the vessel: connectivity error 2.
    assert r.components["betti0_err_raw"] == 4.0
    assert r.components["connectivity_err_raw"] == 2.0
    assert r.total == pytest.approx(-2.0)
    # Stray blobs alone cost nothing here; the bridged vessel is perfect.
    whole = gt.copy()
    whole[12, 20:23] = True
    assert conn(whole, gt).total == 0.0
    # Clipped at betti_clip, scaled by connectivity_scale; a vessel missed entirely is an error too.
    dashed = gt.copy()
    dashed[4, 10:110:4] = False
    scaled = MultiObjectiveReward(
        RewardConfig(
            weights=RewardWeights(dice=0, recall=0, topology=0, length=0, connectivity=1),
            betti_clip=3.0,
            connectivity_scale=2.0,
        )
    )
    assert scaled(dashed, gt).total == pytest.approx(-6.0)
    assert conn(np.zeros_like(gt), gt).components["connectivity_err_raw"] == 1.0
    assert conn.term_bounds()["connectivity"] == (-10.0, 0.0)
    # Per tile (16 px): the breaks at columns 40 and 70 split the vessel inside tiles 2 and 4.
    tiled = conn.score_tiles(pred[None], conn.prepare_target(gt), tile=16)
    err = tiled.components["connectivity_err_raw"][0, 0]
    assert err.tolist() == [0, 0, 1, 0, 1, 0, 0, 0]
    # Not weighted: no term and no raw count.
    assert "connectivity_err_raw" not in MultiObjectiveReward(RewardConfig())(pred, gt).components


def test_prepared_target_matches_call_and_fov_is_respected() -> None:
    rng = np.random.default_rng(0)
    gt = ndi.gaussian_filter(rng.random((48, 48)), 2) > 0.52
    pred = ndi.gaussian_filter(rng.random((48, 48)), 2) > 0.5
    fov = np.zeros_like(gt)
    fov[disk((24, 24), 20)] = True
    reward = MultiObjectiveReward(RewardConfig(weights=ALL_TERMS))
    target = reward.prepare_target(gt, fov)
    assert reward.score(pred, target) == reward(pred, gt, fov)
    # Outside the FOV nothing counts: clearing or filling it does not change the reward.
    assert reward(pred & fov, gt, fov) == reward(pred | ~fov, gt, fov)
    assert reward(pred, gt, fov) != reward(pred, gt)  # (the FOV does matter here)
    # 0/1 integers score like bools.
    assert reward(pred.astype(np.uint8), gt.astype(np.int64), fov) == reward(pred, gt, fov)
    assert target.length == skeletonize(gt & fov).sum()


# ------------------------------------------------------------------------------------------ bounds


def _assert_within_bounds(reward: MultiObjectiveReward, comps: dict, total: np.ndarray | float) -> None:
    lo, hi = reward.bounds()
    tb = reward.term_bounds()
    eps = 1e-5
    total = np.asarray(total)
    assert np.all(np.isfinite(total))
    assert np.all(total >= lo - eps) and np.all(total <= hi + eps)
    for name in TERMS:
        if name in comps:
            v = np.asarray(comps[name])
            assert np.all(np.isfinite(v)), name
            assert np.all(v >= tb[name][0] - eps) and np.all(v <= tb[name][1] + eps), name
    for name, v in comps.items():
        assert np.all(np.isfinite(np.asarray(v))), name


@pytest.mark.parametrize("seed", [0, 1])
def test_every_term_is_bounded_and_finite_on_any_input(seed: int) -> None:
    reward = MultiObjectiveReward(RewardConfig(weights=ALL_TERMS, tile_sizes=(8,)))
    masks = degenerate_and_random_masks(seed)
    fov = np.zeros(masks[0].shape, dtype=bool)
    fov[disk((20, 20), 17)] = True
    for f in (None, fov):
        for g in masks:
            target = reward.prepare_target(g, f)
            for p in masks:
                r = reward.score(p, target)
                _assert_within_bounds(reward, r.components, r.total)
            tiles = reward.score_tiles(np.stack(masks), target, tile=8)
            _assert_within_bounds(reward, tiles.components, tiles.total)


def test_bounds_of_the_default_objective() -> None:
    reward = MultiObjectiveReward()
    # Worst: dice 0, recall -17, topology -5, length -5 -> 0.2 x -17 + 0.2 x -5 + 0.1 x -5 = -4.9.
    assert reward.bounds() == pytest.approx((-4.9, 6.0))
    # Reached by a prediction that misses a T-shaped GT completely and adds 30 far-away fragments
    # longer than twice the GT skeleton.
    gt = np.zeros((40, 120), dtype=bool)
    gt[:30, :30] = t_shape()
    pred = np.zeros_like(gt)
    pred[35, 0:120:4] = True
    pred[38, 30:120] = True
    r = reward(pred, gt)
    assert r.total == pytest.approx(-4.9)


def test_nan_guard_raises() -> None:
    comps = {"dice": np.array([1.0, np.nan])}
    with pytest.raises(FloatingPointError, match="dice"):
        _check_finite(np.array([0.0, np.nan]), comps)
    _check_finite(np.array([0.0, 1.0]), {"dice": np.array([1.0, 2.0])})


# ------------------------------------------------------------------------------------------- config


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"RewardWeights\.dice.*>= 0"):
        RewardWeights(dice=-0.1)
    with pytest.raises(ValueError, match=r"RewardWeights\.betti"):
        RewardWeights(betti=float("nan"))
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match=r"recall_target.*\(0, 1\]"):
            RewardConfig(recall_target=bad)
    RewardConfig(recall_target=1.0)  # the upper end is allowed
    for bad in ((), (0,), (16, -8), (16.0,)):
        with pytest.raises(ValueError, match="tile_sizes"):
            RewardConfig(tile_sizes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dice_scale"):
        RewardConfig(dice_scale=0.0)
    with pytest.raises(ValueError, match="betti_clip"):
        RewardConfig(betti_clip=-1.0)
    with pytest.raises(ValueError, match="component_penalty"):
        RewardConfig(component_penalty=-0.1)
    with pytest.raises(ValueError, match="RewardWeights"):
        RewardConfig(weights={"dice": 1.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="RewardConfig"):
        MultiObjectiveReward(RewardWeights())  # type: ignore[arg-type]


def test_config_is_a_plain_frozen_dataclass_node() -> None:
    # The project's config tree resolves the type hints and subclasses the node.
    hints = typing.get_type_hints(RewardConfig)
    assert hints["weights"] is RewardWeights and hints["tile_sizes"] == tuple[int, ...]
    assert typing.get_type_hints(RewardWeights)["dice"] is float

    @dataclasses.dataclass(frozen=True)
    class WithActors(RewardConfig):
        num_actors: int = 1

        def __post_init__(self) -> None:
            super().__post_init__()

    assert WithActors(num_actors=2, recall_target=0.5).recall_target == 0.5
    with pytest.raises(ValueError, match="recall_target"):
        WithActors(recall_target=2.0)
    cfg = RewardConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dice_scale = 1.0  # type: ignore[misc]
    assert dataclasses.replace(cfg, weights=RewardWeights(dice=1.0)).weights.dice == 1.0


# -------------------------------------------------------------------------------------------- tiles


def test_tiled_shapes_padding_and_fov() -> None:
    reward = MultiObjectiveReward()
    rng = np.random.default_rng(0)
    gt = ndi.gaussian_filter(rng.random((40, 40)), 1.5) > 0.55
    preds = np.stack([ndi.gaussian_filter(rng.random((40, 40)), 1.5) > 0.55 for _ in range(3)])
    fov = np.zeros((40, 40), dtype=bool)
    fov[:, :20] = True  # left half
    # 40 px padded to 48 -> 3x3 tiles of 16; tile column 2 (cols 32-47) has no FOV pixel.
    out = reward.score_tiles(preds, reward.prepare_target(gt, fov), tile=16)
    assert isinstance(out, TiledRewards) and out.source == "gt" and out.tile == 16
    assert out.total.shape == (3, 3, 3) and out.total.dtype == np.float32
    assert out.valid.shape == (3, 3)
    assert out.valid[:, :2].all() and not out.valid[:, 2].any()
    assert np.all(out.total[:, :, 2] == 0)
    assert all(v.shape == (3, 3, 3) and np.all(v[:, :, 2] == 0) for v in out.components.values())
    # Without a FOV every tile is valid, including the partial ones made of padding and 8 real pixels.
    out = reward.score_tiles(preds, reward.prepare_target(gt), tile=16)
    assert out.valid.all()
    # The default tile size comes from the config.
    assert reward.score_tiles(preds, reward.prepare_target(gt)).total.shape == (3, 3, 3)
    with pytest.raises(ValueError, match=r"\[K, H, W\]"):
        reward.score_tiles(preds[0], reward.prepare_target(gt))
    with pytest.raises(ValueError, match="tile"):
        reward.score_tiles(preds, reward.prepare_target(gt), tile=0)


def _isolated_tile_scene(rng: np.random.Generator, k: int, tiles: int = 4, tile: int = 16):
    """GT and K predictions whose components each sit inside one tile, >= 1 px from its border."""
    size = tiles * tile
    gt = np.zeros((size, size), dtype=bool)
    preds = np.zeros((k, size, size), dtype=bool)
    inner = tile - 2  # a shape of inner x inner placed at offset 1 keeps a background frame

    def shape(kind: int) -> np.ndarray:
        m = np.zeros((inner, inner), dtype=bool)
        if kind == 0:  # T
            m[2, 1:-1] = True
            m[2:-1, inner // 2] = True
        elif kind == 1:  # ring
            m[disk((inner / 2 - 0.5, inner / 2 - 0.5), 6, shape=m.shape)] = True
            m[disk((inner / 2 - 0.5, inner / 2 - 0.5), 3, shape=m.shape)] = False
        elif kind == 2:  # thick line
            m[5:8, 1:-1] = True
        elif kind == 3:  # blobs
            m = ndi.gaussian_filter(rng.random((inner, inner)), 1.5) > 0.55
        return m  # kind 4: empty

    for i in range(tiles):
        for j in range(tiles):
            sl = (slice(i * tile + 1, i * tile + 1 + inner), slice(j * tile + 1, j * tile + 1 + inner))
            base = shape(int(rng.integers(0, 5)))
            gt[sl] = base
            for s in range(k):
                p = base.copy()
                action = rng.integers(0, 4)
                if action == 1:  # cut
                    p[:, inner // 2 - 1 : inner // 2 + 1] = False
                elif action == 2:  # thicken
                    p = ndi.binary_dilation(p)
                elif action == 3:  # replace by another shape
                    p = shape(int(rng.integers(0, 5)))
                preds[s][sl] = p
    return gt, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tile_with_isolated_components_equals_scoring_its_crop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gt, preds = _isolated_tile_scene(rng, k=3)
    reward = MultiObjectiveReward(RewardConfig(weights=ALL_TERMS))
    out = reward.score_tiles(preds, reward.prepare_target(gt), tile=16)
    for s in range(3):
        for i in range(4):
            for j in range(4):
                sl = (slice(16 * i, 16 * i + 16), slice(16 * j, 16 * j + 16))
                r = reward(preds[s][sl], gt[sl])
                assert out.total[s, i, j] == pytest.approx(r.total, abs=1e-5)
                for name, v in r.components.items():
                    assert out.components[name][s, i, j] == pytest.approx(v, abs=1e-5), name


def test_single_tile_equals_whole_image_score() -> None:
    rng = np.random.default_rng(4)
    gt = ndi.gaussian_filter(rng.random((48, 48)), 1.5) > 0.55
    preds = np.stack([ndi.gaussian_filter(rng.random((48, 48)), 1.5) > t for t in (0.5, 0.55, 0.6)])
    fov = np.zeros_like(gt)
    fov[disk((24, 24), 22)] = True
    reward = MultiObjectiveReward(RewardConfig(weights=ALL_TERMS))
    target = reward.prepare_target(gt, fov)
    out = reward.score_tiles(preds, target, tile=48)
    assert out.total.shape == (3, 1, 1)
    for s in range(3):
        r = reward.score(preds[s], target)
        assert out.total[s, 0, 0] == pytest.approx(r.total, abs=1e-5)
        assert {k: out.components[k][s, 0, 0] for k in r.components} == pytest.approx(r.components, abs=1e-5)


# ---------------------------------------------------------------------- slow reference for the tiles


def _ref_terms(c: RewardConfig, p: dict, g: dict, tp: int, sp_in_g: int, sg_in_p: int) -> dict[str, float]:
    """The documented term formulas, one tile at a time, in plain Python."""
    w = c.weights
    dice_raw = 1.0 if p["area"] + g["area"] == 0 else 2 * tp / (p["area"] + g["area"])
    if g["area"] == 0:
        recall_raw, recall_term = (1.0 if p["area"] == 0 else 0.0), 0.0
    else:
        recall_raw = tp / g["area"]
        recall_term = min(recall_raw - c.recall_target, 0.0) * c.recall_scale
    if g["junctions"] > 0:
        js = min(p["junctions"], g["junctions"]) / g["junctions"]
    else:
        js = 1.0 / (1.0 + p["junctions"])
    e0, e1 = abs(p["components"] - g["components"]), abs(p["holes"] - g["holes"])
    topology = max(-1.0, min(1.0, js - c.component_penalty * e0)) * c.topology_scale
    if g["length"] > 0:
        ratio = min(p["length"] / g["length"], 2.0)
    elif p["length"] == 0:
        ratio = 1.0
    else:
        ratio = 2.0
    length = -abs(1 - ratio) * c.length_scale
    if p["length"] == 0 and g["length"] == 0:
        cl = 1.0
    elif p["length"] == 0 or g["length"] == 0:
        cl = 0.0
    else:
        tprec, tsens = sp_in_g / p["length"], sg_in_p / g["length"]
        cl = 0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens)
    terms = {
        "dice": dice_raw * c.dice_scale,
        "recall": recall_term,
        "topology": topology,
        "length": length,
        "cldice": cl * c.cldice_scale,
        "betti": -min(e0 + e1, c.betti_clip) * c.betti_scale,
    }
    total = sum(getattr(w, k) * v for k, v in terms.items())
    return {"total": total, **terms, "dice_raw": dice_raw, "recall_raw": recall_raw, "cldice_raw": cl}


def _ref_image_parts(mask: np.ndarray) -> dict[str, np.ndarray]:
    """Whole-image skeleton, labels, hole labels and junction first pixels with skimage (not scipy)."""
    skel = skeletonize(mask)
    labels = sk_label(mask, connectivity=2)
    bg = sk_label(np.pad(~mask, 1, constant_values=True), connectivity=1)
    holes = np.where(bg == bg[0, 0], 0, bg)[1:-1, 1:-1]
    nbrs = ndi.convolve(skel.astype(int), np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]]), mode="constant")
    jlab = sk_label(skel & (nbrs >= 3), connectivity=2)
    first = np.zeros_like(mask)
    for lab in range(1, jlab.max() + 1):
        r, c = np.argwhere(jlab == lab)[0]  # argwhere is in raster order
        first[r, c] = True
    return {"mask": mask, "skel": skel, "labels": labels, "holes": holes, "first": first}


def _ref_tile_counts(parts: dict[str, np.ndarray], sl: tuple[slice, slice]) -> dict[str, int]:
    return {
        "area": int(parts["mask"][sl].sum()),
        "length": int(parts["skel"][sl].sum()),
        "junctions": int(parts["first"][sl].sum()),
        "components": len(set(np.unique(parts["labels"][sl])) - {0}),
        "holes": len(set(np.unique(parts["holes"][sl])) - {0}),
    }


@pytest.mark.parametrize("tile", [8, 5, 12])
def test_vectorised_tiles_match_a_slow_loop_reference(tile: int) -> None:
    # Random blobs and lines crossing tile borders, a non-multiple image size and a FOV: the general case.
    rng = np.random.default_rng(7)
    h, w = 37, 45
    blobs = [ndi.gaussian_filter(rng.random((h, w)), 1.2) > q for q in (0.5, 0.55, 0.6, 0.62)]
    gt = blobs[0]
    preds = np.stack([blobs[1], blobs[2], blobs[3], np.zeros((h, w), bool), gt])
    fov = np.zeros((h, w), dtype=bool)
    fov[disk((h / 2, w / 2), 19, shape=fov.shape)] = True
    cfg = RewardConfig(weights=ALL_TERMS)
    reward = MultiObjectiveReward(cfg)
    target = reward.prepare_target(gt, fov)
    out = reward.score_tiles(preds, target, tile=tile)
    # Several sizes at once (one skeletonisation, padded to a common multiple) give the same numbers.
    multi = reward.score_tiles_multi(preds, target, tiles=(8, 5, 12))[tile]
    np.testing.assert_array_equal(multi.total, out.total)
    np.testing.assert_array_equal(multi.valid, out.valid)
    for name, v in out.components.items():
        np.testing.assert_array_equal(multi.components[name], v)

    hp, wp = -(-h // tile) * tile, -(-w // tile) * tile  # padded to multiples of the tile
    pad = ((0, hp - h), (0, wp - w))
    fov_p = np.pad(fov, pad)
    g_parts = _ref_image_parts(np.pad(gt & fov, pad))
    for s in range(preds.shape[0]):
        p_parts = _ref_image_parts(np.pad(preds[s] & fov, pad))
        for i in range(hp // tile):
            for j in range(wp // tile):
                sl = (slice(i * tile, (i + 1) * tile), slice(j * tile, (j + 1) * tile))
                if not fov_p[sl].any():
                    assert not out.valid[i, j] and out.total[s, i, j] == 0.0
                    continue
                assert out.valid[i, j]
                ref = _ref_terms(
                    cfg,
                    _ref_tile_counts(p_parts, sl),
                    _ref_tile_counts(g_parts, sl),
                    tp=int((p_parts["mask"][sl] & g_parts["mask"][sl]).sum()),
                    sp_in_g=int((p_parts["skel"][sl] & g_parts["mask"][sl]).sum()),
                    sg_in_p=int((g_parts["skel"][sl] & p_parts["mask"][sl]).sum()),
                )
                assert out.total[s, i, j] == pytest.approx(ref.pop("total"), abs=1e-4), (s, i, j)
                for name, v in ref.items():
                    assert out.components[name][s, i, j] == pytest.approx(v, abs=1e-4), (name, s, i, j)


def test_tile_aggregates_are_built_on_first_use_and_cached() -> None:
    reward = MultiObjectiveReward(RewardConfig(tile_sizes=(16, 32)))
    gt = t_shape(64)
    target = reward.prepare_target(gt)
    assert target.tiles == {} and target.holes is None  # whole-image scoring needs neither
    preds = np.stack([gt, np.zeros_like(gt)])
    out8 = reward.score_tiles(preds, target, tile=8)
    assert out8.total.shape == (2, 8, 8) and set(target.tiles) == {8}
    cached = target.tiles[8]
    reward.score_tiles(preds, target, tile=8)
    assert target.tiles[8] is cached
    # A perfect prediction is perfect in every tile: 6.0 everywhere.
    assert np.allclose(out8.total[0], 6.0)
    assert np.allclose(reward.score_tiles(preds, target, tile=32).total[0], 6.0)
