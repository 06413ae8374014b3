"""The whole pipeline on a DRIVE-layout folder (565x584 .tif/.gif, 16 train / 4 val / 20 test) with the
folder-dataset defaults of examples/drive.yaml: wall time per stage and the held-out table -> JSON.

    .venv/bin/python benchmarks/real_layout_pipeline.py [key=value ...] [--json PATH] [--work DIR]
    .venv/bin/python benchmarks/real_layout_pipeline.py --root data/HRF [--root data/STARE ...]

The folder is written by ``raysys data synth-folder`` (20 training images; ``data.val_fraction=0.2``
carves the last 4 into val), then ``raysys pipeline examples/drive.yaml`` runs through the real CLI.
Everything is written under --work (default runs/real_layout_bench, which must not exist yet).

``--root DIR`` (repeatable): a real set's folder instead (CHASE_DB1, STARE or HRF, kind found from its
layout), run as its README command does (``raysys pipeline examples/<kind>.yaml data.root=DIR``); results
go to ``benchmarks/results/real_pipeline.json``, one entry per set.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness

KEYS = ("dice", "recall", "precision", "cldice", "betti0_err")


def _raysys(*args: str) -> float:
    """``raysys <args>`` from the repository root, its output shown as it comes; its wall time."""
    return harness.run_cli(*args, capture=False, cwd=harness.ROOT).wall_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for the pipeline")
    parser.add_argument("--json", default=str(harness.result_path("real_layout_pipeline")))
    parser.add_argument("--work", default=str(harness.RUNS / "real_layout_bench"))
    parser.add_argument("--root", type=Path, action="append", default=[], help="a real set's folder")
    args = parser.parse_args()

    work = Path(args.work).resolve()
    if work.exists():
        raise SystemExit(f"{work} exists; pass another --work (nothing there is overwritten)")
    if args.root:
        return real_sets(args.root, work, args.overrides)
    folder = work / "DRIVE_synth"
    folder_s = _raysys("data", "synth-folder", "--layout", "drive", "--out", str(folder), "--n-train", "20")
    overrides = [f"data.root={folder}", f"run.output_dir={work}", "run.name=drive", *args.overrides]
    total = _raysys("pipeline", "examples/drive.yaml", *overrides)
    stage_s, data_summary, table = _results(work / "drive")
    machine = harness.machine()
    out = {
        "setup": {
            "machine": f"{machine['arch']}, {machine['cpus']} CPUs",  # as first recorded
            "config": "examples/drive.yaml",
            "overrides": overrides,
            "data": data_summary,
            "note": "synthetic fundus images in the real DRIVE layout and size; test = 20 official-layout "
            "test images at native resolution, FOV-aware, sliding windows of the training crop",
        },
        "write_folder_s": round(folder_s, 1),
        "total_s": round(total, 1),
        "stage_s": stage_s,
        "table": table,
    }
    harness.write_result("real_layout_pipeline", out, args.json, machine_block=machine)
    print(json.dumps(out, indent=2))
    return 0


def real_sets(roots: list[Path], work: Path, extra: list[str]) -> int:
    """Each real set through its example config, as the README says; one entry per set, kept across calls."""
    from real_data import SETS, detect_kind

    path = harness.result_path("real_pipeline")
    sets = json.loads(path.read_text()).get("sets", {}) if path.is_file() else {}
    for root in roots:
        kind = detect_kind(root.resolve())
        config = SETS[kind]["config"]
        overrides = [f"data.root={root.resolve()}", f"run.output_dir={work}", f"run.name={kind}", *extra]
        total = _raysys("pipeline", config, *overrides)
        stage_s, data_summary, table = _results(work / kind)
        sets[kind] = {
            "command": f"raysys pipeline {config} data.root={root}",
            "overrides": overrides,
            "data": data_summary,
            "total_s": round(total, 1),
            "stage_s": stage_s,
            "table": table,
        }
        harness.write_result("real_pipeline", {"sets": sets}, str(path))
        print(json.dumps(sets[kind], indent=2))
    return 0


def _results(run: Path) -> tuple[dict, dict, list[dict]]:
    """A finished pipeline run's seconds per stage, its data summary and its held-out table."""
    stages = ("data", "sft", "reward_net", "rl", "eval", "export", "report")
    stage_s = {s: json.loads((run / s / "manifest.json").read_text())["seconds"] for s in stages}
    comparison = json.loads((run / "eval" / "comparison.json").read_text())
    names = {
        "sft": "SFT @0.5",
        "sft@val_best_t": "SFT @val-best t",
        "rl": "RL @0.5",
        "rl@val_best_t": "RL @val-best t",
    }
    table = [
        {"model": names[k], "threshold": v["threshold"], **{m: v[m] for m in KEYS}}
        for k, v in comparison.items()
    ]
    data_summary = json.loads((run / "data" / "summary.json").read_text())
    return stage_s, data_summary, table


if __name__ == "__main__":
    sys.exit(main())
