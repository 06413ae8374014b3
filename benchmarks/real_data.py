"""Real fundus images (CHASE_DB1, STARE, HRF): SFT, post-processing, offline DPO and RL on held-out test
images, beside the human second observer -> JSON (and a Markdown table per set).

    .venv/bin/python benchmarks/real_data.py data/CHASE_DB1 data/STARE [--seeds 0 1 2] [--recipes ...]
    .venv/bin/python benchmarks/real_data.py --adapt data/CHASE_DB1 data/STARE --adapt data/STARE data/CHASE_DB1
    .venv/bin/python benchmarks/real_data.py --standardize --adapt data/CHASE_DB1 data/STARE ...

The sets are not redistributable and CI never sees them: fetch and extract them as the README's real-data
section says. Each folder's kind is found from its layout; its config is ``examples/<kind>.yaml`` (the
README's split, field of view estimated where the set ships none, HRF at half resolution without its 3
unlabelled images). Per set, under ``<output-dir>/<kind>/``:

1. ``raysys sft`` once (``run.seed=0``), kept in ``sft/`` and reused by later calls;
2. ``raysys train`` from it for every (recipe, seed) of ``--recipes`` x ``--seeds`` (``rl_common``), each
   scored on val and test and cached in ``rl/<recipe>_s<seed>.json`` (an interrupted benchmark goes on
   where it stopped; the tables hold every cached run);
3. rows, each on the test images at native resolution (mean and std over seeds): ``sft@0.5``,
   ``sft@val-best``, ``sft+postproc`` (threshold, closing and minimum component size chosen on val),
   the best ``dpo*`` recipe and the best RL recipe (both chosen on val Dice + clDice, each at its own
   validation-best threshold), ``human`` (the second observer scored against the first: CHASE_DB1 2ndHO,
   STARE vk; HRF has none), and the ``@oracle`` rows: a model at the threshold the test labels pick, which no
   user has; reported only to separate what RL learns from what a better threshold alone gives.

``--adapt SOURCE TARGET``: cross-site adaptation without labels. SFT and the learned reward net on SOURCE's
labels, then RL on TARGET's training images with the learned reward only (checkpoint chosen by the reward
net's score of the validation masks), every model at the threshold SOURCE's validation images pick, scored on
TARGET's test images; ``@learned-threshold`` rows use the threshold whose masks the learned reward net scores
highest on TARGET's training and validation images (no label read: the whole adaptation is label-free);
``@prior-matched`` rows the one whose masks cover the vessel fraction of SOURCE's labels (the simple
label-free baseline); ``@target-oracle`` rows use the threshold TARGET's test labels would pick. The
learned-vs-GT reward gap along each run is the reward-hacking monitor.

``--set KEY=VALUE ... --tag NAME``: other settings for every run, SFT included (e.g. ``--set sft.jitter=0.4
--set rollout.jitter=0.4 --tag jitter``), cached under ``runs/real_data_<NAME>/``, results keyed ``<set>_<NAME>``.

``--standardize``: every run (SFT, reward net, RL, scoring) with ``data.standardize=true`` (each image's
colours inside its field of view mapped to one reference: needs no label, so it applies to a new site as
is), cached under ``runs/real_data_standardized/``, results keyed ``<set>_standardized`` and
``<source>_to_<target>_standardized``.

Gains are per seed against the same SFT model (``rl_*_gain_vs_best_threshold``: each at its own validation-best
threshold; ``rl_*_gain_vs_oracle_threshold``: each at its test-best threshold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import harness
import numpy as np
import torch
from rl_common import markdown, scores, summary
from rl_vs_baselines import RECIPES, postprocessed_sft, run_recipes, val_select

SETS = {
    "chase_db1": {"config": "examples/chase_db1.yaml", "second_observer": {"annotator": "2ndHO"}},
    "stare": {"config": "examples/stare.yaml", "second_observer": {"annotator": "vk"}},
    "hrf": {"config": "examples/hrf.yaml", "second_observer": None},
}
"""Each real set: its example config and the loader option that reads its second observer's labels."""
DEFAULT_RECIPES = ["grpo", "postproc_cldice_select", "dpo_lr3e-5"]
"""The example's recipe, the combined recipe that won on synthetic data, and the offline DPO baseline."""


def detect_kind(root: Path) -> str:
    """The real set a folder holds, from its layout."""
    from envs.datasets import DatasetError, load_dataset

    for kind in SETS:
        try:
            load_dataset(kind, root, "all", **({"skip_unlabelled": True} if kind == "hrf" else {}))
        except DatasetError:
            continue
        return kind
    raise SystemExit(f"{root}: not a CHASE_DB1, STARE or HRF folder (see the README's real-data section)")


def human_observer(kind: str, cfg) -> dict | None:
    """The second observer's labels scored against the first's on the test images (same FOV, same metrics)."""
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split

    option = SETS[kind]["second_observer"]
    if option is None:
        return None
    first = list(dataset_for_split(cfg.data, "test", load=load_dataset))
    second = list(load_dataset(kind, cfg.data.root, "test", **option))
    if [s.id for s in first] != [s.id for s in second]:
        raise SystemExit(f"{kind}: the two observers' test images differ")
    return scores([s.mask.astype(np.float32) for s in second], first, 0.5)


def sft_model(kind: str, config: str, root: Path, out: Path, extra: list[str]) -> Path:
    """The set's SFT model, trained once (``run.seed=0``) and reused."""
    from rl_common import check_cached

    model = out / kind / "sft" / "model"
    overrides = [f"data.root={root}", *extra, f"run.name={kind}", f"run.output_dir={out}", "run.seed=0"]
    if (model / "model.safetensors").is_file():
        sft_reads = ("data.", "policy.", "sft.", "eval.", "run.seed")
        where = [f"run.output_dir={out / kind}", "run.name=sft"]  # its config.yaml: <out>/<kind>/sft/
        check_cached(config, [*overrides, *where], model, prefixes=sft_reads)
    else:
        harness.run_cli("sft", config, *overrides, capture=False)
    return model


def _gains(runs: list[dict], at: str, metric: str) -> list[float]:
    return [r[f"rl_test_at_{at}"][metric] - r[f"sft_test_at_{at}"][metric] for r in runs]


def one_set(root: Path, out: Path, recipes: list[str], seeds: list[int], extra: list[str]) -> dict:
    from raysys.config_io import load_config

    kind = detect_kind(root)
    config = str(harness.ROOT / SETS[kind]["config"])
    data = [f"data.root={root}", *extra]
    sft = sft_model(kind, config, root, out, extra)
    runs = run_recipes(config, str(sft), out / kind / "rl", recipes, seeds, data)
    rl = [r for r in runs if not r.startswith("dpo")]
    dpo = [r for r in runs if r.startswith("dpo")]
    if not rl:
        raise SystemExit(f"{kind}: no RL run yet; give --recipes with at least one non-DPO recipe")
    # Among the recipes run on the most seeds (a recipe screened on one seed may just be lucky).
    most = max(len(runs[r]) for r in rl)
    best = max((r for r in rl if len(runs[r]) == most), key=lambda r: val_select(runs[r]))
    best_dpo = max(dpo, key=lambda r: val_select(runs[r])) if dpo else None

    cfg = load_config(config, data)
    first = runs[best]
    table = {
        "sft@0.5": summary([r["sft_test_at_0.5"] for r in first]),
        "sft@val-best": summary([r["sft_test_at_best_threshold"] for r in first]),
    }
    pp = postprocessed_sft(config, str(sft), data)
    table["sft+postproc"] = {**pp["test"], **{f"{k}_std": 0.0 for k in pp["test"]}}
    if best_dpo:
        table[f"{best_dpo}@val-best"] = summary([r["rl_test_at_best_threshold"] for r in runs[best_dpo]])
    table[f"{best}@0.5"] = summary([r["rl_test_at_0.5"] for r in first])
    table[f"{best}@val-best"] = summary([r["rl_test_at_best_threshold"] for r in first])
    table["sft@oracle"] = summary([r["sft_test_at_oracle_threshold"] for r in first])
    table[f"{best}@oracle"] = summary([r["rl_test_at_oracle_threshold"] for r in first])
    human = human_observer(kind, cfg)
    if human is not None:
        table["human (second observer)"] = {**human, **{f"{k}_std": 0.0 for k in human}}

    gains = {
        f"rl_{m}_gain_vs_{name}": _gains(first, at, m)
        for m in ("dice", "cldice")
        for name, at in (("best_threshold", "best_threshold"), ("oracle_threshold", "oracle_threshold"))
    }
    rl_test = float(np.mean([r["rl_test_at_best_threshold"]["dice"] for r in first]))
    dpo_test = (
        float(np.mean([r["rl_test_at_best_threshold"]["dice"] for r in runs[best_dpo]])) if best_dpo else None
    )
    best_model_dice = max(rl_test, table["sft@val-best"]["dice"], pp["test"]["dice"], dpo_test or 0.0)
    return {
        "kind": kind,
        "config": harness.display_path(config),
        "data_root": str(root),
        "overrides": extra,
        "n_test": first[0]["n_test"],
        "seeds": [r["seed"] for r in first],
        "best_recipe": best,
        "best_recipe_chosen_on": "validation Dice + clDice at the recipe's own best validation threshold",
        **{k: float(np.mean(v)) for k, v in gains.items()},
        **{f"{k}_per_seed": v for k, v in gains.items()},
        **{f"{k}_every_seed_positive": all(x > 0 for x in v) for k, v in gains.items()},
        "dpo_recipe": best_dpo,
        "rl_above_dpo": None if dpo_test is None else rl_test > dpo_test,
        "best_model_test_dice": best_model_dice,
        "human_test_dice": None if human is None else human["dice"],
        "postproc": pp,
        "table": table,
        "recipes": {
            r: {
                "overrides": RECIPES[r],
                "seeds": [x["seed"] for x in rs],
                "val_select": val_select(rs),
                "test_at_val_best": summary([x["rl_test_at_best_threshold"] for x in rs]),
                "best_val_threshold": [x["rl_best_val_threshold"] for x in rs],
                "train_wall_s_mean": float(np.mean([x["train_wall_s"] for x in rs])),
            }
            for r, rs in runs.items()
        },
    }


def reward_net(kind: str, config: str, root: Path, sft: Path, out: Path, extra: list[str]) -> Path:
    """The learned reward net of a set: trained on its labelled training images and its SFT model's masks."""
    folder = out / kind / "reward_net"
    ckpt = folder / "best_reward_net.pth"
    if not ckpt.is_file():
        harness.run_cli(
            "reward-net", config, f"data.root={root}", *extra, "--out", str(folder), "--policy-checkpoint", str(sft),
            "--overwrite", capture=False,
        )  # fmt: skip
    return ckpt


ADAPT = ["reward.source=learned", "eval.select_metric=val/learned_score"]
"""RL on the target set: the learned reward alone, and a checkpoint chosen without labels."""


THRESHOLD_ROWS = {
    "source": "source-best",
    "learned": "learned-threshold",
    "prior": "prior-matched",
    "oracle": "target-oracle",
}
"""Where an adapted model's threshold comes from -> its row's suffix."""


def learned_threshold(scorer, probs, samples, thresholds) -> float:
    """The threshold whose masks the learned reward net scores highest, mean over ``samples``: reads no label."""
    ts = list(thresholds)
    total = np.zeros(len(ts))
    for p, s in zip(probs, samples, strict=True):
        total += scorer.score(s.image, np.stack([p >= t for t in ts]), fov=s.fov).values
    return float(ts[int(np.argmax(total))])


def fov_fraction(mask: np.ndarray, fov: np.ndarray) -> float:
    """Fraction of the field of view that ``mask`` covers."""
    return float((mask & fov).sum() / max(int(fov.sum()), 1))


def vessel_fraction(samples) -> float:
    """Mean fraction of each labelled image's field of view that its label marks as vessel."""
    return float(np.mean([fov_fraction(s.mask, s.fov) for s in samples]))


def prior_threshold(probs, samples, thresholds, fraction: float) -> float:
    """The threshold whose masks cover ``fraction`` of the field of view on average (the source's labelled
    vessel fraction): the classic label-free prior match, the simple baseline beside ``learned_threshold``."""
    ts = list(thresholds)
    covered = [
        np.mean([fov_fraction(p >= t, s.fov) for p, s in zip(probs, samples, strict=True)]) for t in ts
    ]
    return float(ts[int(np.argmin(np.abs(np.asarray(covered) - fraction)))])


def adaptation(source: Path, target: Path, out: Path, seeds: list[int], extra: list[str]) -> dict:
    """SFT and the reward net on the source set's labels; RL on the target set's training images with the
    learned reward only; every model thresholded where the source's validation images say, scored on the
    target's test images. The target's labels serve only the numbers, the hacking monitor and the oracle row."""
    from gt_free_adaptation import gap_curve, mean_logged
    from rl_common import best_threshold, train

    from envs.datasets import load_dataset
    from policies.evaluation import predict_probs
    from policies.factory import load_policy
    from policies.reward_net import RewardNetScorer
    from raysys import keys
    from raysys.config_io import load_config
    from raysys.data import dataset_for_split, inference_for

    src, tgt = detect_kind(source), detect_kind(target)
    src_config, tgt_config = (str(harness.ROOT / SETS[k]["config"]) for k in (src, tgt))
    sft = sft_model(src, src_config, source, out, extra)
    rn = reward_net(src, src_config, source, sft, out, extra)
    folder = out / f"{src}_to_{tgt}"
    folder.mkdir(parents=True, exist_ok=True)
    # policy.checkpoint names the SFT model: without it the "sft" rows would score a fresh tiny model.
    src_cfg = load_config(src_config, [f"data.root={source}", *extra, f"policy.checkpoint={sft}"])
    tgt_cfg = load_config(tgt_config, [f"data.root={target}", *extra, f"policy.checkpoint={sft}"])
    src_val = list(dataset_for_split(src_cfg.data, "val", load=load_dataset))
    tgt_test = list(dataset_for_split(tgt_cfg.data, "test", load=load_dataset))
    tgt_unlabelled = [*dataset_for_split(tgt_cfg.data, "train", load=load_dataset),
                      *dataset_for_split(tgt_cfg.data, "val", load=load_dataset)]  # fmt: skip
    scorer = RewardNetScorer.from_checkpoint(rn)
    src_fraction = vessel_fraction([*dataset_for_split(src_cfg.data, "train", load=load_dataset), *src_val])

    def scored(ckpt: Path | None, seed: int) -> dict:
        """A model's threshold per source of threshold, and its test scores at each."""
        pol = load_policy(tgt_cfg.policy, ckpt, seed=seed)

        def probs(samples, cfg):
            return predict_probs(lambda im, pr: pol.mask_logits(im, pr), samples, inference_for(cfg))

        test_p, unl_p = probs(tgt_test, tgt_cfg), probs(tgt_unlabelled, tgt_cfg)
        at = {
            "source": best_threshold(probs(src_val, src_cfg), src_val, src_cfg.eval.thresholds),
            "learned": learned_threshold(scorer, unl_p, tgt_unlabelled, tgt_cfg.eval.thresholds),
            "prior": prior_threshold(unl_p, tgt_unlabelled, tgt_cfg.eval.thresholds, src_fraction),
            "oracle": best_threshold(test_p, tgt_test, tgt_cfg.eval.thresholds),
        }
        return {name: (t, scores(test_p, tgt_test, t)) for name, t in at.items()}

    sft_scored: dict | None = None  # the SFT model (policy.checkpoint) is the same for every seed
    runs = []
    for seed in seeds:
        cached = folder / f"rl_s{seed}.json"
        row = json.loads(cached.read_text()) if cached.is_file() else None
        if row is None:
            run = train(tgt_config, [
                f"data.root={target}", *extra, f"policy.checkpoint={sft}", f"run.seed={seed}", f"run.name=rl_s{seed}",
                f"run.output_dir={folder}", f"reward.reward_net={rn}", *ADAPT,
            ])  # fmt: skip
            row = {
                "seed": seed,
                "train_wall_s": round(run.wall_s, 1),
                "iterations": run.cfg.learner.iterations,
                "curve": [
                    {"iteration": r["iteration"], **{k: r[k] for k in r if k.startswith(("custom/", "val/"))}}
                    for r in run.rows
                ],
            }
        # Rows cached before the label-free thresholds existed gain them here.
        if "rl@prior-matched" not in row:
            ckpts = folder / f"rl_s{seed}" / "checkpoints"
            sft_scored = sft_scored or scored(None, seed)
            models = {
                "sft": sft_scored,
                "rl": scored(ckpts / "best", seed),
                "rl_last": scored(ckpts / "latest", seed),
            }
            for label, by_source in models.items():
                for name, (t, at_t) in by_source.items():
                    row[f"{label}_{name}{'_best' if name == 'source' else ''}_threshold"] = t
                    row[f"{label}@{THRESHOLD_ROWS[name]}"] = at_t
            cached.write_text(json.dumps(row, indent=1))
        runs.append(row)
    table = {
        name: summary([r[name] for r in runs])
        for name in ("sft@source-best", "sft@learned-threshold", "sft@prior-matched", "sft@target-oracle",
                     "rl@source-best", "rl@learned-threshold", "rl@prior-matched", "rl@target-oracle",
                     "rl_last@source-best")
    }  # fmt: skip

    def gain(a: str, b: str, metric: str = "dice") -> list[float]:
        return [r[a][metric] - r[b][metric] for r in runs]

    gains = gain("rl@source-best", "sft@source-best")
    return {
        "source": src,
        "target": tgt,
        "overrides": extra,
        "rl_overrides": ADAPT,
        "seeds": [r["seed"] for r in runs],
        "n_test": len(tgt_test),
        "dice_gain_vs_source_threshold": float(np.mean(gains)),
        "dice_gain_vs_source_threshold_per_seed": gains,
        "cldice_gain_vs_source_threshold": float(
            np.mean(gain("rl@source-best", "sft@source-best", "cldice"))
        ),
        # Adapted as a whole without labels: RL, then the threshold the learned reward net prefers on the
        # target's unlabelled training images; beside what that threshold alone gives the SFT model.
        "adapted_dice_gain_vs_source_threshold": float(
            np.mean(gain("rl@learned-threshold", "sft@source-best"))
        ),
        "adapted_dice_gain_vs_source_threshold_per_seed": gain("rl@learned-threshold", "sft@source-best"),
        "sft_dice_gain_learned_vs_source_threshold": float(
            np.mean(gain("sft@learned-threshold", "sft@source-best"))
        ),
        "sft_dice_gain_prior_vs_source_threshold": float(
            np.mean(gain("sft@prior-matched", "sft@source-best"))
        ),
        "source_vessel_fraction": src_fraction,
        "rl_dice_vs_sft_at_learned_threshold": float(
            np.mean(gain("rl@learned-threshold", "sft@learned-threshold"))
        ),
        "rl_dice_vs_sft_at_target_oracle": float(np.mean(gain("rl@target-oracle", "sft@target-oracle"))),
        # GRPO turns each group's rewards into advantages: near 0 the learned ones point nowhere.
        "learned_gt_alignment": mean_logged(runs, keys.LEARNED_GT_ALIGNMENT),
        "reward_gap_curve": gap_curve(runs),
        "table": table,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="*", type=Path, help="folders of CHASE_DB1, STARE and/or HRF")
    parser.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, choices=list(RECIPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, help="default: runs/real_data[_standardized]")
    parser.add_argument(
        "--standardize", action="store_true",
        help="data.standardize=true in every run (results keyed <set>_standardized, <a>_to_<b>_standardized)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every run, SFT included (repeatable; needs --tag)",
    )  # fmt: skip
    parser.add_argument(
        "--tag", help="with --set: results keyed <set>_<tag>, runs under runs/real_data_<tag>"
    )
    parser.add_argument("--json", default=str(harness.result_path("real_data")))
    parser.add_argument(
        "--adapt", nargs=2, action="append", default=[], metavar=("SOURCE", "TARGET"),
        help="also adapt SOURCE's model to TARGET's images without labels (repeatable)",
    )  # fmt: skip
    args = parser.parse_args()

    torch.set_num_threads(2)
    if bool(args.overrides) != bool(args.tag):
        parser.error("--set and --tag go together: other settings are other models, kept apart by the tag")
    extra, tag = (["data.standardize=true"], "_standardized") if args.standardize else ([], "")
    if args.overrides:
        extra, tag = [*extra, *args.overrides], f"{tag}_{args.tag}"
    out = (args.output_dir or harness.RUNS / f"real_data{tag}").resolve()
    path = Path(args.json)
    # Sets measured by earlier calls stay in the result (one set per call is a common way to run this).
    result = json.loads(path.read_text()) if path.is_file() else {}
    result = {k: v for k, v in result.items() if k not in ("benchmark", "machine")}
    sets = dict(result.get("sets", {}))
    for root in args.roots:
        row = one_set(root.resolve(), out, args.recipes, args.seeds, extra)
        sets[row["kind"] + tag] = row
        print(f"\n## {row['kind']} ({row['n_test']} test images, seeds {row['seeds']})\n")
        print(markdown(row["table"]))
        harness.write_result("real_data", {**result, "sets": sets}, args.json)

    def row_tag(r: dict) -> str:  # rows written before the tag was stored: standardized or plain
        return r.get("tag", "_standardized" if "data.standardize=true" in r.get("overrides", []) else "")

    adaptation_rows = {f"{r['source']}_to_{r['target']}{row_tag(r)}": r for r in result.get("adaptation", [])}
    for source, target in args.adapt:
        row = {
            **adaptation(Path(source).resolve(), Path(target).resolve(), out, args.seeds, extra),
            "tag": tag,
        }
        adaptation_rows[f"{row['source']}_to_{row['target']}{tag}"] = row
        print(f"\n## {row['source']} -> {row['target']} without labels\n")
        print(markdown(row["table"]))
        harness.write_result(
            "real_data", {**result, "sets": sets, "adaptation": list(adaptation_rows.values())}, args.json
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
