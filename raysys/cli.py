"""The ``raysys`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from raysys import keys
from raysys.config import Config, ConfigError
from raysys.config_io import load_config, to_dict
from raysys.pipeline import PipelineError
from raysys.runtime import Terminated, command_output, stop_on_sigterm

log = logging.getLogger("raysys")


def _split_config_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]`` -> (config path or None, overrides)."""
    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    bad = [x for x in items if "=" not in x]
    if bad:
        raise ConfigError(f"expected key=value overrides after the config file, got {bad}")
    if path is not None and not Path(path).exists() and not path.endswith((".yaml", ".yml")) and "." in path:
        raise ConfigError(f"{path!r} is neither a config file nor an override; did you mean {path}=VALUE?")
    return path, items


def _config(args: argparse.Namespace) -> Config:
    path, overrides = _split_config_args(args.config)
    cfg = load_config(path, overrides)
    base = os.environ.get("RAYSYS_BASE_DIR")  # set by cluster/submit.sh: relative paths mean the submitter's
    if base:
        from raysys.runtime import absolute_paths

        cfg = absolute_paths(cfg, base)
    if args.command != "config":  # every other command writes under run.output_dir
        _make_output_dir(cfg.run.output_dir)
    return cfg


def _make_output_dir(output_dir: str) -> None:
    path = Path(output_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"run.output_dir={output_dir} is a file; choose a folder") from None
    except OSError as exc:
        raise ConfigError(
            f"run.output_dir={output_dir} cannot be created ({exc.strerror}); choose a writable folder"
        ) from None


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split
    from raysys.viz import preview_grid

    cfg = _config(args)
    samples = dataset_for_split(cfg.data, args.split, load=load_dataset)
    if len(samples) == 0:
        raise ConfigError(f"split '{args.split}' of data kind '{cfg.data.kind}' has no images")
    chosen = [samples[i] for i in range(min(args.n, len(samples)))]
    out = Path(args.out) if args.out else cfg.run_dir / "data_preview.png"
    preview_grid(chosen, out)
    print(f"wrote {out} ({len(chosen)} {cfg.data.kind} images, split {args.split})")
    return 0


def cmd_data_synth_folder(args: argparse.Namespace) -> int:
    import shlex

    from envs.folders import layout_spec, write_dataset_folder

    spec = layout_spec(args.layout)
    n_train, n_test = spec.counts(args.n_train, args.n_test)
    start = time.perf_counter()
    out = write_dataset_folder(spec.layout, args.out, n_train=n_train, n_test=n_test, seed=args.seed)
    print(
        f"wrote {n_train} train + {n_test} test synthetic {spec.layout} images, {spec.width}x{spec.height} "
        f"(WxH), to {out} in {time.perf_counter() - start:.1f} s"
    )
    print(f"use it with: data.kind={spec.kind} {shlex.quote(f'data.root={out.resolve()}')}")
    return 0


def cmd_sa2va_random_init(args: argparse.Namespace) -> int:
    import shutil

    from policies.sa2va_random import build_checkpoint

    remote = args.remote or os.environ.get("RAYSYS_SA2VA_REMOTE")
    if not remote or not (Path(remote) / "modeling_sa2va_chat.py").is_file():
        raise FileNotFoundError(
            f"{remote or 'no --remote given'}: need the folder of Sa2VA's remote-code files (the *.py files a "
            "Sa2VA release ships, modeling_sa2va_chat.py among them); pass --remote DIR or set RAYSYS_SA2VA_REMOTE"
        )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out")
    partial = out.with_name(
        f".{out.name}.partial"
    )  # renamed when complete: an interrupted build leaves no DIR
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    build_checkpoint(remote, partial, args.shape, seed=args.seed)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    gb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
    print(f"wrote a random-init Sa2VA folder of shape {args.shape} ({gb:.1f} GB of float32 weights) to {out} in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    print(f"use it with: policy.kind=sa2va policy.checkpoint={out.resolve()} policy.trust_remote_code=true")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from raysys.config_io import save_config
    from raysys.stages import run_sft

    cfg = _config(args)
    if cfg.policy.kind != "tiny":
        raise ConfigError("raysys sft trains the tiny policy; a Sa2VA checkpoint is already supervised")
    out = Path(args.out) if args.out else cfg.run_dir / "sft"
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="SFT") as out:
        save_config(cfg, out / "config.yaml")
        res = run_sft(cfg, out)
    _print_metrics("SFT validation", res.val)
    print(
        f"best step {res.best_step}/{res.steps} in {res.seconds:.0f}s; best val threshold "
        f"{res.val_best_threshold:.2f}\ncheckpoint: {res.checkpoint}\nmetrics: {out / 'metrics.json'}"
    )
    return 0


def cmd_reward_net(args: argparse.Namespace) -> int:
    from raysys.config_io import save_config
    from raysys.stages import run_reward_net

    cfg = _config(args)
    out = Path(args.out) if args.out else cfg.run_dir / "reward_net"
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="reward-net") as out:
        save_config(cfg, out / "config.yaml")
        report = run_reward_net(cfg, out, policy_checkpoint=args.policy_checkpoint)
    names = ("val_mse", "val_mae", "val_pearson", "val_spearman", "val_mse_baseline", "final_val_mse")
    _print_metrics("reward net, held-out", {k: getattr(report, k) for k in names})
    print(f"outputs in {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raysys.train import run_training

    cfg = _config(args)
    try:
        res = run_training(cfg, resume=args.resume, progress=not args.no_progress)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, NotADirectoryError):
        raise  # bad config, data or checkpoint, found before training started: main() names it (exit 2)
    except Exception as exc:
        from raysys.runtime import explain_failure, storage_exists, train_storage

        log.exception("training failed")
        storage = train_storage(cfg)
        known = explain_failure(
            exc, f"{cfg.run_dir} and {storage}" if cfg.run.storage_path else str(cfg.run_dir)
        )
        if not storage_exists(f"{storage}/{cfg.run.name}"):
            hint = "no checkpoint was written; after fixing the cause, run the same command again"
        elif known is None or known[2]:
            hint = f"checkpoints so far are in {cfg.run_dir}; after fixing the cause, continue with: raysys train ... --resume"
        else:
            hint = "--resume would load the same refused file; replace it first"
        what = f"{type(exc).__name__}: {_first_lines(str(exc))}"
        if known:
            what = f"{known[0]}; {known[1]}\n  ({what})"
        print(
            f"raysys: error: training of run '{cfg.run.name}' failed: {what}\n  {hint}",
            file=sys.stderr,
        )
        return 1
    _print_metrics(
        f"after {res.metrics.get('iteration', -1) + 1} iterations ({res.seconds:.0f}s)",
        {k: res.metrics[k] for k in keys.SUMMARY if k in res.metrics},
    )
    print(f"run directory: {res.run_dir}\ncheckpoint: {res.checkpoint}")
    return 0


def _first_lines(text: str, n: int = 6) -> str:
    """The head of an error whose text may carry a whole remote traceback (the full one is in the log)."""
    lines = text.strip().splitlines()
    return "\n".join(lines[:n]) + (
        f"\n  ... ({len(lines) - n} more lines in the log above)" if len(lines) > n else ""
    )


def cmd_tune(args: argparse.Namespace) -> int:
    import pandas as pd

    from raysys.tune import run_sweep

    cfg = _config(args)
    res = run_sweep(cfg, resume=args.resume)
    table = res.table.drop(columns=["path", "error"])
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 4):
        print(
            f"\nsweep {cfg.run.name}: {len(table)} trials in {res.seconds:.0f}s\n{table.to_string(index=False)}"
        )
    print(f"table: {res.tune_dir / 'results.parquet'} (and .csv)\nplot: {res.tune_dir / 'results.png'}")
    if res.best_config is not None:
        so_far = " (so far: the sweep is unfinished)" if res.unfinished else ""
        best = res.best[f"best {cfg.tune.metric}"]
        print(f"best trial {res.best['trial_id']}: {cfg.tune.metric} = {best:.4f}{so_far}")
        print(f"best config: {res.best_config}\n  run it with: raysys train {res.best_config}")
    if res.failed:
        print(f"\n{len(res.failed)} of {len(table)} trials FAILED:", file=sys.stderr)
        for row in res.failed:
            print(f"  {row['trial_id']}: {row['error']}\n    logs: {row['path']}", file=sys.stderr)
    if res.unfinished:
        print(
            f"\nthe sweep was interrupted: {len(res.unfinished)} trial(s) unfinished "
            f"({', '.join(res.unfinished)}); continue with: raysys tune ... --resume",
            file=sys.stderr,
        )
    return 1 if res.failed or res.unfinished else 0


def _seeds(args: argparse.Namespace, cfg: Config) -> list[int]:
    return list(args.seeds) if args.seeds else [cfg.run.seed]


def cmd_prompt_rl(args: argparse.Namespace) -> int:
    from raysys.rllib import run_prompt_rl

    cfg = _config(args)
    out = (
        Path(args.out)
        if args.out
        else cfg.run_dir / ("prompt_rl" if cfg.rllib.reward == "gt" else "prompt_rl_learned")
    )
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="prompt-rl") as out:
        res = run_prompt_rl(cfg, _seeds(args, cfg), out)
    base = res["baselines"]["test"]
    s = res["summary"]
    print(
        f"\nprompt-rl ({cfg.rllib.reward} reward), held-out test, {len(res['seeds'])} seed(s), {res['seconds']:.0f}s"
    )
    print(f"  {'policy':<28}{'GT reward':>12}{'Dice':>10}")
    print(f"  {'learned (RLlib PPO)':<28}{s['reward']['mean']:>12.4f}{s['dice']['mean']:>10.4f}")
    fixed = res["baselines"]["fixed_best_prompt"]
    print(f"  {f'best fixed prompt (#{fixed})':<28}{base['fixed_reward']:>12.4f}{base['fixed_dice']:>10.4f}")
    print(f"  {'random prompt':<28}{base['random_reward']:>12.4f}{base['random_dice']:>10.4f}")
    print(f"  {'per-image oracle':<28}{base['oracle_reward']:>12.4f}{base['oracle_dice']:>10.4f}")
    print(f"  largest share of one prompt: {s['max_action_share']['mean']:.2f}")
    if res["learned_vs_gt_reward_on_test"]:
        d = res["learned_vs_gt_reward_on_test"]
        print(
            f"  learned vs GT reward: Spearman {d['spearman']:.3f}, same best prompt on {d['argmax_agreement']:.0%}"
        )
    print(f"results: {out / 'results.json'}")
    return 0


def cmd_postproc_rl(args: argparse.Namespace) -> int:
    from raysys.rllib import run_postproc_rl

    cfg = _config(args)
    out = Path(args.out) if args.out else cfg.run_dir / "postproc_rl"
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="postproc-rl") as out:
        res = run_postproc_rl(cfg, _seeds(args, cfg), out)
    base, s = res["baselines"], res["summary"]
    g = base["best_global_setting"]
    print(f"\npostproc-rl, held-out test, {len(res['seeds'])} seed(s), {res['seconds']:.0f}s")
    print(f"  {'policy':<40}{'GT reward':>12}{'Dice':>10}")
    print(f"  {'learned per-image (RLlib PPO)':<40}{s['reward']['mean']:>12.4f}{s['dice']['mean']:>10.4f}")
    label = f"best global t={g['threshold']:g} r={g['closing_radius']} min={g['min_size']}"
    print(f"  {label:<40}{base['test']['global_reward']:>12.4f}{base['test']['global_dice']:>10.4f}")
    print(f"  {f'default (t={cfg.eval.threshold:g}, none)':<40}{base['test']['default_reward']:>12.4f}"
          f"{base['test']['default_dice']:>10.4f}")  # fmt: skip
    print(f"results: {out / 'results.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raysys.evaluate import evaluate_checkpoint

    cfg = _config(args)
    out = Path(args.out) if args.out else cfg.run_dir / "eval" / args.split
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="evaluation") as out:
        summary = evaluate_checkpoint(cfg, args.checkpoint, out, split=args.split)
    _print_metrics(
        f"{summary['n_images']} {args.split} images at threshold {cfg.eval.threshold}", summary["mean"]
    )
    if "postprocessed" in summary:
        _print_metrics("post-processed", summary["postprocessed"]["mean"])
    print(f"per-image metrics: {out / 'per_image.parquet'}\nsummary: {out / 'metrics.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from raysys.evaluate import export_checkpoint

    cfg = _config(args)
    out = Path(args.out) if args.out else cfg.run_dir / "export"
    with command_output(out, cfg.run_dir, overwrite=args.overwrite, what="export") as out:
        res = export_checkpoint(cfg, args.checkpoint, out)
    print(f"adapter: {res['adapter']}")
    if res["merged"]:
        print(f"merged: {res['merged']} (max logit difference {res['max_logit_diff']:.1e})")
    return 0


DEMO_OVERRIDES = (
    "run.name=demo",
    "reward.weights.dice=0.6",
    "reward.weights.recall=0.15",
    "reward.weights.topology=0.15",
    "reward.weights.length=0.1",
    "reward.weights.cldice=0.2",
    "reward.weights.betti=0.1",
    "reward.postprocess=true",
    "eval.select_metric=val/best_threshold_dice",
    "learner.iterations=100",
    "learner.checkpoint_every=25",
    "reward_net.epochs=5",
)
"""The demo: the tiny synthetic setup on 2 CPU cores (examples/tiny_synthetic.yaml's recipe), sized to finish
well inside 15 minutes."""


def cmd_pipeline(args: argparse.Namespace, cfg: Config | None = None) -> int:
    from raysys.pipeline import Pipeline

    cfg = cfg or _config(args)
    t0 = time.perf_counter()
    rows = Pipeline(cfg).run(force=tuple(args.force or ()), start=args.start, until=args.until)
    print(f"\npipeline {cfg.run.name} ({time.perf_counter() - t0:.0f}s)")
    for r in rows:
        print(f"  {r['stage']:<11} {r['status']:<22} {r['seconds']:8.1f}s")
    comparison = cfg.run_dir / "eval" / "comparison.json"
    if comparison.is_file():
        table = json.loads(comparison.read_text())
        columns = ("threshold", "dice", "recall", "precision", "cldice", "betti0_err", "betti1_err")
        print("\n  " + f"{'model':<16}" + "".join(f"{k:>11}" for k in columns))
        for model, vals in table.items():
            print("  " + f"{model:<16}" + "".join(f"{vals[k]:>11.4f}" for k in columns))
    report = cfg.run_dir / "report" / "report.html"
    if report.is_file():
        print(f"\nreport: {report}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = load_config(None, [*DEMO_OVERRIDES, *args.overrides])
    return cmd_pipeline(args, cfg)


def _print_metrics(title: str, metrics: dict[str, float]) -> None:
    print(title)
    for k, v in metrics.items():
        print(f"  {k:<14} {v:10.4f}")


OVERWRITE_HELP = "replace a result already in the output folder (kept if this command fails)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysys",
        description="RL fine-tuning of Sa2VA-style vessel segmentation on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    config_help = "optional config YAML (overrides only) followed by key=value overrides"

    p = sub.add_parser("config", help="print the resolved configuration")
    p.add_argument("config", nargs="*", help=config_help)
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="dataset tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("preview", help="write a PNG grid of images, masks and overlays")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("-n", type=int, default=6, help="images in the grid")
    p.add_argument("--out", help="PNG path (default runs/<name>/data_preview.png)")
    p.set_defaults(func=cmd_data_preview)
    p = dsub.add_parser(
        "synth-folder", help="write synthetic images as a DRIVE / CHASE_DB1 / STARE folder (real layout)"
    )
    p.add_argument("--layout", required=True, help="drive, chase_db1 or stare")
    p.add_argument("--out", required=True, help="new (or empty) folder to create")
    p.add_argument("--n-train", type=int, help="training images (default: as many as the real dataset)")
    p.add_argument("--n-test", type=int, help="test images (default: as many as the real dataset)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.set_defaults(func=cmd_data_synth_folder)

    from policies.sa2va_random import SHAPES

    sa2va = sub.add_parser("sa2va", help="Sa2VA model tools")
    ssub = sa2va.add_subparsers(dest="sa2va_command", required=True)
    p = ssub.add_parser(
        "random-init", help="write a random-init Sa2VA release folder of a real shape (no weights download)"
    )
    p.add_argument("--shape", required=True, choices=sorted(SHAPES), help="test (tiny LLM and ViT), 1b, 4b")
    p.add_argument("--out", required=True, help="new (or empty) folder to create")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0)")
    p.add_argument("--remote", help="folder of Sa2VA's remote-code *.py files (default $RAYSYS_SA2VA_REMOTE)")
    p.set_defaults(func=cmd_sa2va_random_init)

    p = sub.add_parser("sft", help="supervised baseline of the tiny policy (Sa2VA loss)")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--out", help="output folder (default runs/<name>/sft)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("train", help="RL fine-tuning on Ray (rollout + reward actors, Ray Train learner)")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "tune", help="Ray Tune sweep over the tune.search_space keys (one full RL run a trial)"
    )
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--resume", action="store_true", help="restore an interrupted sweep and finish it")
    p.set_defaults(func=cmd_tune)

    for name, fn, text in (
        ("prompt-rl", cmd_prompt_rl, "RLlib PPO picks a prompt per image (GT or learned reward)"),
        ("postproc-rl", cmd_postproc_rl, "RLlib PPO picks threshold / closing / min size per image"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", nargs="*", help=config_help)
        p.add_argument("--seeds", type=int, nargs="+", help="RL seeds (default run.seed)")
        p.add_argument("--out", help="output folder (default runs/<name>/<experiment>)")
        p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        p.set_defaults(func=fn)

    p = sub.add_parser("eval", help="score a checkpoint on a dataset split (per-image parquet + summary)")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--checkpoint", help="folder with trainable.safetensors (default: the base policy)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", help="output folder (default runs/<name>/eval/<split>)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export trainable weights as a PEFT adapter and a merged model")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--checkpoint", required=True, help="folder with trainable.safetensors")
    p.add_argument("--out", help="output folder (default runs/<name>/export)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_export)

    for name, fn, text in (
        ("pipeline", cmd_pipeline, "data -> sft -> reward_net -> rl -> eval -> export -> report, cached"),
        ("demo", cmd_demo, "the pipeline on the tiny synthetic setup (2 CPU cores, < 15 min)"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "pipeline":
            p.add_argument("config", nargs="*", help=config_help)
        else:
            p.add_argument("overrides", nargs="*", help="key=value overrides of the demo settings")
        p.add_argument("--force", action="append", metavar="STAGE", help="rerun this stage (repeatable)")
        p.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every later one")
        p.add_argument("--until", metavar="STAGE", help="stop after this stage")
        p.set_defaults(func=fn)

    p = sub.add_parser("reward-net", help="train the learned (GT-free) reward network")
    p.add_argument("config", nargs="*", help=config_help)
    p.add_argument("--out", help="output folder (default runs/<name>/reward_net)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--policy-checkpoint", help="tiny SFT checkpoint whose masks are mixed into the data")
    p.set_defaults(func=cmd_reward_net)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # Tune's logger renames "@" in metric keys
    previous = stop_on_sigterm()
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, PipelineError) as exc:
        print(f"raysys: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(
            f"raysys: error: no permission to write {exc.filename}: choose a writable run.output_dir",
            file=sys.stderr,
        )
        return 2
    except NotADirectoryError as exc:
        print(
            f"raysys: error: {exc.filename} needs a folder where a file is; choose another path",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:  # e.g. a Sa2VA checkpoint that cannot be loaded: the message names it
        log.debug("raysys failed", exc_info=True)
        print(f"raysys: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        print(
            f"raysys: {what}; finished outputs and checkpoints are kept. Continue with the same command "
            "(raysys pipeline skips finished stages; raysys train and tune take --resume)",
            file=sys.stderr,
        )
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:  # main() called in-process (tests, notebooks): leave the caller's handler
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
