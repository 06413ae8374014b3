"""Speed of the GT reward on one CPU core: whole-image and tiled scoring.

Measures the median wall time (ms) of

* ``score``            one 512x512 prediction against a prepared target (the acceptance bar: <= 20 ms),
* ``call``             the unprepared call ``reward(pred, gt, fov)`` at 512x512 (prepares the GT each time),
* ``prepare_target``   the GT side alone at 512x512,
* ``score_tiles``      K=8 predictions at 256x256 with 16x16 tiles (acceptance bar: <= 100 ms),

on realistic masks: the synthetic fundus generator's vessel masks when ``envs.synthetic`` is importable,
otherwise random thick and thin lines drawn with ``skimage.draw``; predictions are perturbed copies
(vessel breaks, false-positive blobs, boundary jitter). Writes JSON and prints it.

    python benchmarks/reward_speed.py --repeats 30
"""

from __future__ import annotations

import os

# One core: set before numpy/scipy load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import skimage  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.draw import disk, line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.rewards import MultiObjectiveReward, RewardConfig  # noqa: E402

TARGET_SCORE_MS = 20.0
TARGET_TILED_MS = 100.0


def _pin_one_core() -> bool:
    """Pin this process to one CPU where the OS allows it (Linux); returns whether it did."""
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        return False
    return True


def line_mask(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fallback GT: random polylines, a few thick (dilated) and many thin, inside a circular FOV."""
    m = np.zeros((size, size), dtype=bool)
    for n_lines, width in ((6, 3), (12, 1), (30, 0)):
        for _ in range(n_lines):
            pts = rng.integers(0, size, size=(4, 2))
            seg = np.zeros_like(m)
            for (r0, c0), (r1, c1) in itertools.pairwise(pts):
                rr, cc = line(int(r0), int(c0), int(r1), int(c1))
                seg[rr, cc] = True
            m |= ndi.binary_dilation(seg, iterations=width) if width else seg
    fov = np.zeros_like(m)
    fov[disk((size / 2, size / 2), 0.475 * size, shape=m.shape)] = True
    return m & fov, fov


def gt_mask(size: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(gt, fov, source): synthetic fundus masks when available, else random lines."""
    try:
        from envs.synthetic import generate_fundus

        s = generate_fundus(seed, size)
        return s.mask, s.fov, "envs.synthetic.generate_fundus"
    except Exception:  # the generator is optional here (it may not exist yet or may fail): fall back
        m, f = line_mask(size, np.random.default_rng(seed))
        return m, f, "skimage.draw random lines"


def perturb(gt: np.ndarray, fov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect prediction: a few vessel breaks, false-positive blobs, boundary jitter."""
    h, w = gt.shape
    p = gt.copy()
    for _ in range(max(2, h // 64)):  # cut vessels with small square holes
        r, c = rng.integers(0, h - 4), rng.integers(0, w - 4)
        p[r : r + 4, c : c + 4] = False
    for _ in range(max(4, h // 32)):  # spurious blobs
        p[disk(tuple(rng.integers(0, h, 2)), float(rng.uniform(1, 3.5)), shape=p.shape)] = True
    # Jitter thick vessels only (thinning a 1-px vessel would shatter it): grow into the outer ring,
    # shrink from the inner boundary of parts that survive an erosion.
    core = ndi.binary_erosion(gt)
    outer = ndi.binary_dilation(gt) & ~gt
    inner = gt & ~core & ndi.binary_dilation(core)
    p |= outer & (rng.random(gt.shape) < 0.2)
    p &= ~(inner & (rng.random(gt.shape) < 0.2))
    return p & fov


def timeit(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    fn()  # warm-up (imports, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3),
        "min_ms": round(times[0], 3),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30, help="timed repetitions per measurement")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/reward_speed.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pinned = _pin_one_core()
    rng = np.random.default_rng(args.seed)
    reward = MultiObjectiveReward(RewardConfig())

    # 1. Whole image, 512x512.
    gt, fov, source = gt_mask(512, args.seed)
    pred = perturb(gt, fov, rng)
    target = reward.prepare_target(gt, fov)
    results = {
        "score_512": timeit(lambda: reward.score(pred, target), args.repeats),
        "call_512": timeit(lambda: reward(pred, gt, fov), args.repeats),
        "prepare_target_512": timeit(lambda: reward.prepare_target(gt, fov), args.repeats),
    }
    # 2. Tiles: K=8 samples against one 256x256 GT.
    gt2, fov2, _ = gt_mask(256, args.seed + 1)
    preds = np.stack([perturb(gt2, fov2, rng) for _ in range(8)])
    target2 = reward.prepare_target(gt2, fov2)
    results["score_tiles_k8_256_t16"] = timeit(
        lambda: reward.score_tiles(preds, target2, tile=16), args.repeats
    )

    example = reward.score(pred, target)
    report = {
        "benchmark": "reward_speed",
        "mask_source": source,
        "gt_vessel_fraction_512": round(float(gt[fov].mean()), 4),
        "example_reward_512": {
            "total": round(example.total, 4),
            **{k: round(v, 4) for k, v in example.components.items()},
        },
        "results": results,
        "targets_ms": {"score_512": TARGET_SCORE_MS, "score_tiles_k8_256_t16": TARGET_TILED_MS},
        "meets_targets": {
            "score_512": results["score_512"]["median_ms"] <= TARGET_SCORE_MS,
            "score_tiles_k8_256_t16": results["score_tiles_k8_256_t16"]["median_ms"] <= TARGET_TILED_MS,
        },
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-image": skimage.__version__,
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "pinned_to_one_core": pinned,
            "threads_env": {v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
