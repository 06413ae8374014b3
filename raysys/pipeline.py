"""`raysys pipeline` / `raysys demo`: data -> sft -> reward_net -> rl -> eval -> export -> report, cached.

Each stage writes ``runs/<name>/<stage>/`` with a ``manifest.json``: the hash of the config keys that define
the stage, the output digests of its inputs, its own output digests, timings and a summary. A stage is
skipped only when that manifest matches (a changed config key or a changed upstream output reruns it, and
therefore everything downstream whose inputs changed). Stages write into ``<stage>.tmp`` and are renamed
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
from raysys.config import Config, replace, save_config, to_dict

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
    keys: dict[str, Any] = {
        "data": {"data": d["data"]},
        "sft": {"data": d["data"], "sft": d["sft"], "policy": d["policy"], "seed": seed, "eval": d["eval"]},
        "reward_net": {"data": d["data"], "reward_net": d["reward_net"], "seed": seed},
        "rl": {k: d[k] for k in ("data", "policy", "reward", "rollout", "learner", "eval")} | {"seed": seed},
        "eval": {"data": d["data"], "eval": d["eval"], "policy": d["policy"]},
        "export": {"policy": d["policy"]},
        "report": {},
    }[name]
    if name == "reward_net" and cfg.reward_net.target == "reward":  # only then do reward weights matter
        keys["reward"] = d["reward"]
    if name == "data":  # edited, added or removed files rerun data and, through its summary, what follows
        keys["files"] = dataset_fingerprint(cfg.data.root)
    return keys


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


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
        return {"config_hash": _digest(stage_keys(self.cfg, name)), "inputs": inputs}

    def up_to_date(self, name: str) -> bool:
        m = _read_manifest(self.root / name)
        exp = self.expected(name)
        return m is not None and m["config_hash"] == exp["config_hash"] and m["inputs"] == exp["inputs"]

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
            "outputs_digest": _digest(outputs),
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


def run_sft(cfg: Config, out: Path):
    """Supervised baseline of the tiny policy into ``out`` (``model/``, ``metrics.json``); `raysys sft`."""
    import torch

    from envs.datasets import load_dataset
    from policies.sft import train_sft
    from policies.tiny import TinySa2VA
    from raysys.data import dataset_for_split, inference_for, train_view

    train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
    val = dataset_for_split(cfg.data, "val", load=load_dataset)
    torch.manual_seed(cfg.run.seed)
    return train_sft(
        TinySa2VA(), train, val, cfg.sft, out_dir=out, seed=cfg.run.seed, threshold=cfg.eval.threshold,
        crop=cfg.train_crop, crop_min_fov=cfg.data.crop_min_fov, inference=inference_for(cfg),
        progress=True,
    )  # fmt: skip


def policy_mask_fn(checkpoint: str | Path):
    """Masks of a tiny SFT policy (greedy + 2 samples per image) to mix into reward-net data."""
    import numpy as np
    import torch

    from policies.checkpoint import load_base_model

    model = load_base_model(checkpoint).eval()

    def masks(sample, rng: np.random.Generator) -> np.ndarray:
        with torch.no_grad():
            prob = torch.sigmoid(model(sample.image[None], [sample.prompt])[0])
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        sampled = torch.rand((2, *prob.shape), generator=gen) < prob
        return torch.cat([(prob > 0.5)[None], sampled]).numpy()

    return masks


def reward_net_images(cfg: Config, split: str, n: int) -> list:
    """Labelled images the reward net learns from: ``n`` synthetic images of ``split``, or for folder data
    ``n`` training-view pieces of the split (crops or whole rescaled images, in a seeded order; with crops,
    each round over the images draws new crops), so the net sees what RL rollouts score."""
    import numpy as np

    from envs.datasets import load_dataset
    from envs.synthetic import SyntheticFundus
    from raysys.data import dataset_for_split, train_view

    if cfg.data.kind == "synthetic":
        return list(SyntheticFundus(split, n=n, size=cfg.data.size, seed=cfg.data.seed))
    view = train_view(cfg, dataset_for_split(cfg.data, split, load=load_dataset))
    if len(view) == 0:
        raise ValueError(
            f"the {split} split of {cfg.data.root} is empty; the reward net needs labelled images"
        )
    # A seeded order, so n < len(view) still spans the whole split (FIVES lists its categories in turn).
    order = np.random.default_rng([cfg.run.seed, 0x5E]).permutation(len(view))
    pieces = [view.get(int(order[j % len(view)]), j // len(view))[1] for j in range(n)]
    unlabelled = [p.id for p in pieces if not p.has_mask]
    if unlabelled:
        raise ValueError(
            f"the reward net needs labelled images; {split} image {unlabelled[0]} of {cfg.data.root} has no mask"
        )
    return pieces


def run_reward_net(cfg: Config, out: Path, *, policy_checkpoint: str | Path | None = None):
    """Train the learned reward net on labelled images of the configured data (plus SFT policy masks when
    given); `raysys reward-net`."""
    from envs.rewards import MultiObjectiveReward
    from policies.reward_net import build_reward_dataset, train_reward_net

    rn = cfg.reward_net
    reward_fn = MultiObjectiveReward(cfg.reward) if rn.target == "reward" else None
    masks = policy_mask_fn(policy_checkpoint) if policy_checkpoint else None
    datasets = [
        build_reward_dataset(
            reward_net_images(cfg, split, n),
            masks_per_image=rn.masks_per_image, seed=cfg.run.seed + k, target=rn.target, reward_fn=reward_fn,
            policy_masks=masks,
        )
        for k, (split, n) in enumerate((("train", rn.n_train), ("val", rn.n_val)))
    ]  # fmt: skip
    return train_reward_net(*datasets, rn, out_dir=out, seed=cfg.run.seed, reward_fn=reward_fn)


def _sft(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    if cfg.policy.kind != "tiny":
        (out / "summary.json").write_text(json.dumps({"skipped": "a Sa2VA checkpoint is already supervised"}))
        return {"skipped": True}
    res = run_sft(cfg, out)
    return {"val": res.val, "seconds": res.seconds, "best_step": res.best_step}


def _base_checkpoint(cfg: Config, inputs: dict[str, Path]) -> str | None:
    sft_model = inputs["sft"] / "model"
    return str(sft_model) if sft_model.is_dir() else cfg.policy.checkpoint


def _reward_net(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
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
    from raysys.evaluate import evaluate_checkpoint

    base = _base_checkpoint(cfg, inputs)
    cfg = replace(cfg, [f"policy.checkpoint={base}"]) if base else cfg
    models = {"sft": None, "rl": inputs["rl"] / "checkpoints" / "best"}
    table = {}
    for label, ckpt in models.items():
        val = evaluate_checkpoint(cfg, ckpt, out / f"{label}_val", split="val")
        best_t = val["best_threshold_on_this_split"]
        test = evaluate_checkpoint(cfg, ckpt, out / label, split="test")
        at_best = evaluate_checkpoint(
            replace(cfg, [f"eval.threshold={best_t}"]), ckpt, out / f"{label}_best_t"
        )
        table[label] = {"threshold": cfg.eval.threshold, **test["mean"]}
        table[f"{label}@val_best_t"] = {"threshold": best_t, **at_best["mean"]}
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
