"""Speed and vessel statistics of the synthetic fundus generator on one CPU core.

Times ``generate_fundus`` (wall and CPU time per image, after one warm-up image) at ``--size`` with
``--n`` images and at 512 px with ``--n // 4`` images, then measures the GT statistics of the same
images with ``vessel_stats`` (not timed). The acceptance bar is >= 4 images/s at 256 px; ~10 is
the aim, so that slower CI machines keep headroom. Writes JSON and prints it.

    python benchmarks/synthetic_speed.py --n 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import harness

TARGET_IMAGES_PER_S_256 = 4.0
STAT_KEYS = ("vessel_fraction_fov", "thin_skeleton_share", "n_components", "skeleton_length")


def bench_size(size: int, n: int, first_seed: int = 0) -> dict:
    """Time ``n`` images of ``size`` px (seeds first_seed..first_seed+n-1) and summarise their GT."""
    from envs.synthetic import generate_fundus, vessel_stats

    generate_fundus(10**9, size)  # warm-up: imports, allocator, caches
    samples = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for seed in range(first_seed, first_seed + n):
        samples.append(generate_fundus(seed, size))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0

    stats = [vessel_stats(s) for s in samples]
    summary = {}
    for key in STAT_KEYS:
        values = [float(st[key]) for st in stats]
        summary[key] = {
            "mean": round(statistics.fmean(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return {
        "n": n,
        "images_per_s": round(n / wall, 2),
        "cpu_images_per_s": round(n / cpu, 2),
        "ms_per_image": round(1000 * wall / n, 1),
        "stats": summary,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="images timed at --size (512 px gets n // 4)")
    parser.add_argument("--size", type=int, default=256, help="main image size in pixels")
    parser.add_argument(
        "--out",
        type=Path,
        default=harness.result_path("synthetic_speed"),
        help="where to write the JSON result",
    )
    args = parser.parse_args(argv)
    if args.n < 4:
        parser.error(f"--n must be >= 4 (512 px is timed with n // 4 images), got {args.n}")

    pinned = harness.one_core()  # before numpy and scipy load (they size their thread pools then)
    import numpy as np
    import scipy
    import skimage

    plan = {args.size: args.n}
    plan.setdefault(512, max(1, args.n // 4))
    results = {f"size_{size}": bench_size(size, n) for size, n in sorted(plan.items())}

    machine = harness.machine()
    report = {
        "target_images_per_s_256": TARGET_IMAGES_PER_S_256,
        "results": results,
        "env": {  # as first recorded; the result's "machine" block has the machine's own
            "python": machine["python"],
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "skimage": skimage.__version__,
            "platform": machine["platform"],
            "processor": machine["arch"],
            "pinned_to_one_core": pinned,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "note": (
            "images_per_s is wall-clock and suffers from other load on the machine; "
            "cpu_images_per_s counts this process's CPU time only."
        ),
    }
    harness.write_result("synthetic_speed", report, args.out, machine_block=machine)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
