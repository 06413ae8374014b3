"""What the RL benchmarks share (rl_gain, rl_vs_baselines, gt_free_adaptation, async_speedup): the recipe the
levers were first screened with, one ``raysys train`` run through the real CLI, held-out scoring of a run's
checkpoints, and the README table of scores over seeds.

Scores are the mean test metrics of ``KEYS`` (``policies.evaluation``); ``summary`` turns per-seed scores into
mean and std, and ``markdown`` prints them the way the README quotes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import numpy as np

from raysys import keys
from raysys.testing.rl_small import metric_rows

KEYS = ("dice", "recall", "precision", "cldice", "betti0_err", "betti1_err")
"""The test metrics every RL benchmark reports."""
FIRST_RECIPE = [
    "reward.postprocess=false", "reward.weights.cldice=0", "reward.weights.betti=0", "eval.select_metric=val/dice",
]  # fmt: skip
"""The RL recipe of examples/tiny_synthetic.yaml when the levers were first screened (raw masks scored, no
clDice or Betti term, checkpoint kept by val Dice): the benchmarks that compare against earlier measurements
pin it, since the example has since moved to the recipe they chose."""


# ------------------------------------------------------------------------------------------------ scoring
def scores(probs, samples, threshold: float) -> dict[str, float]:
    """Mean test metrics (KEYS) of probability maps at ``threshold``."""
    from policies.evaluation import evaluate_probs

    mean = evaluate_probs(probs, samples, threshold=threshold).mean
    return {k: mean[k] for k in KEYS}


def best_threshold(probs, samples, thresholds) -> float:
    """The threshold among ``thresholds`` with the best mean Dice on ``samples``."""
    from policies.evaluation import evaluate_probs

    return evaluate_probs(probs, samples, thresholds=thresholds).best_threshold


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean and std over seeds of each of KEYS: ``{"dice": mean, "dice_std": std, ...}``."""
    out = {}
    for k in KEYS:
        values = [r[k] for r in rows]
        out[k], out[f"{k}_std"] = float(np.mean(values)), float(np.std(values))
    return out


def markdown(table: dict[str, dict[str, float]]) -> str:
    """The README table: one row per model, mean +- std over seeds, metrics in points (x100)."""
    head = "| model | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS)
    lines = [head]
    for name, row in table.items():
        cells = []
        for k in KEYS:
            scale = 1 if k.startswith("betti") else 100
            cells.append(f"{row[k] * scale:.1f} ± {row[f'{k}_std'] * scale:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ one run
@dataclass(frozen=True)
class TrainRun:
    """A finished ``raysys train``."""

    cfg: Any
    """Its resolved config (``raysys.config``); ``cfg.run_dir`` is its folder."""
    rows: list[dict[str, Any]]
    """Its metrics.jsonl, one row per iteration."""
    wall_s: float
    """Wall time of the CLI process (start-up included)."""


def resume_flag(cfg) -> list[str]:
    """``--resume`` for a run an interrupted benchmark left behind (its own folder), so it goes on from its
    last checkpoint instead of refusing to overwrite it (the wall time then covers the rest only)."""
    from raysys.runtime import holds_results

    return ["--resume"] if holds_results(cfg.run_dir) else []


def train(config: str, overrides: list[str]) -> TrainRun:
    """``raysys train config overrides`` through the real CLI (continuing a run left behind)."""
    from raysys.config_io import load_config

    cfg = load_config(config, overrides)
    run = harness.run_cli("train", config, *overrides, "--no-progress", *resume_flag(cfg))
    return TrainRun(cfg=cfg, rows=metric_rows(cfg.run_dir / "metrics.jsonl"), wall_s=run.wall_s)


def run_overrides(sft: str, seed: int, name: str, output_dir: str, overrides) -> list[str]:
    """The overrides of ``train_and_score``'s run: from the SFT checkpoint, seeded, named, then ``overrides``."""
    return [
        f"policy.checkpoint={sft}", f"run.seed={seed}", f"run.name={name}", f"run.output_dir={output_dir}",
        *overrides,
    ]  # fmt: skip


SCORING_ONLY = ("eval.thresholds",)
"""Settings only the scoring reads (when the checkpoint is not chosen at a best threshold): a cached run that
differs in them is re-scored from its checkpoints, not retrained."""


def check_cached(
    config: str | None, overrides: list[str], cached: Path, *, prefixes: tuple[str, ...] | None = None
) -> None:
    """Refuse a cached result whose run was trained with other settings than ``config`` + ``overrides`` resolve
    to now (an example config edited since, another ``--set``): it would be reported as if it were theirs.
    ``prefixes``: compare only the keys that start with one of them (the settings the cached stage reads).
    ``SCORING_ONLY`` keys may differ (``rescore_if_needed`` scores the run again) unless the run chose its
    checkpoint at a best threshold."""
    from raysys.config_io import changed_settings, load_config
    from raysys.train import RESUME_MAY_CHANGE

    now = load_config(config, overrides)
    saved = now.run_dir / "config.yaml"
    if not saved.is_file():
        raise SystemExit(f"{cached}: its run's {saved} is missing, so its settings cannot be checked")
    free = set(RESUME_MAY_CHANGE)
    if keys.VAL_BEST_THRESHOLD not in str(now.eval.select_metric):
        free |= set(SCORING_ONLY)
    shown = changed_settings(load_config(saved), now, ignore=free, prefixes=prefixes)
    if shown:
        raise SystemExit(
            f"{cached} was trained with other settings ({shown}); "
            "give another --output-dir (or move that run away) to train these"
        )


def train_and_score(config: str, sft: str, seed: int, name: str, output_dir: str, overrides) -> dict:
    """``raysys train`` from the SFT checkpoint, then ``score_run``."""
    run = train(config, run_overrides(sft, seed, name, output_dir, overrides))
    best_meta = json.loads((run.cfg.run_dir / "checkpoints" / "best" / "meta.json").read_text())
    out = {
        "seed": seed,
        "train_wall_s": round(run.wall_s, 1),
        "iterations": run.cfg.learner.iterations,
        "best_iteration": best_meta["iteration"],
        "select_metric": run.cfg.eval.select_metric,
        **score_run(run.cfg, seed),
        "val_curve": [
            {k: r[k] for k in ("iteration", keys.VAL_DICE, keys.VAL_RECALL, keys.VAL_CLDICE) if k in r}
            for r in run.rows
            if keys.VAL_DICE in r
        ],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "val_curve"}, indent=1), flush=True)
    return out


def score_run(cfg, seed: int) -> dict:
    """SFT (``policy.checkpoint``), the run's best-validation checkpoint ("rl") and its last one ("rl_last")
    scored on the test split at 0.5, at each model's best validation threshold and at its test-best (oracle)
    one, over ``eval.thresholds`` (recorded as ``thresholds``)."""
    from envs.datasets import load_dataset
    from policies.evaluation import predict_probs
    from policies.factory import load_policy
    from raysys.data import dataset_for_split, inference_for

    test = list(dataset_for_split(cfg.data, "test", load=load_dataset))
    val = list(dataset_for_split(cfg.data, "val", load=load_dataset))
    out: dict[str, Any] = {"n_test": len(test), "thresholds": [float(t) for t in cfg.eval.thresholds]}
    models = {
        "sft": load_policy(cfg.policy, seed=seed),
        "rl": load_policy(cfg.policy, cfg.run_dir / "checkpoints" / "best", seed=seed),
        "rl_last": load_policy(cfg.policy, cfg.run_dir / "checkpoints" / "latest", seed=seed),
    }
    th, inference = cfg.eval.thresholds, inference_for(cfg)
    for label, pol in models.items():
        val_p, test_p = (
            predict_probs(lambda im, pr, p=pol: p.mask_logits(im, pr), v, inference) for v in (val, test)
        )
        best_t = best_threshold(val_p, val, th)
        out[f"{label}_test_at_0.5"] = scores(test_p, test, 0.5)
        out[f"{label}_best_val_threshold"] = best_t
        out[f"{label}_test_at_best_threshold"] = scores(test_p, test, best_t)
        out[f"{label}_val_at_best_threshold"] = scores(val_p, val, best_t)
        # The threshold the test labels would pick: no user has it; it separates what RL learns from what a
        # better threshold alone would give.
        oracle_t = best_threshold(test_p, test, th)
        out[f"{label}_oracle_threshold"] = oracle_t
        out[f"{label}_test_at_oracle_threshold"] = scores(test_p, test, oracle_t)
    return out


def rescore_if_needed(config: str, overrides: list[str], cached: Path) -> dict:
    """The cached result of a run, scored again from its checkpoints (and the cache rewritten) when it was
    scored over other thresholds than ``eval.thresholds`` now says (results before ``thresholds`` was
    recorded were scored over the default grid)."""
    from envs.metrics import SWEEP_THRESHOLDS
    from raysys.config_io import load_config

    result = json.loads(cached.read_text())
    cfg = load_config(config, overrides)
    if result.get("thresholds", list(SWEEP_THRESHOLDS)) != [float(t) for t in cfg.eval.thresholds]:
        result.update(score_run(cfg, int(cfg.run.seed)))
        cached.write_text(json.dumps(result, indent=1))
    return result
