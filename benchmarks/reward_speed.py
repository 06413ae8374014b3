"""Speed of the GT reward: latency on one CPU core (numpy), and masks/s per path (numpy, torch CPU, CUDA).

Latency (default; writes ``reward_speed.json``): median wall time (ms), one CPU core, of

* ``score``            one 512x512 prediction against a prepared target (the acceptance bar: <= 20 ms),
* ``call``             the unprepared call ``reward(pred, gt, fov)`` at 512x512 (prepares the GT each time),
* ``prepare_target``   the GT side alone at 512x512,
* ``score_tiles``      K=8 predictions at 256x256 with 16x16 tiles (acceptance bar: <= 100 ms),

on realistic masks: the synthetic fundus generator's vessel masks when ``envs.synthetic`` is importable,
otherwise random thick and thin lines drawn with ``skimage.draw``; predictions are perturbed copies
(vessel breaks, false-positive blobs, boundary jitter).

Throughput (``--throughput``; writes ``reward_gpu.json`` after every measurement, so a run cut short keeps
what it measured): masks/s of the full reward (Dice, recall, topology, length, clDice, Betti, 16-px tiles)
at 256x256, 584x565 and 2048x2048, for the numpy path on one core, the torch path on one CPU thread and the
torch path on CUDA (batches of 8-256 masks, 8 masks per image), then the torch path on the fastest device
compared bit for bit with numpy (totals, every component, every tile) on >= 500 masks. Masks are synthetic
vessel trees perturbed like sampled masks (flipped pixels, boundary jitter, cuts, specks and blobs). Without
CUDA the GPU keys are null. ``--max-seconds`` bounds the whole run: what does not fit is skipped.

    python benchmarks/reward_speed.py --repeats 30
    python benchmarks/reward_speed.py --throughput --max-seconds 170      # the GPU run (<= 3 minutes)
    python benchmarks/reward_speed.py --throughput --sizes 256 --max-seconds 60  # a quick CPU check
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import harness

if TYPE_CHECKING:  # numpy, scipy and torch load after the thread pools are set to one thread (main)
    import numpy as np

    from envs.rewards import RewardConfig

log = logging.getLogger("reward_speed")

TARGET_SCORE_MS = 20.0
TARGET_TILED_MS = 100.0


def line_mask(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Fallback GT: random polylines, a few thick (dilated) and many thin, inside a circular FOV."""
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.draw import disk, line

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
    import numpy as np

    try:
        from envs.synthetic import generate_fundus

        s = generate_fundus(seed, size)
        return s.mask, s.fov, "envs.synthetic.generate_fundus"
    except Exception:  # the generator is optional here (it may not exist yet or may fail): fall back
        m, f = line_mask(size, np.random.default_rng(seed))
        return m, f, "skimage.draw random lines"


def perturb(gt: np.ndarray, fov: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect prediction: a few vessel breaks, false-positive blobs, boundary jitter."""
    from scipy import ndimage as ndi
    from skimage.draw import disk

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
    ap.add_argument("--repeats", type=int, default=30, help="timed repetitions per latency measurement")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default results/reward_speed.json, "
                    "or results/reward_gpu.json with --throughput)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--throughput", action="store_true", help="masks/s per path instead of the latency")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="throughput sizes")
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 32, 64, 128, 256], help="CUDA batch sizes")
    ap.add_argument("--cpu-batch", type=int, default=8, help="masks per timed call on the CPU paths")
    ap.add_argument("--compare", type=int, default=512, help="masks to compare bit for bit with numpy")
    ap.add_argument("--max-seconds", type=float, default=170.0, help="time budget of a throughput run")
    ap.add_argument(
        "--thinning", default="auto", help="skeleton back-end of the torch path (auto, torch, triton)"
    )
    ap.add_argument("--max-pixels", type=int, default=2**28, help="TorchReward chunk size (pixels)")
    args = ap.parse_args(argv)
    # Thread pools of one thread before numpy, scipy and torch load. The latency also runs on one CPU; the
    # throughput run does not pin (its comparison with numpy uses worker processes on every core).
    if args.throughput:
        for var in harness.ONE_CORE_VARIABLES:
            os.environ[var] = "1"
        return throughput(args)
    return latency(args, pinned=harness.one_core())


def latency(args: argparse.Namespace, *, pinned: bool) -> dict:
    """The one-core latency of the numpy path (what this benchmark measured first)."""
    import platform

    import numpy as np
    import scipy
    import skimage

    from envs.rewards import MultiObjectiveReward, RewardConfig

    args.out = args.out or harness.result_path("reward_speed")
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
    harness.write_result("reward_speed", report, args.out)
    print(json.dumps(report, indent=2))
    return report


# --------------------------------------------------------------------------------------- throughput

SIZES = {"256": (256, 256), "584x565": (584, 565), "2048": (2048, 2048)}
"""Throughput sizes: a crop, a DRIVE image (584 rows x 565 columns), a FIVES/HRF-sized image."""
IMAGES = {"256": 4, "584x565": 2, "2048": 1}
"""Distinct synthetic GT images per size (each batch cycles through them, 8 masks per image)."""
K_PER_IMAGE = 8
GPU_TARGETS = {"masks_per_s_gpu_584x565": 4000.0, "masks_per_s_gpu_2048": 400.0}
"""Issue 30's bars on one H200."""
COMPARE_SHARE = {"256": 0.45, "584x565": 0.45, "2048": 0.1}
"""How the --compare masks are split over the sizes (2048 masks cost ~1 s each in numpy)."""


def throughput_config() -> RewardConfig:
    """The full reward: every term weighted (clDice and Betti too), 16-px tiles."""
    from envs.rewards import RewardConfig, RewardWeights

    return RewardConfig(weights=RewardWeights(cldice=0.3, betti=0.2), tile_sizes=(16,))


def fundus_gts(size: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic (gt, fov) pairs [n, H, W]; 584x565 is a 584-px image cropped to 565 columns."""
    import numpy as np

    from envs.synthetic import generate_fundus

    h, w = SIZES[size]
    pairs = [generate_fundus(seed, max(h, w)) for seed in range(n)]
    return np.stack([p.mask[:h, :w] for p in pairs]), np.stack([p.fov[:h, :w] for p in pairs])


def sampled_masks(gt, fov, rows, gen):  # tensors in, a tensor out (torch is imported lazily)
    """Masks like a policy samples them, from GT rows ``rows`` [N] of gt/fov [G, H, W] (bool tensors, any
    device), drawn with ``gen``: boundary jitter, cuts (fragments), blobs, and flipped pixels at a per-mask
    rate of 0.2-3 % of the FOV -> bool [N, H, W]."""
    import torch
    import torch.nn.functional as F

    g, f = gt[rows], fov[rows]
    n = g.shape[0]

    def rand(*shape):
        return torch.rand(shape or g.shape, generator=gen, device=g.device)

    def grow(x, r):
        return F.max_pool2d(x[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0

    outer = grow(g, 1) & ~g
    inner = g & grow(~g, 1)
    p = (g | (outer & (rand() < 0.25))) & ~(inner & (rand() < 0.15))  # jitter the boundary
    p &= ~grow(g & (rand() < 0.002), 2)  # cut vessels into fragments
    p |= grow(f & (rand() < 0.0004), 2)  # spurious blobs
    flip = rand() < (0.002 + 0.028 * rand(n, 1, 1))  # flipped pixels
    return (p ^ flip) & f


def _numpy_scores(config: RewardConfig, gt: np.ndarray, fov: np.ndarray, masks: np.ndarray, tile: int):
    """The numpy reward of K masks of one image: ([RewardResult], TiledRewards) (a worker process)."""
    from envs.rewards import MultiObjectiveReward

    reward = MultiObjectiveReward(config)
    target = reward.prepare_target(gt, fov)
    return [reward.score(m, target) for m in masks], reward.score_tiles_multi(masks, target, tiles=(tile,))[
        tile
    ]


def _same_bits(torch_results, torch_tiles, want) -> bool:
    """Whether the torch path's results of K masks have exactly the bits of numpy's (totals, every component,
    every tile and the tile validity)."""
    import numpy as np

    results, tiles = want

    def bits(x) -> bytes:
        return np.asarray(x).tobytes()

    for have, ref in zip(torch_results, results, strict=True):
        if list(have.components) != list(ref.components) or bits(have.total) != bits(ref.total):
            return False
        if any(bits(have.components[k]) != bits(v) for k, v in ref.components.items()):
            return False
    if list(torch_tiles.components) != list(tiles.components):
        return False
    pairs = [(torch_tiles.total, tiles.total), (torch_tiles.valid, tiles.valid)]
    pairs += [(torch_tiles.components[k], v) for k, v in tiles.components.items()]
    return all(bits(a) == bits(b) for a, b in pairs)


class Report:
    """reward_gpu.json, rewritten (atomically) after every measurement, through the harness's writer."""

    def __init__(self, path: Path, head: dict) -> None:
        self.path, self.data = path, head
        self.machine = harness.machine()

    def row(self, **row) -> None:
        self.data["rows"].append(row)
        self.write()

    def write(self) -> None:
        tmp = harness.write_result(
            "reward_gpu", self.data, self.path.with_suffix(".tmp"), machine_block=self.machine
        )
        tmp.replace(self.path)


def throughput(args: argparse.Namespace) -> dict:
    """Masks/s per path and size, then the bit-for-bit comparison; see the module doc string."""
    import dataclasses
    import platform
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    import numpy as np
    import skimage
    import torch

    from envs.rewards import MultiObjectiveReward
    from envs.rewards_torch import TorchReward

    start = time.perf_counter()
    deadline = start + args.max_seconds
    left = lambda: deadline - time.perf_counter()  # noqa: E731
    cuda = torch.cuda.is_available()
    fast = "cuda" if cuda else "cpu"
    config = throughput_config()
    tile = config.tile_sizes[0]
    sizes = [s for s in SIZES if s in args.sizes]
    out = args.out or harness.result_path("reward_gpu")
    report = Report(
        out,
        {
            "benchmark": "reward_gpu",
            **{f"masks_per_s_gpu_{s}": None for s in SIZES},
            "identical_to_cpu": None,
            "n_masks_compared": 0,
            "compared_device": fast,
            **{f"masks_per_s_numpy_{s}": None for s in SIZES},
            **{f"masks_per_s_torch_cpu_{s}": None for s in SIZES},
            "targets": GPU_TARGETS,
            "meets_targets": None,
            "complete": False,
            "elapsed_s": 0.0,
            "max_seconds": args.max_seconds,
            "max_pixels": args.max_pixels,
            "reward": {"weights": config.weights.as_dict(), "tile_sizes": list(config.tile_sizes)},
            "masks": f"envs.synthetic.generate_fundus GTs ({IMAGES} per size), {K_PER_IMAGE} masks per image, "
            "sampled_masks(): boundary jitter, cuts, blobs, 0.2-3 % flipped FOV pixels",
            "notes": "numpy: one core (score per mask + score_tiles_multi per image); torch-cpu: one thread; "
            "cuda: masks already on the GPU, time to totals and tiles on the GPU (synchronised); masks/s of the "
            "GPU keys is the best batch size. stats: thinning passes and labelling rounds of the last call.",
            "environment": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "scikit-image": skimage.__version__,
                "torch": torch.__version__,
                "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
                "cpu_count": os.cpu_count(),
            },
            "rows": [],
        },
    )
    report.write()
    torch.set_num_threads(1)  # the CPU rows are per core; CUDA launches need one thread anyway
    gen = torch.Generator(device=fast).manual_seed(args.seed)

    # 1. GT images, on the host and on the fast device.
    gts = {}
    for s in sizes:
        t0 = time.perf_counter()
        g, f = fundus_gts(s, IMAGES[s])
        gts[s] = (g, f, torch.from_numpy(g).to(fast), torch.from_numpy(f).to(fast))
        log.info("%s: %d GT images in %.1f s", s, len(g), time.perf_counter() - t0)

    def rows_of(n: int, s: str):
        return torch.arange(n, device=fast) // K_PER_IMAGE % IMAGES[s]

    def timed(fn, budget: float) -> tuple[float, int, object]:
        """Median seconds of fn() (after one warm-up), repeated while the budget allows (<= 5 times)."""
        out = fn()
        times = []
        while len(times) < 5 and (not times or sum(times) + times[-1] < budget):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), len(times), out

    def measure(path: str, device: str, s: str, batch: int, budget: float) -> None:
        thinning = args.thinning if device == "cuda" else "auto"
        tr = TorchReward(config, device, max_pixels=args.max_pixels, thinning=thinning)
        _, _, g, f = gts[s]
        targets = tr.prepare_targets(g.to(device), f.to(device))
        rows = rows_of(batch, s).to(device)
        masks = sampled_masks(
            g.to(device), f.to(device), rows, torch.Generator(device=device).manual_seed(batch)
        )

        def run():
            sc = tr.score(masks, targets, image=rows, tiles=(tile,))
            sc.whole.total.cpu(), sc.tiles[tile].total.cpu()  # the values reach the host: synchronised
            return sc

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sec, reps, sc = timed(run, budget)
        rate = batch / sec
        peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
        report.row(path=path, size=s, batch=batch, masks_per_s=round(rate, 1), ms_per_call=round(sec * 1e3, 2),
                   repeats=reps, thinning=tr.thinning, peak_gpu_gb=peak, stats=dataclasses.asdict(sc.stats))  # fmt: skip
        key = f"masks_per_s_{'gpu' if path == 'cuda' else 'torch_cpu'}_{s}"
        report.data[key] = max(report.data[key] or 0.0, round(rate, 1))
        log.info("%-9s %-8s batch %3d: %8.1f masks/s  %s", path, s, batch, rate, sc.stats)

    # 2. CUDA masks/s, the headline sizes first.
    if cuda:
        for s in sorted(sizes, key=["584x565", "2048", "256"].index):
            for batch in args.batches:
                if left() < 0.45 * args.max_seconds * (1 if s != "256" else 0.6):
                    break  # keep time for the comparison and the CPU rows
                measure("cuda", "cuda", s, batch, budget=min(3.0, left() / 20))
        report.data["meets_targets"] = {
            k: report.data[k] is not None and report.data[k] >= v for k, v in GPU_TARGETS.items()
        }
        report.write()

    # 3. Bit for bit against numpy, on the fast device (numpy in worker processes, one core each).
    compared, identical = 0, True
    workers = max(1, min(16, (os.cpu_count() or 1)))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for s in sizes:
            want_n = int(args.compare * COMPARE_SHARE[s] / sum(COMPARE_SHARE[x] for x in sizes))
            want_n = max(K_PER_IMAGE, want_n // K_PER_IMAGE * K_PER_IMAGE)
            g_np, f_np, g, f = gts[s]
            thinning = args.thinning if cuda else "auto"
            tr = TorchReward(config, fast, max_pixels=args.max_pixels, thinning=thinning)
            targets = tr.prepare_targets(g, f)
            step = 64 if s != "2048" else 8
            for lo in range(0, want_n, step):
                if left() < (0.25 if cuda else 0.5) * args.max_seconds:
                    break
                rows = rows_of(lo + step, s)[lo:]
                masks = sampled_masks(g, f, rows, gen)
                sc = tr.score(masks, targets, image=rows, tiles=(tile,))
                results = sc.whole.results()
                m_np, r_np = masks.cpu().numpy(), rows.cpu().numpy()
                groups = [
                    list(range(i, min(i + K_PER_IMAGE, len(r_np)))) for i in range(0, len(r_np), K_PER_IMAGE)
                ]
                futures = [
                    pool.submit(
                        _numpy_scores, config, g_np[r_np[grp[0]]], f_np[r_np[grp[0]]], m_np[grp], tile
                    )
                    for grp in groups
                ]
                for grp, fut in zip(groups, futures, strict=True):
                    ok = _same_bits([results[i] for i in grp], sc.tiles[tile].tiled(grp), fut.result())
                    identical &= ok
                    compared += len(grp)
                report.data["identical_to_cpu"], report.data["n_masks_compared"] = identical, compared
                report.write()
            log.info("compared %d masks so far (identical: %s)", compared, identical)

    # 4. One CPU core: numpy, then torch on one thread.
    for s in sizes:
        g_np, f_np, g, f = gts[s]
        n = args.cpu_batch if s != "2048" else max(1, args.cpu_batch // 4)
        if left() < 10:
            break
        masks = sampled_masks(g, f, rows_of(n, s), gen).cpu().numpy()
        r_np = rows_of(n, s).cpu().numpy()
        reward = MultiObjectiveReward(config)
        targets = [reward.prepare_target(g_np[i], f_np[i]) for i in range(IMAGES[s])]

        def numpy_run(masks=masks, r_np=r_np, reward=reward, targets=targets):
            for i in range(0, len(r_np), K_PER_IMAGE):
                t = targets[r_np[i]]
                grp = masks[i : i + K_PER_IMAGE]
                [reward.score(m, t) for m in grp]
                reward.score_tiles_multi(grp, t, tiles=(tile,))

        sec, reps, _ = timed(numpy_run, budget=min(10.0, left() / 4))
        report.row(path="numpy", size=s, batch=n, masks_per_s=round(n / sec, 2), ms_per_call=round(sec * 1e3, 2),
                   repeats=reps, stats=None)  # fmt: skip
        report.data[f"masks_per_s_numpy_{s}"] = round(n / sec, 2)
        log.info("numpy     %-8s batch %3d: %8.2f masks/s", s, n, n / sec)
    for s in sizes:
        n = args.cpu_batch if s != "2048" else max(1, args.cpu_batch // 4)
        if left() < 10:
            break
        measure("torch-cpu", "cpu", s, n, budget=min(10.0, left() / 4))

    report.data["complete"] = True
    report.data["elapsed_s"] = round(time.perf_counter() - start, 1)
    report.write()
    print(json.dumps({k: v for k, v in report.data.items() if k != "rows"}, indent=2))
    return report.data


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    main()
