"""Real Sa2VA shapes at random init on this machine: parameters by part, what a weight sync moves, and the cost
of encode / rollout / learner step, one image per call and batched -> JSON.

    .venv/bin/python benchmarks/sa2va_scale.py [--shapes 1b] [--count-only 4b] [--batch-sizes 1 4 16]
                                               [--remote DIR] [--json PATH]

The model is Sa2VA's own remote code (``--remote``, default ``../shared/sa2va_remote`` or
``$RAYSYS_SA2VA_REMOTE``) built by ``policies.sa2va_random`` with the release's sizes (test: 2-layer toy LLM and
ViT; 1b: InternViT-300M + Qwen2.5-0.5B; 4b: InternViT-300M + Qwen2.5-3B; SAM2 Hiera-L in all), wrapped by the
project's adapter and LoRA (r=8 on the LLM, text_hidden_fcs and the mask decoder trained). ``--count-only``
shapes are built on the meta device: parameter and byte counts only, no memory, no timing. Times are wall-clock
medians; peak memory is the process's resident-set growth over the step (CPU) or ``max_memory_allocated``
growth (CUDA).

Rows: ``shapes[shape]["images"]`` holds one image per call for each ``--cache`` value (feature cache on/off,
with the encode timed), as before the batch axis existed; ``shapes[shape]["batched"]`` holds the batch axis,
B = each of ``--batch-sizes`` (1 included if listed, so that it is measured beside the others) images per call
with the cache on: one LLM forward and one mask-decoder call over B images. The B rows reuse one image's cached
features (B different images of that size cost the same). A batch of more image tokens (B x tiles x 256) than
``--max-batch-image-tokens``, or one left when ``--time-budget-s`` is spent, is recorded as skipped. An
existing JSON keeps its rows: a re-measured (shape, image, cache, batch size, dtype) replaces its row (a skip
never replaces a measurement), and the file is rewritten after every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import harness
import numpy as np
import torch

PROMPT = "Please segment the blood vessels."
MIB = 2**20
STARTED = time.monotonic()
"""``--time-budget-s`` counts from here (the module's import), across every ``main`` call of one process."""


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


def timed_calls(calls: dict[Any, Callable[[], Any]], device: torch.device, repeats: int, *,
                warmup: bool = True) -> dict[Any, dict[str, float]]:  # fmt: skip
    """Median and min wall time of ``repeats`` calls of each function, and their peak memory. The calls are
    interleaved (one round = each function once), so a burst of load on a shared machine falls on all of them
    rather than on one; one warm-up call each first unless ``warmup`` is False."""
    if warmup:
        for fn in calls.values():
            fn()
    times: dict[Any, list[float]] = {key: [] for key in calls}
    peaks: dict[Any, list[float]] = {key: [] for key in calls}
    mem: dict[str, float] = {}
    for _ in range(repeats):
        for key, fn in calls.items():
            with peak_memory(device, mem):
                t = time.perf_counter()
                fn()
                _sync(device)
                times[key].append(time.perf_counter() - t)
            peaks[key].append(mem["peak_mib"])
    return {
        key: {
            "median_s": statistics.median(times[key]),
            "min_s": min(times[key]),
            "repeats": repeats,
            "peak_mib": max(peaks[key]),
        }
        for key in calls
    }


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """:func:`timed_calls` of one function."""
    return timed_calls({0: fn}, device, repeats)[0]


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
    matmul = llm_matmul_params(remote)
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
        "llm_matmul_params": matmul,
        "policy": policy,
    }


# ------------------------------------------------------------------------------------------------ FLOPs
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
"""Dense bf16 peak (no sparsity) by device-name substring, first match; ``--peak-tflops`` overrides."""
MFU_FORMULA = (
    "llm_flops_per_forward = 2 x N x T x B, N = llm_matmul_params (the language model without its input "
    "embeddings, LM head and LoRA), T = tokens_per_row (image tokens + templated prompt + answer), B = batch "
    "size; a learner step counts 3 x that (forward + backward). Not counted: attention scores, the mask decoder, "
    "text_hidden_fcs, LoRA, the cached encoders. mfu = FLOPs / median time / peak_tflops."
)


def llm_matmul_params(remote: torch.nn.Module) -> int:
    """Parameters every LLM token is multiplied with: the language model without its input embeddings and LM
    head (embeddings are a lookup; the adapter never runs the head)."""
    lm = remote.language_model
    skip = {id(p) for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None
            for p in m.parameters()}  # fmt: skip
    return sum(p.numel() for n, p in lm.named_parameters() if id(p) not in skip and ".lora_" not in n)


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------------------------ one shape
def feature_bytes(features: Any) -> dict[str, int]:
    fpn = sum(level[0].numel() * level.element_size() for level in features.fpn)
    vision = sum(v.numel() * v.element_size() for v in features.vision if v is not None)
    return {"sam2_fpn_bytes": fpn, "vision_bytes": vision, "total_bytes": fpn + vision}


def prepare(policy: Any, image: np.ndarray, features: Any, *, batch: int, k: int, device: torch.device,
            cache: bool = True) -> dict[str, Callable[[], Any]]:  # fmt: skip
    """The calls timed for ``batch`` copies of ``image``: ``rollout`` (their logits in one call + K sampled masks
    each, no grad), ``learner_step`` (the same logits with grad, the K masks' log-probabilities, backward) and,
    with the cache, ``llm_forward`` (the rollout's LLM part alone). Without the cache the encoders run inside."""
    from policies.distributions import mask_log_probs, sample_masks

    images = np.repeat(image, batch, axis=0)
    h, w = image.shape[1:3]
    feats = type(features).cat([features] * batch) if cache else None
    prompts = [PROMPT] * batch
    gen = torch.Generator(device=device).manual_seed(0)

    def rollout() -> torch.Tensor:
        with torch.no_grad():
            return sample_masks(policy.mask_logits(images, prompts, features=feats), k=k, generator=gen)

    masks = rollout()
    adv = torch.randn(batch, k, device=device)

    def learner_step() -> None:
        policy.model.zero_grad(set_to_none=True)
        logits = policy.mask_logits(images, prompts, features=feats)
        loss = -(mask_log_probs(logits, masks) * adv).mean() / (h * w)
        loss.backward()

    def llm_forward() -> None:
        with torch.no_grad():
            policy.base.seg_hidden_states(feats, prompts)

    calls = {"rollout": rollout, "learner_step": learner_step}
    return {**calls, "llm_forward": llm_forward} if cache else calls


def rates(t: dict[str, dict[str, float]], *, batch: int, k: int, cache: bool) -> dict[str, Any]:
    """A row's timings (``prepare``'s call names -> :func:`timed_calls` entries) and rates from the medians."""
    roll, step = t["rollout"], t["learner_step"]
    llm = (
        {"llm_forward": t["llm_forward"], "llm_rows_per_s": batch / t["llm_forward"]["median_s"]}
        if cache
        else {}
    )
    return {
        "batch_size": batch,
        "feature_cache": cache,
        **llm,
        "rollout_k_masks": roll,
        "learner_step_k_masks": step,
        "rollout_masks_per_s": batch * k / roll["median_s"],
        "learner_steps_per_s": 1.0 / step["median_s"],
        "learner_images_per_s": batch / step["median_s"],
        "k": k,
    }


def with_flops(row: dict[str, Any], matmul_params: int, peak: float | None) -> dict[str, Any]:
    flops = 2.0 * matmul_params * row["tokens_per_row"] * row["batch_size"]
    row["llm_flops_per_forward"] = flops
    row["mfu_rollout"] = flops / row["rollout_k_masks"]["median_s"] / (peak * 1e12) if peak else None
    row["mfu_learner"] = 3 * flops / row["learner_step_k_masks"]["median_s"] / (peak * 1e12) if peak else None
    return row


def build(shape: str, remote_dir: Path, *, meta: bool = False):
    from policies.sa2va_random import build_model

    folder = Path(tempfile.mkdtemp(prefix=f"sa2va_{shape}_"))
    if meta:  # parameters on the meta device; other tensors (the remote code calls .item()) stay real
        from accelerate import init_empty_weights

        with init_empty_weights():
            return build_model(remote_dir, folder, shape)
    return build_model(remote_dir, folder, shape)


def run_shape(shape: str, remote_dir: Path, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype, results: Results) -> None:  # fmt: skip
    """Build ``shape``, then per image size: encode, one image per call (cache on/off: ``images``), then the
    batch axis (cache on: ``batched``; its batch size 1 is measured again beside the others, same conditions)."""
    t = time.perf_counter()
    remote, tokenizer = build(shape, remote_dir)
    built_s = time.perf_counter() - t
    remote.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        remote.text_hidden_fcs.float()
        remote.grounding_encoder.sam2_model.sam_mask_decoder.float()
    info = counts(remote, tokenizer, args.lora_r, dtype)
    policy = info.pop("policy")
    results.set_shape(shape, {**info, "build_s": built_s})
    peak = peak_tflops(device, args.dtype, args.peak_tflops)
    matmul = info["llm_matmul_params"]

    def out_of_time() -> str | None:
        spent = time.monotonic() - STARTED
        if args.time_budget_s and spent > args.time_budget_s:
            return f"time budget: {spent:.0f} s spent of --time-budget-s {args.time_budget_s:.0f}"
        return None

    for h, w in args.image_sizes:
        image = np.random.default_rng(0).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        encode = None
        if args.cache:  # timed for the one-image rows only (a SAM2 encode takes ~20 s on 2 CPU cores)
            encode = timed(lambda image=image: policy.frozen_features(image), device, args.repeats)
        features = policy.frozen_features(image)
        n_image = int(features.vision[0].shape[0])
        common = {
            "image_hw": [h, w],
            "tiles": n_image // 256,
            "image_tokens": n_image,
            "tokens_per_row": int(policy.base.prompt_layout(PROMPT, n_image).ids.size),
            "dtype": args.dtype,
            "cached_features": feature_bytes(features),
        }
        for cache in args.cache:
            if skip := out_of_time():
                results.add(
                    shape, "images", {**common, "batch_size": 1, "feature_cache": cache, "skipped": skip}
                )
                continue
            calls = prepare(policy, image, features, batch=1, k=args.k, device=device, cache=cache)
            row = rates(timed_calls(calls, device, args.repeats), batch=1, k=args.k, cache=cache)
            results.add(shape, "images", with_flops({**common, "encode": encode, **row}, matmul, peak))
        # the batch axis: every batch size prepared and warmed up (a batch that does not fit fails here), then
        # timed in interleaved rounds
        ready: dict[int, dict[str, Callable[[], Any]]] = {}
        for batch in args.batch_sizes:
            skip = out_of_time()
            if args.max_batch_image_tokens and batch * n_image > args.max_batch_image_tokens:
                skip = f"{batch} x {n_image} image tokens > --max-batch-image-tokens {args.max_batch_image_tokens}"
            if skip is None:
                try:
                    calls = prepare(policy, image, features, batch=batch, k=args.k, device=device)
                    for fn in calls.values():
                        fn()
                    ready[batch] = calls
                except torch.OutOfMemoryError as exc:  # recorded; smaller batches and other shapes may fit
                    skip = f"out of memory: {str(exc)[:200]}"
            policy.model.zero_grad(set_to_none=True)
            # outside the except block, whose traceback holds the failed step's tensors
            if skip is not None:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                results.add(
                    shape, "batched", {**common, "batch_size": batch, "feature_cache": True, "skipped": skip}
                )
        if ready:
            flat = {(b, name): fn for b, calls in ready.items() for name, fn in calls.items()}
            t = timed_calls(flat, device, args.repeats, warmup=False)
            policy.model.zero_grad(set_to_none=True)
            for batch in ready:
                row = rates(
                    {name: t[(batch, name)] for name in ready[batch]}, batch=batch, k=args.k, cache=True
                )
                results.add(shape, "batched", with_flops({**common, **row}, matmul, peak))
        ready.clear()
    if device.type == "cuda":  # the shape's tensors go when this returns; the next shape needs the room
        torch.cuda.empty_cache()


def count_shape(shape: str, remote_dir: Path, args: argparse.Namespace, dtype: torch.dtype) -> dict[str, Any]:
    remote, tokenizer = build(shape, remote_dir, meta=True)
    row = counts(remote, tokenizer, args.lora_r, dtype)
    row.pop("policy")
    return row


# ------------------------------------------------------------------------------------------------ the JSON file
ROW_KEY = ("image_hw", "feature_cache", "batch_size", "dtype")
MACHINE_KEYS = ("device", "torch_threads", "platform", "torch", "transformers", "load_average")


class Results:
    """The JSON file: earlier rows are kept (stamped with the run that measured them), a re-measured row
    (same shape, list and :data:`ROW_KEY`) replaces its old one, and the file is rewritten after every row so
    an interrupted run leaves what it measured."""

    def __init__(self, path: Path, name: str, run: dict[str, Any], summary_shape: str) -> None:
        self.path, self.summary_shape = path, summary_shape
        old = json.loads(path.read_text()) if path.is_file() else {}
        self.data: dict[str, Any] = {"benchmark": name, **old}
        runs = self.data.setdefault("runs", {})
        if (
            old and "runs" not in old
        ):  # a file from before runs were recorded: its top level described its rows
            runs["earlier"] = {k: old[k] for k in (*MACHINE_KEYS, "dtype") if k in old}
            for entry in old.get("shapes", {}).values():
                for row in entry.get("images", []) if isinstance(entry.get("images"), list) else []:
                    row.setdefault("batch_size", 1)
                    row.setdefault("dtype", old.get("dtype"))
                    row.setdefault("run", "earlier")
        self.run_id = run["date"]
        runs[self.run_id] = run
        self.data.update({k: run[k] for k in MACHINE_KEYS if k in run})
        self.data.pop("dtype", None)  # per row now
        self.data.setdefault("shapes", {})

    def set_shape(self, shape: str, info: dict[str, Any]) -> None:
        entry = self.data["shapes"].setdefault(shape, {})
        entry.update(info)
        self.data.get("skipped_shapes", {}).pop(shape, None)
        for rows in ("images", "batched"):
            if not isinstance(entry.get(rows), list):
                entry[rows] = []
        self.save()

    def set_counted(self, shape: str, info: dict[str, Any]) -> None:
        entry = self.data["shapes"].setdefault(shape, {})
        entry.update(info)
        if not entry.get("images"):
            entry["images"] = "not measured (meta device: counts only)"
        self.save()

    def add(self, shape: str, rows: str, row: dict[str, Any]) -> None:
        row = {**row, "run": self.run_id}
        key = [row.get(k) for k in ROW_KEY]
        table = self.data["shapes"][shape][rows]
        same = [r for r in table if [r.get(k) for k in ROW_KEY] == key]
        if "skipped" in row and any("skipped" not in r for r in same):
            return  # a skip does not wipe an earlier measurement of the same row
        table[:] = [r for r in table if r not in same] + [row]
        print(
            json.dumps({"shape": shape, **{k: v for k, v in row.items() if k != "cached_features"}}),
            flush=True,
        )
        self.save()

    def save(self) -> None:
        measured = [
            n for n, e in self.data["shapes"].items() if isinstance(e.get("images"), list) and e["images"]
        ]
        shape = "1b" if "1b" in measured else self.summary_shape  # 1B's figures once there are any
        # the load when the last row was written (with "load_average" at the start: how shared the machine was)
        self.data["runs"][self.run_id]["load_average_at_last_row"] = [round(x, 2) for x in os.getloadavg()]
        self.data.update(summary(self.data, shape))
        used = {r.get("run") for e in self.data["shapes"].values() for kind in ("images", "batched")
                if isinstance(e.get(kind), list) for r in e[kind]}  # fmt: skip
        self.data["runs"] = {k: v for k, v in self.data["runs"].items() if k in used or k == self.run_id}
        harness.write_result(self.data["benchmark"], {k: v for k, v in self.data.items() if k != "machine"},
                             self.path)  # fmt: skip


def summary(data: dict[str, Any], shape: str, hw: tuple[int, int] = (584, 565)) -> dict[str, Any]:
    """Top-level keys: the best rollout and learner rows of ``shape`` at ``hw`` (DRIVE) with the cache on, over
    every batch size, their MFU and peak memory, and the batch axis of every measured shape."""
    entry = data["shapes"].get(shape, {})
    rows = [r for kind in ("images", "batched") for r in (entry.get(kind) if isinstance(entry.get(kind), list) else [])
            if "skipped" not in r and r.get("feature_cache") and tuple(r["image_hw"]) == hw]  # fmt: skip
    out: dict[str, Any] = {"summary_of": {"shape": shape, "image_hw": list(hw), "feature_cache": True},
                           "mfu_formula": MFU_FORMULA}  # fmt: skip
    if rows:
        roll = max(rows, key=lambda r: r["rollout_masks_per_s"])
        learn = max(rows, key=lambda r: r.get("learner_images_per_s", r["learner_steps_per_s"]))
        out.update(
            rollout_masks_per_s=roll["rollout_masks_per_s"],
            rollout_batch_size=roll.get("batch_size", 1),
            learner_images_per_s=learn.get("learner_images_per_s", learn["learner_steps_per_s"]),
            learner_batch_size=learn.get("batch_size", 1),
            mfu_rollout=roll.get("mfu_rollout"),
            mfu_learner=learn.get("mfu_learner"),
            rollout_peak_mib=roll["rollout_k_masks"]["peak_mib"],
            learner_peak_mib=learn["learner_step_k_masks"]["peak_mib"],
            summary_dtype=roll.get("dtype"),
            summary_runs={"rollout": roll.get("run"), "learner": learn.get("run")},
        )
    axis: dict[str, Any] = {}
    for name, e in data[
        "shapes"
    ].items():  # batched rows last: at batch size 1 they win (same run as the rest)
        for r in [r for kind in ("images", "batched") if isinstance(e.get(kind), list) for r in e[kind]]:
            if "skipped" in r or not r.get("feature_cache"):
                continue
            size = "x".join(map(str, r["image_hw"]))
            axis.setdefault(name, {}).setdefault(size, {})[str(r["batch_size"])] = {
                "rollout_masks_per_s": round(r["rollout_masks_per_s"], 3),
                "learner_images_per_s": round(r.get("learner_images_per_s", r["learner_steps_per_s"]), 3),
                "llm_rows_per_s": round(r["llm_rows_per_s"], 3) if "llm_rows_per_s" in r else None,
                # from the fastest of the repeats: on a shared CPU the median can catch other jobs' load
                "rollout_masks_per_s_fastest": round(
                    r["batch_size"] * r["k"] / r["rollout_k_masks"]["min_s"], 3
                ),
                "learner_images_per_s_fastest": round(
                    r["batch_size"] / r["learner_step_k_masks"]["min_s"], 3
                ),
                "dtype": r.get("dtype"),
            }
    out["batch_axis"] = axis
    peaks = [r[t]["peak_mib"] for e in data["shapes"].values() for kind in ("images", "batched")
             if isinstance(e.get(kind), list) for r in e[kind] if "skipped" not in r
             for t in ("rollout_k_masks", "learner_step_k_masks")]  # fmt: skip
    out["peak_mib_max"] = max(peaks) if peaks else None
    return out


# ------------------------------------------------------------------------------------------------ CLI
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
                        help="frozen-feature cache on/off for the one-image-per-call rows")  # fmt: skip
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[],
                        help="the batch axis: images per call, feature cache on (none: no batched rows)")  # fmt: skip
    parser.add_argument("--max-batch-image-tokens", type=int, default=0,
                        help="skip batches with more image tokens than this (0: no limit)")  # fmt: skip
    parser.add_argument("--k", type=int, default=8, help="sampled masks per image")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after one warm-up call")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="device peak for MFU (default: bf16 dense peak of a known GPU, none on CPU)")  # fmt: skip
    parser.add_argument("--time-budget-s", type=float, default=0.0,
                        help="skip (and record) the rows and shapes still to measure once the process has run this "
                             "long (0: no limit)")  # fmt: skip
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
        "load_average": [round(x, 2) for x in os.getloadavg()],
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
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **run_context(dev, harness.machine()),
           "argv": list(argv if argv is not None else sys.argv[1:])}  # fmt: skip
    results = Results(
        Path(args.json), name, run, "1b" if "1b" in args.shapes or not args.shapes else args.shapes[0]
    )
    for shape in args.shapes:
        spent = time.monotonic() - STARTED
        if args.time_budget_s and spent > args.time_budget_s:
            print(f"skipping shape {shape}: {spent:.0f} s spent of --time-budget-s {args.time_budget_s:.0f}")
            results.data.setdefault("skipped_shapes", {})[shape] = f"time budget ({spent:.0f} s spent)"
            continue
        run_shape(shape, remote_dir, args, dev, dtype, results)
    for shape in args.count_only:
        if shape not in args.shapes:
            results.set_counted(shape, count_shape(shape, remote_dir, args, torch.bfloat16))
    first = results.data["shapes"].get("1b") or next(iter(results.data["shapes"].values()), {})
    results.data.update({k: first[k] for k in ("params_total", "trainable_params", "sync_bytes", "model_bytes")
                         if k in first})  # fmt: skip
    results.save()
    top = {k: v for k, v in results.data.items() if k not in ("shapes", "runs", "batch_axis")}
    print(json.dumps({**top, "batch_axis": results.data["batch_axis"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
