"""Supervised baseline of the tiny policy with Sa2VA's loss (2.0 x BCE + 0.5 x Dice on logits).

For TinySa2VA, SFT trains every weight (it stands in for Sa2VA's pre-training and vessel SFT together);
the RL stage then freezes the encoders and trains LoRA + heads, exactly as on a real checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from envs.types import VesselSample
from envs.windows import crop_box, crop_sample, jitter_sample
from policies.checkpoint import save_base_model
from policies.config import SFTConfig
from policies.evaluation import EvalResult, Inference, WholeImage, evaluate
from policies.losses import seg_loss
from policies.tiny import TinySa2VA

log = logging.getLogger(__name__)


@dataclass
class SFTResult:
    steps: int
    seconds: float
    best_step: int
    val: dict[str, float]
    val_best_threshold: float
    history: list[dict[str, float]]
    checkpoint: str


def _stack(samples: Sequence[VesselSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    shapes = {s.mask.shape for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"training images of different sizes {sorted(shapes)} cannot share a batch; train on crops "
            "(data.crop) or use sft.batch_size=1"
        )
    return (
        np.stack([s.image for s in samples]),
        np.stack([s.mask for s in samples]),
        np.stack([s.fov for s in samples]),
        [s.prompt for s in samples],
    )


def _flip(x: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Per-sample horizontal/vertical flips: x [B,H,W,...], flips bool [B,2]."""
    out = x.copy()
    for i, (fh, fv) in enumerate(flips):
        if fh:
            out[i] = out[i][:, ::-1]
        if fv:
            out[i] = out[i][::-1]
    return out


def train_sft(
    model: TinySa2VA,
    train: Sequence[VesselSample],
    val: Sequence[VesselSample],
    cfg: SFTConfig,
    *,
    out_dir: str | Path,
    seed: int = 0,
    threshold: float = 0.5,
    crop: int | None = None,
    crop_min_fov: float = 0.5,
    inference: Inference = WholeImage,
    progress: bool = False,
) -> SFTResult:
    """Train, validate every ``cfg.eval_every`` steps, keep the best validation Dice; write
    ``out_dir/model`` (weights) and ``out_dir/metrics.json``.

    Each step draws ``cfg.batch_size`` training images (lazily: a dataset of any size works) and, with
    ``crop``, one random ``crop`` x ``crop`` piece of each holding at least ``crop_min_fov`` FOV. Validation
    runs full images through ``inference`` (sliding windows, scale), so it scores what deployment sees.
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError("SFT needs at least one training and one validation image")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    jitter_rng = np.random.default_rng([seed, 0x717])  # its own stream: sft.jitter=0 draws as before

    def batch(idx: np.ndarray) -> list[VesselSample]:
        picked = [train[int(i)] for i in idx]
        if crop is not None:
            picked = [crop_sample(s, crop_box(s.fov, crop, rng, min_fov=crop_min_fov), crop) for s in picked]
        if cfg.jitter > 0:
            picked = [jitter_sample(s, jitter_rng, cfg.jitter) for s in picked]
        return picked

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    out_dir = Path(out_dir)
    best_dice, best_step, best_state = -1.0, 0, None
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    bar = _progress(cfg.steps, progress)
    running = 0.0
    for step in range(cfg.steps):
        idx = rng.choice(len(train), size=min(cfg.batch_size, len(train)), replace=False)
        images, masks, fovs, prompts = _stack(batch(idx))
        flips = rng.random((len(idx), 2)) < 0.5
        x = _flip(images, flips)
        y = torch.from_numpy(_flip(masks, flips))
        f = torch.from_numpy(_flip(fovs, flips))
        logits = model(x, prompts)
        loss = seg_loss(logits, y.float(), fov=f, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            res = _validate(model, val, threshold, inference)
            row = {"step": step + 1, "loss": running, **{f"val/{k}": v for k, v in res.mean.items()}}
            history.append(row)
            log.info(
                "sft step %d loss %.4f val dice %.4f recall %.4f precision %.4f",
                step + 1,
                running,
                res.mean["dice"],
                res.mean["recall"],
                res.mean["precision"],
            )
            if res.mean["dice"] > best_dice:
                best_dice, best_step = res.mean["dice"], step + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    final = _validate(model, val, threshold, inference)
    ckpt = save_base_model(model, out_dir / "model")
    result = SFTResult(
        steps=cfg.steps,
        seconds=seconds,
        best_step=best_step,
        val=final.mean,
        val_best_threshold=final.best_threshold,
        history=history,
        checkpoint=str(ckpt),
    )
    (out_dir / "metrics.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _validate(
    model: TinySa2VA, val: Sequence[VesselSample], threshold: float, inference: Inference
) -> EvalResult:
    model.eval()
    try:
        return evaluate(lambda im, pr: model(im, pr), val, threshold=threshold, inference=inference)
    finally:
        model.train()


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sft", unit="step")
