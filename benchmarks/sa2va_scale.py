"""Real Sa2VA shapes at random init on this machine: parameters by part, what a weight sync moves, and the cost
of encode / rollout / learner step for one image -> JSON.

    .venv/bin/python benchmarks/sa2va_scale.py [--shapes 1b] [--count-only 4b] [--remote DIR] [--json PATH]

The model is Sa2VA's own remote code (``--remote``, default ``../shared/sa2va_remote`` or
``$RAYSYS_SA2VA_REMOTE``) built by ``policies.sa2va_random`` with the release's sizes (1b: InternViT-300M +
Qwen2.5-0.5B; 4b: InternViT-300M + Qwen2.5-3B; SAM2 Hiera-L in both), wrapped by the project's adapter and
LoRA (r=8 on the LLM, text_hidden_fcs and the mask decoder trained). ``--count-only`` shapes are built on the
meta device: parameter and byte counts only, no memory, no timing. Times are wall-clock medians; peak memory is
the process's resident-set growth over the step (CPU) or ``max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import harness
import numpy as np
import torch

PROMPT = "Please segment the blood vessels."
MIB = 2**20


# ------------------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device, out: dict[str, float]):
    """``out["peak_mib"]``: CUDA max_memory_allocated over the block, or on CPU the resident-set growth
    (sampled every 5 ms) above its level at entry."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield
        torch.cuda.synchronize(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - start) / MIB
        return
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        out["peak_mib"] = (peak[0] - base) / MIB


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Median and min wall time of ``repeats`` calls of ``fn`` after one warm-up call, and their peak memory."""
    fn()
    times = []
    mem: dict[str, float] = {}
    peaks = []
    for _ in range(repeats):
        with peak_memory(device, mem):
            t = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t)
        peaks.append(mem["peak_mib"])
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "repeats": repeats,
        "peak_mib": max(peaks),
    }


# ------------------------------------------------------------------------------------------------ counting
PARTS = {
    "vision_model": "vision (InternViT)",
    "mlp1": "vision projector (mlp1)",
    "language_model": "LLM (Qwen2)",
    "text_hidden_fcs": "text_hidden_fcs",
    "grounding_encoder.sam2_model.image_encoder": "SAM2 image encoder",
    "grounding_encoder.sam2_model.sam_mask_decoder": "SAM2 mask decoder",
    "grounding_encoder.sam2_model.sam_prompt_encoder": "SAM2 prompt encoder",
}


def params_by_part(remote: torch.nn.Module) -> dict[str, int]:
    counts = dict.fromkeys(PARTS, 0)
    counts["other"] = 0
    for name, p in remote.named_parameters():
        part = next((k for k in PARTS if name.startswith(k + ".")), "other")
        counts[part] += p.numel()
    return counts


def lora_policy(model: Any, r: int):
    from policies.lora import LoRASpec
    from policies.policy import AdapterPolicy

    torch.manual_seed(0)
    return AdapterPolicy(model, LoRASpec(backbone=model.backbone, r=r, alpha=2 * r))


def counts(remote: torch.nn.Module, tokenizer: Any, r: int, dtype: torch.dtype) -> dict[str, Any]:
    """Parameter counts and bytes (a weight sync moves the trainable tensors, float32)."""
    from policies.sa2va import Sa2VAModel

    by_part = params_by_part(remote)
    total = sum(by_part.values())
    model = Sa2VAModel.from_modules(remote, tokenizer)
    policy = lora_policy(model, r)
    trainable = dict(policy.named_trainable_parameters())
    lora = sum(p.numel() for n, p in trainable.items() if ".lora_" in n)
    heads = sum(p.numel() for n, p in trainable.items() if ".lora_" not in n)
    sync = sum(p.numel() * 4 for p in trainable.values())  # synced as float32
    model_bytes = total * torch.tensor([], dtype=dtype).element_size()
    return {
        "params_total": total,
        "params_by_part": by_part,
        "trainable_params": lora + heads,
        "trainable_lora_params": lora,
        "trainable_head_params": heads,
        "lora_r": r,
        "sync_bytes": sync,
        "model_bytes": model_bytes,
        "model_dtype": str(dtype).replace("torch.", ""),
        "sync_fraction_of_model": sync / model_bytes,
        "policy": policy,
    }


# ------------------------------------------------------------------------------------------------ one shape
def feature_bytes(features: Any) -> dict[str, int]:
    fpn = sum(level[0].numel() * level.element_size() for level in features.fpn)
    vision = sum(v.numel() * v.element_size() for v in features.vision if v is not None)
    return {"sam2_fpn_bytes": fpn, "vision_bytes": vision, "total_bytes": fpn + vision}


def measure_image(policy: Any, size: tuple[int, int], *, k: int, repeats: int, device: torch.device,
                  cache: bool = True) -> dict[str, Any]:  # fmt: skip
    """encode, rollout (logits + K sampled masks, no grad) and one learner step (logits with grad, K masks'
    log-probabilities, backward) for one image of ``size`` (H, W)."""
    from policies.distributions import mask_log_probs, sample_masks

    h, w = size
    image = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
    encode = timed(lambda: policy.frozen_features(image), device, repeats)
    features = policy.frozen_features(image)
    gen = torch.Generator(device=device).manual_seed(0)
    feats = features if cache else None

    def rollout() -> torch.Tensor:
        with torch.no_grad():
            return sample_masks(policy.mask_logits(image, [PROMPT], features=feats), k=k, generator=gen)

    masks = rollout()
    adv = torch.randn(1, k, device=device)

    def learner_step() -> None:
        policy.model.zero_grad(set_to_none=True)
        logits = policy.mask_logits(image, [PROMPT], features=feats)
        loss = -(mask_log_probs(logits, masks) * adv).mean() / (h * w)
        loss.backward()

    roll, step = timed(rollout, device, repeats), timed(learner_step, device, repeats)
    return {
        "image_hw": [h, w],
        "tiles": int(features.vision[0].shape[0] // 256) if features.vision[0] is not None else None,
        "image_tokens": int(features.vision[0].shape[0]) if features.vision[0] is not None else None,
        "feature_cache": cache,
        "encode": encode,
        "cached_features": feature_bytes(features),
        "rollout_k_masks": roll,
        "learner_step_k_masks": step,
        "rollout_masks_per_s": k / roll["median_s"],
        "learner_steps_per_s": 1.0 / step["median_s"],
        "k": k,
    }


def build(shape: str, remote_dir: Path, *, meta: bool = False):
    from policies.sa2va_random import build_model

    folder = Path(tempfile.mkdtemp(prefix=f"sa2va_{shape}_"))
    if meta:  # parameters on the meta device; other tensors (the remote code calls .item()) stay real
        from accelerate import init_empty_weights

        with init_empty_weights():
            return build_model(remote_dir, folder, shape)
    return build_model(remote_dir, folder, shape)


def run_shape(shape: str, remote_dir: Path, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:  # fmt: skip
    t = time.perf_counter()
    remote, tokenizer = build(shape, remote_dir)
    built_s = time.perf_counter() - t
    remote.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        remote.text_hidden_fcs.float()
        remote.grounding_encoder.sam2_model.sam_mask_decoder.float()
    row = counts(remote, tokenizer, args.lora_r, dtype)
    policy = row.pop("policy")
    row["build_s"] = built_s
    row["images"] = []
    for size in args.image_sizes:
        for cache in args.cache:
            row["images"].append(
                measure_image(policy, size, k=args.k, repeats=args.repeats, device=device, cache=cache)
            )
            print(json.dumps({"shape": shape, **row["images"][-1]}), flush=True)
    return row


def count_shape(shape: str, remote_dir: Path, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    remote, tokenizer = build(shape, remote_dir, meta=True)
    row = counts(remote, tokenizer, args.lora_r, dtype)
    row.pop("policy")
    row["images"] = "not measured (meta device: counts only)"
    return row


def parse_size(text: str) -> tuple[int, int]:
    h, w = text.lower().split("x")
    return int(h), int(w)


def arguments(argv: list[str] | None = None, *, json_default: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["1b"], help="shapes to build and time")
    parser.add_argument("--count-only", nargs="*", default=["4b"], help="shapes to count on the meta device")
    parser.add_argument(
        "--remote", default=str(harness.SA2VA_REMOTE), help="folder of Sa2VA's remote-code files"
    )
    parser.add_argument("--image-sizes", nargs="*", type=parse_size, default=[(584, 565), (1024, 1024)],
                        help="HxW; 584x565 is DRIVE's size (1 InternVL tile), 1024x1024 gives 9 tiles + thumbnail")  # fmt: skip
    parser.add_argument("--cache", nargs="*", type=lambda s: s.lower() in ("1", "true", "on"), default=[True],
                        help="frozen-feature cache on/off for rollout and learner steps")  # fmt: skip
    parser.add_argument("--k", type=int, default=8, help="sampled masks per image")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up call")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", default=json_default)
    return parser.parse_args(argv)


def run_context(device: torch.device, machine: dict[str, Any]) -> dict[str, Any]:
    """The device the figures were measured on and the libraries that ran (``device`` is what
    scale_model.py reads from sa2va_gpu.json); the other keys as first recorded."""
    import transformers

    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({machine['cpus']} cores)",
        "torch_threads": torch.get_num_threads(),
        "platform": machine["platform"],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None, *, device: str = "cpu", name: str = "sa2va_scale") -> int:
    args = arguments(argv, json_default=str(harness.result_path(name)))
    remote_dir = Path(args.remote)
    if not (remote_dir / "modeling_sa2va_chat.py").is_file():
        print(
            f"Sa2VA's remote code is not at {remote_dir}: pass --remote or set RAYSYS_SA2VA_REMOTE",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(device)
    dtype = getattr(torch, args.dtype)
    shapes: dict[str, Any] = {}
    for shape in args.shapes:
        shapes[shape] = run_shape(shape, remote_dir, args, dev, dtype)
    for shape in args.count_only:
        if shape not in shapes:
            shapes[shape] = count_shape(shape, remote_dir, args, torch.bfloat16)
    first = shapes.get("1b") or next(iter(shapes.values()))
    machine = harness.machine()
    out = {
        **run_context(dev, machine),
        "dtype": args.dtype,
        "shape_of_top_level_keys": "1b" if "1b" in shapes else next(iter(shapes)),
        "params_total": first["params_total"],
        "trainable_params": first["trainable_params"],
        "sync_bytes": first["sync_bytes"],
        "model_bytes": first["model_bytes"],
        "shapes": shapes,
    }
    harness.write_result(name, out, args.json, machine_block=machine)
    print(json.dumps({k: v for k, v in out.items() if k != "shapes"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
