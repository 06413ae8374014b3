"""`raysys pipeline` / `raysys demo`: data -> sft -> reward_net -> rl -> eval -> export -> report, cached.

Each stage writes ``runs/<name>/<stage>/`` with a ``manifest.json``: the hash of the config keys that define
the stage, the output digests of its inputs, its own output digests, timings and a summary. A stage is
skipped only when that manifest matches and its recorded outputs still have their digests (a changed config
key, a changed upstream output or an edited or deleted output file reruns it, and therefore everything
downstream whose inputs changed). Stages write into ``<stage>.tmp`` and are renamed
into place when finished, so an interrupted stage leaves nothing half-written behind. An interrupted rl
stage continues from its last checkpoint when the same command runs again (same config keys and inputs);
other stages start over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysys import keys
from raysys.config import Config
from raysys.config_io import config_hash, replace, save_config, to_dict

log = logging.getLogger(__name__)

STAGES = ("data", "sft", "reward_net", "rl", "eval", "export", "report")
MANIFEST = "manifest.json"
STARTED = ".started.json"
"""Written into <stage>.tmp when a stage starts: the config keys and inputs it runs with."""


class PipelineError(RuntimeError):
    """A stage failed; earlier stages' outputs are kept."""


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    run: Callable[[Config, dict[str, Path], Path], dict[str, Any]]
    """(config, input stage dirs, output dir) -> summary; writes its files into the output dir."""
    outputs: tuple[str, ...]
    """Files (relative to the stage dir) whose bytes define the stage's result for downstream stages."""
    resumable: bool = False
    """An interrupted run (same config keys and inputs) continues in its ``<stage>.tmp`` instead of
    starting over; the stage finds its own checkpoints there."""


def stage_keys(cfg: Config, name: str) -> dict[str, Any]:
    """The config values a stage depends on (its identity besides its inputs)."""
    d = to_dict(cfg)
    seed = d["run"]["seed"]
    deps: dict[str, Any] = {
        "data": {"data": d["data"]},
        "sft": {"data": d["data"], "sft": d["sft"], "policy": d["policy"], "seed": seed, "eval": d["eval"]},
        "reward_net": {"data": d["data"], "reward_net": d["reward_net"], "seed": seed},
        "rl": {k: d[k] for k in ("data", "policy", "reward", "rollout", "learner", "eval")} | {"seed": seed},
        "eval": {"data": d["data"], "eval": d["eval"], "policy": d["policy"]},
        "export": {"policy": d["policy"]},
        "report": {},
    }[name]
    if name == "reward_net" and cfg.reward_net.target == "reward":  # only then do reward weights matter
        deps["reward"] = d["reward"]
    if name == "data":  # edited, added or removed files rerun data and, through its summary, what follows
        deps["files"] = dataset_fingerprint(cfg.data.root)
    return deps


def dataset_fingerprint(root: str | None) -> str | None:
    """Digest of every file under the dataset root (relative path, size, modification time): cheap even for
    FIVES' 1,600 files, and any edit to an image, mask or manifest changes it. None for synthetic data."""
    if root is None:
        return None
    base = Path(root).expanduser()
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(base) if p != base else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _altered_outputs(stage_dir: Path, recorded: dict[str, str]) -> list[str]:
    """The recorded outputs of a finished stage whose file is gone or whose bytes differ from its digest."""
    return [
        rel
        for rel, digest in recorded.items()
        if not (stage_dir / rel).is_file() or _file_digest(stage_dir / rel) != digest
    ]


def _read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    return _read_json(stage_dir / MANIFEST)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


class Pipeline:
    def __init__(self, cfg: Config, *, progress: bool = True) -> None:
        self.cfg = cfg
        self.root = cfg.run_dir.resolve()
        self.progress = progress
        self.stages = _stages()

    def expected(self, name: str) -> dict[str, Any]:
        """What the manifest of ``name`` must say for the stage to be skipped."""
        stage = self.stages[name]
        inputs = {}
        for up in stage.inputs:
            m = _read_manifest(self.root / up)
            inputs[up] = m["outputs_digest"] if m else None
        return {"config_hash": config_hash(stage_keys(self.cfg, name)), "inputs": inputs}

    def up_to_date(self, name: str) -> bool:
        m = _read_manifest(self.root / name)
        exp = self.expected(name)
        if m is None or m["config_hash"] != exp["config_hash"] or m["inputs"] != exp["inputs"]:
            return False
        altered = _altered_outputs(self.root / name, m.get("outputs", {}))
        if altered:
            log.warning(
                "stage %s: %s changed or vanished since the stage finished; running it again",
                name, ", ".join(str(self.root / name / rel) for rel in altered),
            )  # fmt: skip
            return False
        return True

    def run(
        self, *, force: tuple[str, ...] = (), start: str | None = None, until: str | None = None
    ) -> list[dict[str, Any]]:
        """Run (or skip) every stage in order; returns one status row per stage."""
        for s in (*force, start, until):
            if s is not None and s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
        if start and until and STAGES.index(until) < STAGES.index(start):
            raise ValueError(
                f"--until {until} comes before --from {start}; stages run in order {', '.join(STAGES)}"
            )
        from raysys.runtime import run_lock

        self.root.mkdir(parents=True, exist_ok=True)
        with run_lock(self.root):
            save_config(self.cfg, self.root / "config.yaml")
            first = STAGES.index(start) if start else len(STAGES)
            last = STAGES.index(until) if until else len(STAGES) - 1
            rows = []
            for i, name in enumerate(STAGES[: last + 1]):
                forced = name in force or i >= first
                if not forced and self.up_to_date(name):
                    rows.append({"stage": name, "status": "skipped (up to date)", "seconds": 0.0})
                    log.info("stage %s: up to date, skipped", name)
                    continue
                rows.append(self._run_stage(name))
            return rows

    def _run_stage(self, name: str) -> dict[str, Any]:
        stage = self.stages[name]
        missing = [up for up in stage.inputs if _read_manifest(self.root / up) is None]
        if missing:
            raise PipelineError(f"stage '{name}' needs {missing} first; run without --from/--until limits")
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        exp = self.expected(name)
        started = json.loads(json.dumps(exp, default=str))
        if stage.resumable and _read_json(tmp / STARTED) == started:
            log.info("stage %s: continuing the interrupted run in %s", name, tmp)
        else:  # a stale or foreign partial result: inside this run's directory, safe to clear
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            (tmp / STARTED).write_text(json.dumps(started))
            log.info("stage %s: running", name)
        t0 = time.perf_counter()
        try:
            summary = stage.run(self.cfg, {up: self.root / up for up in stage.inputs}, tmp)
        except Exception as exc:
            raise PipelineError(
                f"stage '{name}' failed: {type(exc).__name__}: {exc}\n"
                f"  outputs of earlier stages are kept in {self.root}; after fixing the cause, rerun the same "
                f"command (finished stages are skipped) or add --from {name}"
            ) from exc
        outputs = {rel: _file_digest(tmp / rel) for rel in stage.outputs if (tmp / rel).is_file()}
        manifest = {
            "stage": name,
            **exp,
            "outputs": outputs,
            "outputs_digest": config_hash(outputs),
            "seconds": round(time.perf_counter() - t0, 2),
            "summary": summary,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return {"stage": name, "status": "ran", "seconds": manifest["seconds"]}


# ------------------------------------------------------------------------------------------- stages
def _data(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split
    from raysys.viz import preview_grid

    counts, size = {}, None
    for split in ("train", "val", "test"):
        samples = dataset_for_split(cfg.data, split, load=load_dataset)
        counts[split] = len(samples)
        if split == "train":
            preview_grid([samples[i] for i in range(min(4, len(samples)))], out / "preview.png")
            size = list(samples[0].mask.shape)
    summary = {
        "kind": cfg.data.kind,
        "root": cfg.data.root,
        "counts": counts,
        "image_size_hw": size,
        "train_crop": cfg.train_crop,
        "files": dataset_fingerprint(cfg.data.root),
        "scale": cfg.data.scale,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _sft(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    if cfg.policy.kind != "tiny":
        (out / "summary.json").write_text(json.dumps({"skipped": "a Sa2VA checkpoint is already supervised"}))
        return {"skipped": True}
    from raysys.stages import run_sft

    res = run_sft(cfg, out)
    return {"val": res.val, "seconds": res.seconds, "best_step": res.best_step}


def _base_checkpoint(cfg: Config, inputs: dict[str, Path]) -> str | None:
    sft_model = inputs["sft"] / "model"
    return str(sft_model) if sft_model.is_dir() else cfg.policy.checkpoint


def _reward_net(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from raysys.stages import run_reward_net

    sft_model = inputs["sft"] / "model"
    report = run_reward_net(cfg, out, policy_checkpoint=sft_model if sft_model.is_dir() else None)
    return {k: getattr(report, k) for k in ("val_mse", "val_pearson", "val_spearman", "final_val_mse")}


def _rl(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from raysys.runtime import absolute_paths, storage_exists, train_storage
    from raysys.train import run_training

    overrides = [f"run.output_dir={out.parent}", f"run.name={out.name}"]
    base = _base_checkpoint(cfg, inputs)
    if base:
        overrides.append(f"policy.checkpoint={base}")
    overrides.append(f"reward.reward_net={inputs['reward_net'] / 'best_reward_net.pth'}")
    run_cfg = absolute_paths(replace(cfg, overrides))
    # Checkpoints left by an interrupted run of this same stage: continue from the last one.
    resume = storage_exists(f"{train_storage(run_cfg)}/{run_cfg.run.name}")
    res = run_training(run_cfg, progress=True, resume=resume)
    keep = keys.SUMMARY
    return {"seconds": res.seconds, "last": {k: res.metrics.get(k) for k in keep}}


def _eval(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """SFT (the base policy) and RL (best validation checkpoint) on the test split, at 0.5 and at each
    model's best validation threshold."""
    from envs.datasets import load_dataset
    from raysys.data import dataset_for_split
    from raysys.evaluate import evaluate_checkpoint

    base = _base_checkpoint(cfg, inputs)
    cfg = replace(cfg, [f"policy.checkpoint={base}"]) if base else cfg
    models = {"sft": None, "rl": inputs["rl"] / "checkpoints" / "best"}
    val_set, test_set = (dataset_for_split(cfg.data, split, load=load_dataset) for split in ("val", "test"))
    table = {}
    for label, ckpt in models.items():
        val = evaluate_checkpoint(
            cfg, ckpt, out / f"{label}_val", split="val", keep_probs=False, samples=val_set
        )
        best_t = val["best_threshold_on_this_split"]
        # One prediction of the test images, scored at 0.5 and at the validation-best threshold.
        test = evaluate_checkpoint(
            cfg, ckpt, out / label, also_at={"best_t": (best_t, out / f"{label}_best_t")}, samples=test_set
        )
        table[label] = {"threshold": cfg.eval.threshold, **test["mean"]}
        table[f"{label}@val_best_t"] = {"threshold": best_t, **test["also_at"]["best_t"]["mean"]}
        shutil.rmtree(out / f"{label}_val")
    (out / "comparison.json").write_text(json.dumps(table, indent=2))
    return table


def _export(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from raysys.evaluate import export_checkpoint

    base = _base_checkpoint(cfg, inputs)
    cfg = replace(cfg, [f"policy.checkpoint={base}"]) if base else cfg
    return export_checkpoint(cfg, inputs["rl"] / "checkpoints" / "best", out)


def _report(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from raysys.report import write_report

    return {"report": str(write_report(cfg, inputs, out))}


def _stages() -> dict[str, Stage]:
    return {
        s.name: s
        for s in (
            Stage("data", (), _data, ("summary.json",)),
            Stage("sft", ("data",), _sft, ("model/model.safetensors", "summary.json")),
            Stage("reward_net", ("sft",), _reward_net, ("best_reward_net.pth",)),
            Stage(
                "rl", ("sft", "reward_net"), _rl, ("checkpoints/best/trainable.safetensors",), resumable=True
            ),
            Stage("eval", ("sft", "rl"), _eval, ("comparison.json",)),
            Stage("export", ("sft", "rl"), _export, ("adapter/adapter_model.safetensors",)),
            Stage("report", ("data", "sft", "reward_net", "rl", "eval"), _report, ("report.html",)),
        )
    }
