"""Training crop size vs held-out quality of the tiny policy at an equal CPU-time budget (+ a plain conv net) -> JSON.

    .venv/bin/python benchmarks/crop_quality.py [--minutes 2.0] [--threads 2] [--configs tiny:128,...]

Writes a DRIVE-layout synthetic folder (565 x 584, 20 train -> 16 train / 4 val with val_fraction=0.2,
20 test) to a temporary directory. For every configuration it calibrates seconds per training step (and
seconds per validation pass) on a throw-away copy of the model, picks the number of SFT steps that fills
``--minutes`` of ``train_sft`` wall time (validation every steps // 4 included; cosine over those steps),
trains with ``policies.sft.train_sft``, then scores the 20 test images at native resolution with sliding
windows of the training crop (whole images for crop None and for the fully convolutional baseline): Dice,
clDice, recall, precision at 0.5 and at the threshold that is best on the 4 validation images. It also
profiles one training step by module (image encoder / vision tower + mlp1 / LLM + text_hidden_fcs / mask
decoder) and measures recall on thin (< 3 px) and thick vessel pixels separately.

Timings on a shared 2-core machine are noisy (load averages are recorded); nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from torch import nn

DEFAULT_CONFIGS = "tiny:128,tiny:192,tiny:256,tiny:384,tiny:full,cnn:64"
METRICS = ("dice", "cldice", "recall", "precision")


# --------------------------------------------------------------------------------------- baseline model
class _CNNConfig:
    """save_base_model writes ``model.cfg.to_dict()`` next to the weights; the baseline has no options."""

    def to_dict(self) -> dict:
        return {"model": "plain_cnn"}


class PlainCNN(nn.Module):
    """A plain fully convolutional segmenter: 6 x (3x3 conv, BN, GELU) at full resolution, dilations
    1,1,2,4,8,1 (receptive field 35 px), 32 channels, 1x1 head. ~47k parameters.

    Same call signature as TinySa2VA: ``forward(images uint8 [B,H,W,3], prompts) -> logits [B,H,W]``
    (the prompt is ignored), so ``train_sft`` and ``predict_probs`` run it unchanged."""

    def __init__(self, channels: int = 32, dilations: tuple[int, ...] = (1, 1, 2, 4, 8, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for d in dilations:
            layers += [
                nn.Conv2d(cin, channels, 3, padding=d, dilation=d),
                nn.BatchNorm2d(channels),
                nn.GELU(),
            ]
            cin = channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 1, 1)
        self.cfg = _CNNConfig()

    def forward(self, images, prompts, features=None) -> torch.Tensor:
        from policies.tiny import images_to_tensor

        x = images_to_tensor(images, next(self.parameters()).device)
        return self.head(self.body(x))[:, 0]


# --------------------------------------------------------------------------------------- helpers
def _load() -> tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())  # type: ignore[return-value]


def _train_batch(train, crop, batch_size, rng):
    """The same batch construction as train_sft (crop_box + crop_sample, flips)."""
    from envs.windows import crop_box, crop_sample
    from policies.sft import _flip, _stack

    idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
    picked = [train[int(i)] for i in idx]
    if crop is not None:
        picked = [crop_sample(s, crop_box(s.fov, crop, rng, min_fov=0.5), crop) for s in picked]
    images, masks, fovs, prompts = _stack(picked)
    flips = rng.random((len(idx), 2)) < 0.5
    return (
        _flip(images, flips),
        torch.from_numpy(_flip(masks, flips)),
        torch.from_numpy(_flip(fovs, flips)),
        prompts,
    )


def calibrate(model, train, val, crop, batch_size, inference, lr, n_steps: int = 5) -> tuple[float, float]:
    """(seconds per training step, seconds per validation pass) on a throw-away copy of ``model``."""
    from policies.evaluation import evaluate
    from policies.losses import seg_loss

    m = copy.deepcopy(model)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    rng = np.random.default_rng(12345)

    def step() -> None:
        x, y, f, prompts = _train_batch(train, crop, batch_size, rng)
        loss = seg_loss(m(x, prompts), y.float(), fov=f, bce_weight=2.0, dice_weight=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()

    step()  # warm-up (allocator, thread pools)
    times = []
    for _ in range(n_steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    s_step = statistics.median(times)  # median: robust to a load spike from other work on the machine
    m.eval()
    t = time.perf_counter()
    evaluate(lambda im, pr: m(im, pr), val, threshold=0.5, inference=inference)
    s_val = time.perf_counter() - t
    return s_step, s_val


def steps_for_budget(budget_s: float, s_step: float) -> int:
    """Optimiser steps that fill the budget. In-loop validation is not charged to the budget: its cost
    depends on the validation windows, not on how well a crop size trains (it is reported per row)."""
    return max(1, round(budget_s / s_step))


class _ValidationTimer:
    """Wraps ``policies.sft._validate`` (behaviour unchanged) to time the in-loop validation passes."""

    def __init__(self) -> None:
        import policies.sft as sft

        self.sft, self.orig, self.times = sft, sft._validate, []

    def __enter__(self) -> _ValidationTimer:
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return self.orig(*a, **k)
            finally:
                self.times.append(time.perf_counter() - t)

        self.sft._validate = timed
        return self

    def __exit__(self, *exc) -> None:
        self.sft._validate = self.orig


def _median_time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_tiny_step(model, x_np, prompts, y, f) -> dict[str, float]:
    """Forward+backward seconds of each part of TinySa2VA on one training batch (parts timed on their own,
    with detached inputs), plus the whole step."""
    import torch.nn.functional as F

    from policies.losses import seg_loss
    from policies.tiny import images_to_tensor

    m = copy.deepcopy(model)
    m.train()
    sam = m.grounding_encoder.sam2_model
    x = images_to_tensor(x_np)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate") if (h % 4 or w % 4) else x
    with torch.no_grad():
        hi, mid, low = sam.image_encoder(x)
        tokens = m.mlp1(m.vision_model(x))
        e = m.seg_embedding(tokens, prompts)

    def backward_all(outs) -> None:
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(list(outs), [torch.ones_like(o) / o.numel() for o in outs])

    def image_encoder() -> None:
        m.zero_grad(set_to_none=True)
        backward_all(sam.image_encoder(x))

    def vision_mlp1() -> None:
        m.zero_grad(set_to_none=True)
        backward_all(m.mlp1(m.vision_model(x)))

    def llm_fcs() -> None:
        m.zero_grad(set_to_none=True)
        backward_all(m.seg_embedding(tokens.detach().requires_grad_(), prompts))

    def decoder() -> None:
        m.zero_grad(set_to_none=True)
        logits = sam.sam_mask_decoder(hi, mid, low, e.detach().requires_grad_())[:, :h, :w]
        seg_loss(logits, y.float(), fov=f).backward()

    def whole() -> None:
        m.zero_grad(set_to_none=True)
        seg_loss(m(x_np, prompts), y.float(), fov=f).backward()

    out = {
        "image_encoder_s": _median_time(image_encoder),
        "vision_model_mlp1_s": _median_time(vision_mlp1),
        "llm_text_hidden_fcs_s": _median_time(llm_fcs),
        "mask_decoder_loss_s": _median_time(decoder),
        "whole_fwd_bwd_s": _median_time(whole),
    }
    return {k: round(v, 4) for k, v in out.items()}


def param_counts(model) -> dict[str, int]:
    def n(mod) -> int:
        return sum(p.numel() for p in mod.parameters())

    if isinstance(model, PlainCNN):
        return {"total": n(model)}
    sam = model.grounding_encoder.sam2_model
    return {
        "total": n(model),
        "image_encoder": n(sam.image_encoder),
        "vision_model_mlp1": n(model.vision_model) + n(model.mlp1),
        "language_model": n(model.language_model),
        "text_hidden_fcs": n(model.text_hidden_fcs),
        "mask_decoder": n(sam.sam_mask_decoder),
    }


def thin_thick_recall(probs, samples, threshold: float) -> dict[str, float]:
    """Recall on vessel pixels that a 3x3 opening removes (segments < 3 px wide) and on the rest (FOV only)."""
    from scipy.ndimage import binary_opening

    thin_hit = thin_n = thick_hit = thick_n = 0
    for p, s in zip(probs, samples, strict=True):
        g = s.mask & s.fov
        thick = binary_opening(g, structure=np.ones((3, 3), bool)) & g
        thin = g & ~thick
        pred = p >= threshold
        thin_hit += int((pred & thin).sum())
        thin_n += int(thin.sum())
        thick_hit += int((pred & thick).sum())
        thick_n += int(thick.sum())
    return {
        "thin_recall": thin_hit / max(thin_n, 1),
        "thick_recall": thick_hit / max(thick_n, 1),
        "thin_fraction_of_vessel": thin_n / max(thin_n + thick_n, 1),
    }


def _pick(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(d[k]), 4) for k in METRICS}


# --------------------------------------------------------------------------------------- one config
def run_config(kind: str, crop: int | None, data, args, work: Path) -> dict:
    from policies.config import SFTConfig
    from policies.evaluation import Inference, evaluate_probs, predict_probs
    from policies.sft import train_sft
    from policies.tiny import TinySa2VA

    train, val, test = data
    name = f"{kind}:{crop if crop is not None else 'full'}"
    batch_size = 16 if kind == "cnn" else 4
    torch.manual_seed(args.seed)
    model = PlainCNN() if kind == "cnn" else TinySa2VA()
    # tiny: windows of the training crop (full images: whole image); cnn: whole image (fully convolutional)
    inference = Inference(window=crop if kind == "tiny" else None, overlap=0.25)
    load_before = _load()

    s_step, s_val = calibrate(model, train, val, crop, batch_size, inference, lr=2e-3)
    budget = args.minutes * 60.0
    steps = steps_for_budget(budget, s_step)
    print(f"[{name}] calibrated {s_step:.3f} s/step, {s_val:.2f} s/validation -> {steps} steps", flush=True)

    profile = None
    if kind == "tiny" and not args.no_profile:
        x, y, f, prompts = _train_batch(train, crop, batch_size, np.random.default_rng(7))
        profile = profile_tiny_step(model, x, prompts, y, f)
        print(f"[{name}] profile {profile}", flush=True)

    cfg = SFTConfig(steps=steps, eval_every=max(steps // 4, 1), batch_size=batch_size, lr=2e-3)
    torch.manual_seed(args.seed)
    cpu0 = time.process_time()
    with _ValidationTimer() as vt:
        res = train_sft(
            model,
            train,
            val,
            cfg,
            out_dir=work / name.replace(":", "_"),
            seed=args.seed,
            crop=crop,
            inference=inference,
        )
    cpu_s = time.process_time() - cpu0
    # train_sft's seconds cover the step loop incl. in-loop validation; the last call (final) is outside it
    in_loop_val_s = sum(vt.times[:-1])
    step_s = res.seconds - in_loop_val_s
    model.eval()
    t = time.perf_counter()
    probs = predict_probs(lambda im, pr: model(im, pr), test, inference)
    infer_s = time.perf_counter() - t
    t_best = res.val_best_threshold
    at_05 = evaluate_probs(probs, test, threshold=0.5)
    at_best = evaluate_probs(probs, test, threshold=t_best)
    row = {
        "name": name,
        "model": kind,
        "crop": crop,
        "batch_size": batch_size,
        "params": param_counts(model),
        "steps": res.steps,
        "best_step": res.best_step,
        "train_s": round(res.seconds, 2),
        "train_steps_s": round(step_s, 2),
        "in_loop_val_s": round(in_loop_val_s, 2),
        "in_loop_val_passes": len(vt.times) - 1,
        "train_process_cpu_s": round(cpu_s, 1),
        "s_per_step": round(step_s / res.steps, 4),
        "calibrated_s_per_step": round(s_step, 4),
        "calibrated_s_per_validation": round(s_val, 3),
        "train_pixels_seen_M": round(
            res.steps * batch_size * ((crop * crop) if crop else 565 * 584) / 1e6, 1
        ),
        "val_at_0.5": _pick(res.val),
        "val_history": [
            {"step": int(r["step"]), "loss": round(r["loss"], 4), "dice": round(r["val/dice"], 4)}
            for r in res.history
        ],
        "test": _pick(at_05.mean),
        "test_at_val_best_t": {**_pick(at_best.mean), "threshold": t_best},
        "test_vessel_width_recall_at_val_best_t": {
            k: round(v, 4) for k, v in thin_thick_recall(probs, test, t_best).items()
        },
        "infer_s": round(infer_s, 2),
        "inference": {"window": inference.window, "overlap": inference.overlap, "scale": inference.scale},
        "profile_one_step": profile,
        "loadavg_before": load_before,
        "loadavg_after": _load(),
    }
    print(
        f"[{name}] steps {res.steps} train {res.seconds:.1f}s test dice@0.5 {row['test']['dice']:.4f} "
        f"dice@{t_best} {row['test_at_val_best_t']['dice']:.4f} cldice {row['test']['cldice']:.4f} "
        f"infer {infer_s:.1f}s",
        flush=True,
    )
    return row


def _parse_configs(text: str) -> list[tuple[str, int | None]]:
    out = []
    for item in text.split(","):
        kind, _, crop = item.strip().partition(":")
        if kind not in ("tiny", "cnn"):
            raise SystemExit(f"unknown model {kind!r} in --configs (tiny | cnn)")
        out.append((kind, None if crop in ("", "full", "none", "None") else int(crop)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="train_sft wall-time budget per config")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (at most 2 on this machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="comma list of tiny:<crop>|tiny:full|cnn:<crop>"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the per-module step profile")
    parser.add_argument("--json", default=str(harness.result_path("crop_quality")))
    args = parser.parse_args()
    torch.set_num_threads(min(args.threads, 2))

    from envs.datasets import load_dataset
    from envs.folders import write_dataset_folder

    configs = _parse_configs(args.configs)
    load_start = _load()
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crop_quality_") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        root = write_dataset_folder("drive", tmp / "drive", n_train=20, n_test=20, seed=args.seed)
        # materialised: every config trains from decoded arrays (no LRU-cache misses inside the budget)
        train = list(load_dataset("drive", root, split="train", val_fraction=0.2))
        val = list(load_dataset("drive", root, split="val", val_fraction=0.2))
        test = list(load_dataset("drive", root, split="test"))
        data_s = time.perf_counter() - t
        print(f"data: {len(train)} train / {len(val)} val / {len(test)} test in {data_s:.1f}s", flush=True)
        rows = [run_config(kind, crop, (train, val, test), args, tmp / "runs") for kind, crop in configs]

    best = max(rows, key=lambda r: r["test_at_val_best_t"]["dice"])
    machine = harness.machine()
    out = {
        "setup": {
            "machine": {  # as first recorded; the result's own "machine" block has the same
                "platform": machine["platform"],
                "processor": machine["arch"],
                "cpu_count": machine["cpus"],
                "note": "2 cores shared with other work: timings (and so step counts) are noisy; "
                "see loadavg_* here and per row",
            },
            "python": machine["python"],
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "budget_minutes_per_config": args.minutes,
            "budget_rule": "steps = round(budget / s_per_step), s_per_step the median of 5 calibration steps "
            "(after 1 warm-up) on a throw-away copy; the budget covers optimiser steps only: train_s is "
            "train_sft's wall time incl. in-loop validation (every max(steps//4,1) steps, 4 val images), "
            "train_steps_s = train_s - in_loop_val_s is what the budget targets",
            "seed": args.seed,
            "dataset": {
                "layout": "drive (synthetic, envs.folders.write_dataset_folder, seed 0)",
                "image_size_wxh": [565, 584],
                "n_train": len(train),
                "n_val": len(val),
                "n_test": len(test),
                "val_fraction": 0.2,
            },
            "sft": {
                "lr": 2e-3,
                "optimizer": "AdamW, warm-up steps//20 then cosine to 0",
                "loss": "seg_loss bce 2.0 + dice 0.5, FOV-masked",
                "flips": "random h/v",
                "crop_min_fov": 0.5,
            },
            "evaluation": "20 test images at native resolution, FOV-aware; tiny: sliding windows of the "
            "training crop, overlap 0.25 (full: whole image); cnn: whole image; threshold 0.5 and the "
            "val-best threshold of the best-val checkpoint",
            "data_s": round(data_s, 2),
            "total_s": round(time.perf_counter() - t_all, 1),
            "loadavg_start": load_start,
            "loadavg_end": _load(),
        },
        "rows": rows,
        "best": best["name"],
    }
    harness.write_result("crop_quality", out, args.json, machine_block=machine)
    print(
        json.dumps(
            {
                "best": out["best"],
                "rows": [
                    {k: r[k] for k in ("name", "steps", "train_s", "test", "test_at_val_best_t", "infer_s")}
                    for r in rows
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
