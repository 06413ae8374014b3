"""Throughput model for 8, 32 and 128 GPUs from measured per-worker rates -> benchmarks/results/scale_model.json.

    .venv/bin/python benchmarks/scale_model.py [--peak-tflops 989] [--mfu 0.3] [--inter-node-gbps 200]

Nothing here runs a model; it combines what the other benchmarks measured with stated assumptions.

Measured (read from benchmarks/results/):
- ``sa2va_scale.json``: parameters per part of the Sa2VA-1B and -4B shapes, the bytes of one weight sync, and
  CPU seconds of a rollout (one image, K masks, cached encoder features) and of a learner step (the same with
  grad and backward) for Sa2VA-1B at 1 tile (DRIVE 565x584) and 10 tiles (1024x1024 and larger).
- ``sa2va_gpu.json`` where a GPU was lent (``benchmarks/sa2va_gpu.py``): the same seconds on that GPU. They
  replace the modelled GPU seconds below (``gpu_seconds_source`` says which were used).
- ``reward_speed.json``: CPU milliseconds to score one 512x512 mask (whole-image terms) and 8 masks in tiles.
- ``reward_gpu.json`` (``reward_speed.py --throughput`` on a lent H200): milliseconds per TorchReward call on the
  GPU by batch size at 584x565 and 2048x2048 (every term, 16-px tiles), for the GPU-reward case below.

Modelled:
- FLOPs of a rollout: the LLM forward over the image tokens and prompt (2 x params x tokens plus attention),
  the mask decoder, the projector. The learner step costs the measured CPU learner/rollout ratio of those
  FLOPs. GPU seconds = FLOPs / (peak x MFU). The CPU seconds, divided by the same FLOPs, give the rate the
  2-core CPU reached (``cpu_check``): if the FLOP model is right the 1- and 10-tile rates agree.
- Two reward cases. CPU (``predicted``): the reward actors as configured; reward seconds scale with pixels
  from the 512x512 measurement. As ``RayCoordinator`` assigns them, each
  rollout shard is scored in ``ceil(reward actors / rollout workers)`` parts, one reward actor per part, each
  on one core; ``reward_s_spread_over_all_reward_cpus`` is what scoring over every reserved reward CPU would
  take. GPU (``predicted_gpu_reward``, ``reward.device: cuda``): each rollout actor scores its own shard on its
  GPU right after sampling, one call for the shard's K masks per image: the measured milliseconds at that batch
  (linear between measured batches, the smallest batch's latency below them) at the nearest measured size,
  scaled by pixels; no reward actors. That scoring is GPU work and counts as busy.
- A weight sync: rank 0's ``ray.put`` read by every rollout node over the inter-node link; DDP all-reduce of
  the trainable gradients per minibatch step (ring, over the inter-node link when ranks span nodes).

Assumed (flags): H100 bf16 dense peak 989 TFLOP/s, MFU 0.3 (forward-dominated, short sequences), a
200 Gb/s inter-node link, 8 GPUs per node. An iteration in lock step is collect (sample, then score: a
shard's scoring starts when its sampling ends) + update + sync; with ``rollout.max_staleness`` >= 1 it is
the longer of collect and update + sync. GPU utilisation = busy GPU-seconds / (GPUs x iteration time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import harness
import yaml

LLM_SHAPE = {"1b": {"layers": 24, "hidden": 896}, "4b": {"layers": 36, "hidden": 2048}}
"""Qwen2.5-0.5B and -3B (the LLMs of Sa2VA-1B and -4B): layers and width, for the attention FLOPs."""
PROMPT_TOKENS = 48
"""Chat template, prompt and [SEG] around the image tokens."""
DECODER_TOKENS = 64 * 64
"""SAM2 mask decoder: image embedding grid of a 1024x1024 input."""
TOKENS_PER_TILE = 256


def tiles_for(height: int, width: int) -> int:
    """Tiles Sa2VA's InternVL preprocessing makes (448-px tiles, at most 12, plus a thumbnail if > 1)."""
    aspect = width / height
    ratios = sorted({(i, j) for n in range(1, 13) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= 12},
                    key=lambda r: r[0] * r[1])  # fmt: skip
    best, best_diff = (1, 1), math.inf
    for i, j in ratios:
        diff = abs(aspect - i / j)
        if diff < best_diff or (diff == best_diff and height * width > 0.5 * 448 * 448 * i * j):
            best, best_diff = (i, j), diff
    n = best[0] * best[1]
    return n + 1 if n > 1 else 1


def rollout_flops(parts: dict[str, int], shape: str, tiles: int) -> float:
    """One image's rollout with cached encoder features: projector, LLM forward, mask decoder (K masks are K
    Bernoulli draws from the same logits)."""
    tokens = tiles * TOKENS_PER_TILE + PROMPT_TOKENS
    llm = 2 * parts["language_model"] * tokens
    s = LLM_SHAPE[shape]
    attention = 4 * tokens * tokens * s["hidden"] * s["layers"]
    projector = 2 * (parts["mlp1"] * tiles * TOKENS_PER_TILE + parts["text_hidden_fcs"])
    decoder = 2 * parts["grounding_encoder.sam2_model.sam_mask_decoder"] * DECODER_TOKENS
    return float(llm + attention + projector + decoder)


def per_image_seconds(scale: dict, gpu: dict | None, args) -> dict:
    """Rollout and learner-step seconds of one image on one GPU, per (shape, tiles), and how they were got."""
    one = scale["shapes"]["1b"]
    cpu = {im["tiles"]: im for im in one["images"]}
    check = {}
    for tiles, im in cpu.items():
        f = rollout_flops(one["params_by_part"], "1b", tiles)
        check[f"tiles_{tiles}"] = {
            "rollout_cpu_s": im["rollout_k_masks"]["median_s"],
            "learner_cpu_s": im["learner_step_k_masks"]["median_s"],
            "rollout_gflops": f / 1e9,
            "implied_cpu_gflops_per_s": f / 1e9 / im["rollout_k_masks"]["median_s"],
            "learner_over_rollout": im["learner_step_k_masks"]["median_s"]
            / im["rollout_k_masks"]["median_s"],
        }
    rate = args.peak_tflops * 1e12 * args.mfu
    out = {}
    for shape in ("1b", "4b"):
        parts = scale["shapes"][shape]["params_by_part"]
        for tiles in (1, 10):
            ratio = check[f"tiles_{tiles}"]["learner_over_rollout"]
            f = rollout_flops(parts, shape, tiles)
            entry = {"rollout_s": f / rate, "learner_s": ratio * f / rate, "source": "modelled"}
            measured = _gpu_measured(gpu, shape, tiles)
            if measured:
                entry = {**measured, "source": f"measured on {gpu.get('device', 'a GPU')}"}
            out[(shape, tiles)] = entry
    return out, check


def _gpu_measured(gpu: dict | None, shape: str, tiles: int) -> dict | None:
    if not gpu or shape not in gpu.get("shapes", {}):
        return None
    for im in gpu["shapes"][shape].get("images", []):
        if im.get("tiles") == tiles and im.get("feature_cache", True):
            return {
                "rollout_s": im["rollout_k_masks"]["median_s"],
                "learner_s": im["learner_step_k_masks"]["median_s"],
            }
    return None


def reward_seconds_per_mask(reward: dict, pixels: int) -> float:
    """Whole-image terms from the 512x512 score plus the tile terms, scaled by pixels."""
    r = reward["results"]
    whole = r["score_512"]["median_ms"] / 1e3 * pixels / 512**2
    tiles = r["score_tiles_k8_256_t16"]["median_ms"] / 1e3 / 8 * pixels / 256**2
    return whole + tiles


def gpu_reward_seconds(reward_gpu: dict, image_hw: tuple[int, int], masks: int) -> tuple[float, str]:
    """Seconds of one TorchReward call on ``masks`` masks of ``image_hw`` on the measured GPU (reward_gpu.json
    rows of the size nearest in pixels, scaled by pixels), and that size."""
    sizes = {"256": 256 * 256, "584x565": 584 * 565, "2048": 2048 * 2048}
    measured = {r["size"] for r in reward_gpu["rows"] if r["path"] == "cuda"}
    pixels = image_hw[0] * image_hw[1]
    size = min(measured, key=lambda s: abs(math.log(sizes[s] / pixels)))
    rows = sorted(
        (r["batch"], r["ms_per_call"] / 1e3)
        for r in reward_gpu["rows"]
        if r["path"] == "cuda" and r["size"] == size
    )
    if masks <= rows[0][0]:
        sec = rows[0][1]  # a call's latency floor
    elif masks >= rows[-1][0]:
        sec = rows[-1][1] * masks / rows[-1][0]
    else:
        (b0, s0), (b1, s1) = next((a, b) for a, b in itertools.pairwise(rows) if a[0] <= masks <= b[0])
        sec = s0 + (s1 - s0) * (masks - b0) / (b1 - b0)
    return sec * pixels / sizes[size], size


def predict(
    name: str,
    cfg: dict,
    image_hw: tuple[int, int],
    times: dict,
    reward: dict,
    scale: dict,
    args,
    reward_gpu: dict | None = None,
) -> dict:
    """One case's prediction; with ``reward_gpu`` (reward_gpu.json) the rollout actors score on their GPUs."""
    r, rw, lc = cfg["rollout"], cfg["reward"], cfg["learner"]
    shape = "4b" if "4B" in cfg["policy"]["checkpoint"] else "1b"
    tiles = tiles_for(*image_hw)
    t = times[(shape, min((1, 10), key=lambda n: abs(n - tiles)))]
    per_tile = tiles / (1 if tiles <= 1 else 10)  # measured at 1 and 10 tiles; scale linearly in between
    n_roll, n_learn, n_rew = r["num_workers"], lc["num_workers"], 0 if reward_gpu else rw["num_actors"]
    images, k = r["images_per_iteration"], r["samples_per_image"]
    epochs, minibatch = lc.get("epochs", 2), lc.get("minibatch_size", 4)
    gpus = n_roll * r.get("gpus_per_worker", 1) + (n_learn if lc.get("use_gpu") else 0)
    nodes = math.ceil(gpus / args.gpus_per_node)

    shard = math.ceil(images / n_roll)
    sample_s = shard * t["rollout_s"] * per_tile
    if reward_gpu:  # on the rollout GPU, after sampling: one call for the shard
        parts = 0
        reward_s, reward_size = gpu_reward_seconds(reward_gpu, image_hw, shard * k)
    else:
        parts = min(math.ceil(n_rew / n_roll), shard)  # each shard scored in parts by as many reward actors
        parts_per_actor = math.ceil(n_roll * parts / n_rew)
        reward_s = (
            parts_per_actor
            * math.ceil(shard / parts)
            * k
            * reward_seconds_per_mask(reward, image_hw[0] * image_hw[1])
        )
    collect_s = sample_s + reward_s
    images_per_rank = math.ceil(images / n_learn)
    steps = epochs * math.ceil(images_per_rank / minibatch)
    compute_s = epochs * images_per_rank * t["learner_s"] * per_tile
    sync_bytes = scale["shapes"][shape]["sync_bytes"]
    link = args.inter_node_gbps * 1e9 / 8
    learner_nodes = math.ceil(n_learn / args.gpus_per_node)
    allreduce_s = 0.0
    if n_learn > 1:
        bw = link if learner_nodes > 1 else args.intra_node_gbs * 1e9
        allreduce_s = steps * 2 * (n_learn - 1) / n_learn * sync_bytes / bw
    update_s = compute_s + allreduce_s
    rollout_nodes = math.ceil(n_roll / args.gpus_per_node)
    sync_s = rollout_nodes * sync_bytes / link
    lockstep = collect_s + update_s + sync_s
    overlapped = max(collect_s, update_s + sync_s)
    reward_stage = "reward (rollout GPU)" if reward_gpu else "reward (CPU scoring)"
    stages = {"rollout (sampling)": sample_s, reward_stage: reward_s, "learner update": update_s,
              "weight sync": sync_s}  # fmt: skip
    rollout_busy = sample_s + (reward_s if reward_gpu else 0.0)

    def util(iteration: float) -> float:
        return (n_roll * rollout_busy + n_learn * update_s) / (gpus * iteration)

    # A reward actor scores on one core; spreading the masks over every reserved reward CPU is the floor the
    # reward stage could reach.
    masks = images * k
    reward_floor_s = (
        reward_s
        if reward_gpu
        else masks
        * reward_seconds_per_mask(reward, image_hw[0] * image_hw[1])
        / (n_rew * rw.get("cpus_per_actor", 1))
    )
    floor_iteration = max(sample_s + reward_floor_s, update_s + sync_s)
    out = {
        "gpus": gpus,
        "config": name,
        "nodes": nodes,
        "model_shape": f"Sa2VA-{shape.upper()}",
        "image_hw": list(image_hw),
        "tiles": tiles,
        "rollout_workers": n_roll,
        "learner_ranks": n_learn,
        "reward_actors": n_rew,
        "reward_parts_per_shard": parts,
        "images_per_iteration": images,
        "samples_per_image": k,
        "gpu_seconds_source": t["source"],
        "seconds": {
            "sample": sample_s,
            "reward": reward_s,
            "update_compute": compute_s,
            "allreduce": allreduce_s,
            "sync": sync_s,
        },
        "iteration_s_lockstep": lockstep,
        "iteration_s_async": overlapped,
        "gpu_utilisation_lockstep": util(lockstep),
        "gpu_utilisation_async": util(overlapped),
        "bottleneck": max(stages, key=stages.get),
        "masks_per_s_async": masks / overlapped,
        "reward_s_spread_over_all_reward_cpus": reward_floor_s,
        "iteration_s_async_reward_spread": floor_iteration,
        "gpu_utilisation_async_reward_spread": util(floor_iteration),
    }
    out["reward_path"] = (
        f"rollout GPU, one call of {shard * k} masks (measured at {reward_size})"
        if reward_gpu
        else f"{n_rew} CPU reward actors, {parts} part(s) per shard"
    )
    out["gpu_idle_s_per_gpu_async"] = overlapped - (n_roll * rollout_busy + n_learn * update_s) / gpus
    return out


def scaled(cfg: dict, factor: int) -> dict:
    """The config with every worker count and the images per iteration multiplied (more nodes, same shape)."""
    out = json.loads(json.dumps(cfg))
    out["rollout"]["num_workers"] *= factor
    out["learner"]["num_workers"] *= factor
    out["reward"]["num_actors"] *= factor
    out["rollout"]["images_per_iteration"] *= factor
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.3, help="model FLOP utilisation assumed on the GPU")
    parser.add_argument("--inter-node-gbps", type=float, default=200.0, help="inter-node link, Gbit/s")
    parser.add_argument("--intra-node-gbs", type=float, default=300.0, help="NVLink all-reduce, GByte/s")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", default=str(harness.result_path("scale_model")))
    args = parser.parse_args()

    scale, reward, gpu, reward_gpu = (
        harness.read_result(n) for n in ("sa2va_scale", "reward_speed", "sa2va_gpu", "reward_gpu")
    )
    if scale is None or reward is None:
        print("needs benchmarks/results/sa2va_scale.json and reward_speed.json", file=sys.stderr)
        return 2
    times, check = per_image_seconds(scale, gpu, args)
    ex = {p.stem: yaml.safe_load(p.read_text()) for p in (harness.ROOT / "examples").glob("sa2va_*gpu.yaml")}
    cases = [
        ("examples/sa2va_1node_8gpu.yaml (DRIVE)", ex["sa2va_1node_8gpu"], (584, 565)),
        ("examples/sa2va_4node_32gpu.yaml (FIVES)", ex["sa2va_4node_32gpu"], (2048, 2048)),
        (
            "examples/sa2va_4node_32gpu.yaml x4 (16 nodes, FIVES)",
            scaled(ex["sa2va_4node_32gpu"], 4),
            (2048, 2048),
        ),
    ]
    rows = [predict(name, cfg, hw, times, reward, scale, args) for name, cfg, hw in cases]
    gpu_rows = []
    if reward_gpu and reward_gpu.get("rows"):
        gpu_rows = [predict(name, cfg, hw, times, reward, scale, args, reward_gpu) for name, cfg, hw in cases]
    result = {
        "assumptions": {
            "peak_tflops": args.peak_tflops,
            "mfu": args.mfu,
            "inter_node_gbps": args.inter_node_gbps,
            "intra_node_gbs": args.intra_node_gbs,
            "gpus_per_node": args.gpus_per_node,
        },
        "measured_inputs": {
            "sa2va_scale": "benchmarks/results/sa2va_scale.json (CPU, 2 cores)",
            "reward_speed": "benchmarks/results/reward_speed.json (CPU, one core)",
            "sa2va_gpu": "benchmarks/results/sa2va_gpu.json" if gpu else None,
            "reward_gpu": f"benchmarks/results/reward_gpu.json ({reward_gpu['environment']['cuda_device']})"
            if gpu_rows
            else None,
        },
        "cpu_check": check,
        "per_image_gpu_seconds": {f"{s}_tiles{t}": v for (s, t), v in times.items()},
        "predicted": rows,
        "predicted_gpu_reward": gpu_rows,
    }
    harness.write_result("scale_model", result, args.json)
    print(f"{'GPUs':>5} {'reward on':<10} {'bottleneck':<22} {'lock-step s':>11} {'async s':>8} {'util lock':>9} {'util async':>10} "
          f"{'sample':>7} {'reward':>7} {'update':>7} {'sync':>6}")  # fmt: skip
    for r in rows + gpu_rows:
        s = r["seconds"]
        print(f"{r['gpus']:>5} {'GPU' if r in gpu_rows else 'CPU':<10} {r['bottleneck']:<22} {r['iteration_s_lockstep']:>11.2f} {r['iteration_s_async']:>8.2f} "
              f"{r['gpu_utilisation_lockstep']:>9.0%} {r['gpu_utilisation_async']:>10.0%} {s['sample']:>7.2f} "
              f"{s['reward']:>7.2f} {s['update_compute'] + s['allreduce']:>7.2f} {s['sync']:>6.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
