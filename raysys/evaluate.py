"""`raysys eval` and `raysys export`: score a checkpoint on any dataset split; export trainable weights.

Neither needs Ray. A "checkpoint" is a folder with ``trainable.safetensors`` (``runs/<name>/checkpoints/best``
or ``latest``); without one, the configured base policy (e.g. the SFT model) is scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from envs.datasets import load_dataset
from envs.postprocess import postprocess
from envs.types import VesselSample
from policies.evaluation import evaluate_probs, predict_probs
from policies.factory import load_policy
from raysys.config import Config
from raysys.data import dataset_for_split, inference_for

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    cfg: Config,
    checkpoint: str | Path | None,
    out_dir: str | Path,
    *,
    split: str = "test",
    also_at: dict[str, tuple[float, Path]] | None = None,
    keep_probs: bool = True,
    samples: Sequence[VesselSample] | None = None,
) -> dict[str, Any]:
    """Per-image metrics (``per_image.parquet``), means and a threshold sweep (``metrics.json``), and the
    probability maps (``probs.npz``, float16, see :func:`load_probs`; not with ``keep_probs=False``) for
    reports. Full images at native resolution (sliding windows and ``data.scale`` as configured), scored
    inside each image's FOV.

    ``also_at`` scores the same probabilities at more thresholds, ``{name: (threshold, folder)}``, each into
    a folder of its own without the maps again (the prediction is the expensive part on large images); their
    summaries come back under ``"also_at"``. ``samples``: the split, loaded already (several checkpoints
    scored on one split read it once and share each image's ground-truth topology)."""
    out = Path(out_dir)
    policy = load_policy(cfg.policy, checkpoint, seed=cfg.run.seed)
    if samples is None:
        samples = dataset_for_split(cfg.data, split, load=load_dataset)
    probs = predict_probs(lambda im, pr: policy.mask_logits(im, pr), samples, inference_for(cfg))
    summary = _score(
        cfg, probs, samples, out, checkpoint=checkpoint, split=split, threshold=cfg.eval.threshold
    )
    if keep_probs:
        save_probs(out / "probs.npz", probs, [s.id for s in samples])
    if also_at:
        summary["also_at"] = {
            name: _score(cfg, probs, samples, Path(folder), checkpoint=checkpoint, split=split, threshold=t)
            for name, (t, folder) in also_at.items()
        }
    return summary


def at_grid_end(best: float, thresholds: Sequence[float]) -> bool:
    """Whether a best threshold is the first or last of a sweep of several (short of 0.05 / 0.95): the sweep may
    have stopped before the optimum."""
    ts = sorted(float(t) for t in thresholds)
    return len(ts) > 1 and ((best == ts[0] and ts[0] > 0.05) or (best == ts[-1] and ts[-1] < 0.95))


def _score(
    cfg: Config,
    probs: list[np.ndarray],
    samples: Sequence[VesselSample],
    out: Path,
    *,
    checkpoint: str | Path | None,
    split: str,
    threshold: float,
) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    ec = cfg.eval
    res = evaluate_probs(probs, samples, threshold=threshold, thresholds=ec.thresholds)
    summary: dict[str, Any] = {
        "split": split,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "n_images": len(res.per_image),
        "n_without_vessels": res.n_without_vessels,
        "threshold": threshold,
        "mean": res.mean,
        "sweep": res.sweep,
        "best_threshold_on_this_split": res.best_threshold,
        "best_threshold_at_grid_end": at_grid_end(res.best_threshold, ec.thresholds),
    }
    if summary["best_threshold_at_grid_end"]:
        log.warning(
            "the best threshold on %s (%g) is the end of eval.thresholds %s: the best one may lie beyond it; "
            "widen eval.thresholds (e.g. 0.05 to 0.95)", split, res.best_threshold, list(ec.thresholds),
        )  # fmt: skip
    rows = res.per_image
    if ec.postprocess:
        masks = [
            postprocess(
                p, threshold=threshold, closing_radius=ec.closing_radius, min_size=ec.min_size, fov=s.fov
            ).astype(np.float32)
            for p, s in zip(probs, samples, strict=True)
        ]
        post = evaluate_probs(masks, samples, threshold=0.5, thresholds=(0.5,))
        summary["postprocessed"] = {
            "closing_radius": ec.closing_radius,
            "min_size": ec.min_size,
            "mean": post.mean,
        }
        rows = [
            {**r, **{f"post_{k}": v for k, v in p.items() if k != "id"}}
            for r, p in zip(res.per_image, post.per_image, strict=True)
        ]
    pq.write_table(pa.Table.from_pylist(rows), out / "per_image.parquet")
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_probs(path: Path, probs: list[np.ndarray], ids: list[str]) -> None:
    """One float16 array per image (``p0``, ``p1``, ...; sizes may differ) plus ``ids``; no pickles."""
    arrays = {f"p{i}": p.astype(np.float16) for i, p in enumerate(probs)}
    np.savez_compressed(path, ids=np.array(ids), **arrays)


def load_probs(path: Path, indices: Sequence[int] | None = None) -> tuple[list[np.ndarray], list[str]]:
    """Probability maps (float32) and ids written by :func:`save_probs` (or the single ``probs`` array of
    earlier versions); only ``indices`` when given."""
    with np.load(path, allow_pickle=False) as data:
        ids = [str(x) for x in data["ids"]]
        picked = range(len(ids)) if indices is None else indices
        if "probs" in data.files:
            stacked = data["probs"]
            return [stacked[i].astype(np.float32) for i in picked], [ids[i] for i in picked]
        return [data[f"p{i}"].astype(np.float32) for i in picked], [ids[i] for i in picked]


def export_checkpoint(cfg: Config, checkpoint: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """``adapter/`` (PEFT adapter folder) and ``merged/``: LoRA and the trained heads merged into a plain
    model. Tiny: a TinySa2VA folder (``policies.checkpoint.load_base_model``). Sa2VA: a release folder that
    Sa2VA's own code loads (``AutoModel.from_pretrained(..., trust_remote_code=True)``), written when the base
    checkpoint is a local folder. The merged model is reloaded and its logits on a validation image are
    checked against the adapter model's before anything is reported."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = load_policy(cfg.policy, checkpoint, seed=cfg.run.seed)
    policy.save_adapter(str(out / "adapter"))
    result: dict[str, Any] = {"adapter": str(out / "adapter"), "merged": None}
    source = Path(policy.base_identity.get("checkpoint") or "")
    if cfg.policy.kind != "tiny" and not source.is_dir():
        log.info("the base checkpoint %s is not a local folder: wrote the adapter folder only", source)
        return result
    samples = dataset_for_split(cfg.data, "val", load=load_dataset)
    probe = [samples[i] for i in range(min(2 if cfg.policy.kind == "tiny" else 1, len(samples)))]
    probe = [s for s in probe if s.mask.shape == probe[0].mask.shape]  # one batch: one size
    # The centre of each image, a training crop's size (512 px without one): a whole HRF image (3504x2336)
    # took the tiny model a minute here, and any window shows whether the two models compute the same.
    images = _centre_crop(np.stack([s.image for s in probe]), cfg.train_crop or 512)
    prompts = [s.prompt for s in probe]
    with torch.no_grad():
        features = policy.frozen_features(images)
        expected = policy.mask_logits(images, prompts, features=features)
        merged = policy.model.merge_and_unload()
        if cfg.policy.kind == "tiny":
            from policies.checkpoint import load_base_model, save_base_model

            save_base_model(merged, out / "merged")
            again = load_base_model(out / "merged")(images, prompts)
            tolerance = 1e-4
        else:
            from policies.sa2va import load_sa2va
            from policies.sa2va_export import save_merged

            save_merged(merged, source, out / "merged")
            _check_written_tensors(merged, out / "merged")
            reloaded = load_sa2va(str(out / "merged"), dtype=cfg.policy.dtype, trust_remote_code=True)
            # frozen encoders are checked tensor by tensor above; the trained path runs on shared features
            again = reloaded(images, prompts, features=features)
            # a bfloat16 backbone stores LoRA merged into bfloat16 weights: rounding, not an error
            tolerance = 1e-3 if cfg.policy.dtype == "float32" else 5e-2
    err = float((expected - again).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if err > tolerance * scale:
        raise RuntimeError(f"merged export differs from the adapter model by {err:.2e} in logits")
    result.update({"merged": str(out / "merged"), "max_logit_diff": err})
    (out / "export.json").write_text(json.dumps(result, indent=2))
    return result


def _centre_crop(images: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` x ``side`` pixels of images [B, H, W, C] (all of a smaller side)."""
    h, w = images.shape[1:3]
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return np.ascontiguousarray(images[:, y0 : y0 + side, x0 : x0 + side])


def _check_written_tensors(model: Any, folder: Path) -> None:
    """Every tensor of ``model`` is in the folder's safetensors with the same name, dtype and value (read one
    at a time: a real checkpoint does not fit twice in memory)."""
    import torch
    from safetensors import safe_open

    ours = model.model.state_dict()
    found: set[str] = set()
    changed = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name in ours:
                    found.add(name)
                    stored, mine = handle.get_tensor(name), ours[name].detach().cpu()
                    if stored.dtype != mine.dtype or not torch.equal(stored, mine):
                        changed.append(name)
    missing = sorted(set(ours) - found)
    if missing or changed:
        raise RuntimeError(
            f"the merged export in {folder} does not hold the model as written: {len(missing)} tensors missing "
            f"(e.g. {missing[:1]}), {len(changed)} changed (e.g. {changed[:1]})"
        )
