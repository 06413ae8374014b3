"""The fault matrix: bad inputs and misuse through the real ``raysys`` CLI, each with the exit code and the
message a user must see, and the promise that nothing already on disk changes.

A case builds its bad input inside a fresh world folder (``World``), then runs ``raysys.cli.main`` in this
process. ``run_case`` returns what happened; ``tests/unit/test_fault_matrix.py`` asserts it for every case
and ``benchmarks/reliability.py`` counts the outcomes. Ray never starts here: a case that would reach
``ray.init`` fails with "Ray would start", so every check below happens before Ray (faults during a Ray run
are in the reliability benchmark and in tests/ray and tests/e2e).

Outcomes: ``clear`` (the expected exit code and the message naming the key/file and the fix), ``silent``
(exit 0 where an error or warning was due, or an unclear message), ``data_loss`` (a file that existed before
the command changed or vanished).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

FAST = ("data.size=64", "data.n_train=4", "data.n_val=2", "data.n_test=2")
"""Synthetic data small enough that a case that gets as far as evaluating a model takes well under 1 s."""


@dataclass(frozen=True)
class Case:
    id: str
    category: str
    """config | data | checkpoint | run | security"""
    argv: Callable[[World], list[str]]
    """Builds the bad input in the world and returns the raysys arguments."""
    code: int
    message: str
    """A regular expression that must match the command's output (stdout, stderr and log records)."""


@dataclass
class Outcome:
    code: int
    output: str
    changed: list[str] = field(default_factory=list)
    """Files that existed before the command and were modified or deleted by it."""


class World:
    """One case's folder: ``out`` is the output folder every command gets; shared assets (a DRIVE-layout
    folder, a tiny base model, a trained checkpoint, a finished run) are copied in on demand."""

    def __init__(self, root: Path, assets: Path) -> None:
        self.root, self.assets = root, assets
        self.out = root / "out"
        self.out.mkdir(parents=True, exist_ok=True)
        # Something that must survive outside the output folder (a run name like ".." must not reach it).
        (root / "outside.txt").write_text("not raysys's\n")
        self.patches: list[tuple[str, str, Callable]] = []

    def run(self, *overrides: str) -> list[str]:
        return [f"run.output_dir={self.out}", *FAST, *overrides]

    def file(self, name: str, text: str | bytes) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    def _asset(self, name: str, build: Callable[[Path], None]) -> Path:
        src = self.assets / name
        if not src.exists():
            tmp = self.assets / f".{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(src)
        dst = self.root / name
        if not dst.exists():
            shutil.copytree(src, dst)
        return dst

    def drive(self) -> Path:
        """A DRIVE-layout folder: 2 training and 1 test image, 565 x 584, the real file formats."""
        from envs.folders import write_dataset_folder

        return self._asset("drive", lambda d: write_dataset_folder("drive", d, n_train=2, n_test=1, seed=0))

    def base(self) -> Path:
        """A tiny base model folder (model.safetensors + config.json), as SFT writes it."""

        def build(d: Path) -> None:
            from policies.checkpoint import save_base_model
            from policies.config import PolicyConfig
            from policies.factory import build_base_model

            save_base_model(build_base_model(PolicyConfig(), seed=7), d)

        return self._asset("base", build)

    def ckpt(self) -> Path:
        """Trainable weights (LoRA + heads) on ``base()``, with their meta.json."""
        base = self.base()

        def build(d: Path) -> None:
            from policies.checkpoint import save_trainable
            from policies.config import PolicyConfig
            from policies.factory import build_policy

            save_trainable(build_policy(PolicyConfig(checkpoint=str(self.assets / "base")), seed=0), d)

        path = self._asset("ckpt", build)
        meta = json.loads((path / "meta.json").read_text())
        if meta["base"]["checkpoint"] != str(base.resolve()):  # the copy points at this world's base
            meta["base"]["checkpoint"] = str(base.resolve())
            (path / "meta.json").write_text(json.dumps(meta, indent=2))
        return path

    def finished_run(self, name: str = "done") -> Path:
        """runs/<name> of a finished training run: config.yaml, metrics.jsonl and checkpoints/best."""
        from raysys.config_io import load_config, save_config

        run = self.out / name
        (run / "checkpoints" / "best").mkdir(parents=True)
        (run / "checkpoints" / "best" / "trainable.safetensors").write_bytes(b"weights")
        (run / "metrics.jsonl").write_text("".join(f'{{"iteration": {i}}}\n' for i in range(6)))
        save_config(load_config(None, [*self.run(f"run.name={name}")]), run / "config.yaml")
        return run


def snapshot(root: Path) -> dict[str, str]:
    """Content digest of every file under ``root`` (lock files aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != ".lock":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _RayWouldStart(RuntimeError):
    pass


def _no_ray(*args, **kwargs):
    raise _RayWouldStart("Ray would start: this case should have stopped before Ray")


@contextlib.contextmanager
def _captured_logs(buf: io.StringIO):
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_case(case: Case, world: World) -> Outcome:
    """Build the case's input, run the CLI in this process (Ray blocked), and report what happened."""
    import ray

    from raysys.cli import main

    argv = case.argv(world)
    before = snapshot(world.root)
    buf = io.StringIO()
    real_init = ray.init
    ray.init = _no_ray
    undo = []
    for module, attr, value in world.patches:
        mod = importlib.import_module(module)
        undo.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)
    try:
        with _captured_logs(buf), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 2
            except Exception as exc:  # a raw traceback: the case records it as unclear
                code = -1
                buf.write(f"UNCAUGHT {type(exc).__name__}: {exc}")
    finally:
        ray.init = real_init
        for mod, attr, value in undo:
            setattr(mod, attr, value)
    after = snapshot(world.root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    return Outcome(code=code, output=buf.getvalue(), changed=changed)


def classify(case: Case, outcome: Outcome) -> str:
    """``clear``, ``silent`` or ``data_loss`` (see the module doc)."""
    if outcome.changed:
        return "data_loss"
    if outcome.code == case.code and re.search(case.message, outcome.output, re.S):
        return "clear"
    return "silent"


# ----------------------------------------------------------------------------------------------- helpers


def _cfg(*overrides: str, cmd: str = "config") -> Callable[[World], list[str]]:
    return lambda w: [*cmd.split(), *w.run(*overrides)]


def _yaml(text: str, *overrides: str, cmd: str = "config") -> Callable[[World], list[str]]:
    return lambda w: [*cmd.split(), str(w.file("cfg.yaml", text)), *w.run(*overrides)]


def _drive(edit: Callable[[Path], None], *overrides: str, cmd: str = "data preview") -> Callable:
    """A DRIVE folder broken by ``edit``, then ``raysys <cmd> data.kind=drive data.root=...``."""

    def argv(w: World) -> list[str]:
        root = w.drive()
        edit(root)
        return [*cmd.split(), *w.run("data.kind=drive", f"data.root={root}", *overrides)]

    return argv


def _train_img(root: Path, n: int = 21) -> Path:
    return root / "training" / "images" / f"{n}_training.tif"


def _train_gt(root: Path, n: int = 21) -> Path:
    return root / "training" / "1st_manual" / f"{n}_manual1.gif"


def _write_gif(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _manifest(entries: list[dict], *overrides: str, cmd: str = "data preview") -> Callable:
    """A polygon_json folder (one 64x64 PNG image + annotations.json with ``entries``)."""

    def argv(w: World) -> list[str]:
        root = w.root / "poly"
        (root / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / "a.png")
        (root / "annotations.json").write_text(json.dumps(entries))
        return [*cmd.split(), *w.run("data.kind=polygon_json", f"data.root={root}", *overrides)]

    return argv


_POLY = [[4, 4, 60, 4, 60, 8, 4, 8]]


def _ckpt(edit: Callable[[World, Path], None], *overrides: str, cmd: str = "eval") -> Callable:
    """A trained checkpoint edited by ``edit``, then ``raysys <cmd> --checkpoint ...``."""

    def argv(w: World) -> list[str]:
        ck = w.ckpt()
        edit(w, ck)
        return [cmd, "--checkpoint", str(ck), *w.run(*overrides)]

    return argv


def _meta_edit(fn: Callable[[dict], None]) -> Callable[[World, Path], None]:
    def edit(w: World, ck: Path) -> None:
        meta = json.loads((ck / "meta.json").read_text())
        fn(meta)
        (ck / "meta.json").write_text(json.dumps(meta))

    return edit


def _pickle_bomb() -> bytes:
    """A torch-style pickle whose unpickling would run ``os.system``: must never be unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/raysys_pwned",))

    return pickle.dumps(Boom())


def _held_lock(w: World) -> list[str]:
    """A second process holds the run's lock (the first run is still going)."""
    import fcntl

    run = w.out / "busy"
    run.mkdir(parents=True)
    fd = os.open(run / ".lock", os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    w.held_fd = fd  # type: ignore[attr-defined]  # released by the other process (fcntl locks are per open)
    return ["train", *w.run("run.name=busy")]


def _empty_masks(root: Path) -> None:
    for p in root.rglob("*_manual1.gif"):
        _write_gif(p, np.zeros(Image.open(p).size[::-1], np.uint8))


def _empty_one(root: Path) -> None:
    p = _train_gt(root)
    _write_gif(p, np.zeros(Image.open(p).size[::-1], np.uint8))


def _full_masks(root: Path) -> None:
    for p in root.rglob("*_manual1.gif"):
        _write_gif(p, np.full(Image.open(p).size[::-1], 255, np.uint8))


def _resize_image(root: Path) -> None:
    Image.open(_train_img(root)).resize((300, 300)).save(_train_img(root))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _stare_gz_garbage(w: World) -> list[str]:
    from envs.folders import write_dataset_folder

    root = write_dataset_folder("stare", w.root / "stare", n_train=1, n_test=0, seed=0)
    first = sorted((root / "stare-images").iterdir())[0]
    first.write_bytes(gzip.compress(b"P6 not a ppm"))
    return ["data", "preview", *w.run("data.kind=stare", f"data.root={root}")]


def _symlink_manifest(w: World) -> list[str]:
    """An image inside the dataset folder that is a link to a file outside it."""
    argv = _manifest([{"image": "images/link.png", "mask": _POLY}])(w)
    outside = w.root / "elsewhere.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(outside)
    (w.root / "poly" / "images" / "link.png").symlink_to(outside)
    return argv


def _mixed_sizes(w: World) -> list[str]:
    """Images of different sizes in one split: evaluated one by one, at their own size."""
    argv = _manifest(
        [{"image": "a.png", "mask": _POLY}, {"image": "b.png", "mask": _POLY}], cmd="eval --split train"
    )(w)
    Image.fromarray(np.full((80, 96, 3), 90, np.uint8)).save(w.root / "poly" / "images" / "b.png")
    return argv


def _patched(target: str, exc: BaseException, argv: list[str]) -> Callable[[World], list[str]]:
    """``argv`` with ``module.attr`` replaced by a function that raises ``exc`` (a fault mid-command)."""

    def build(w: World) -> list[str]:
        def boom(*args, **kwargs):
            raise exc

        module, attr = target.rsplit(".", 1)
        w.patches.append((module, attr, boom))
        return [*argv, *w.run()]

    return build


def _failed_with_checkpoints(w: World) -> list[str]:
    argv = _patched("raysys.train.run_training", RuntimeError("boom"), ["train"])(w)
    (w.out / "tiny" / "ray" / "tiny").mkdir(parents=True)  # Ray Train checkpoints of the failed run
    return argv


def _booby_trapped(w: World) -> Path:
    """A Sa2VA-looking folder whose modeling code would overwrite a file outside it if it ever ran."""
    folder = w.root / "sa2va"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"auto_map": {"AutoModel": "modeling_sa2va_chat.Sa2VAChatModel"}})
    )
    (folder / "modeling_sa2va_chat.py").write_text(
        f"open({str(w.root / 'outside.txt')!r}, 'w').write('pwned')\n"
    )
    return folder


def _bad_manifest(w: World, text: str) -> list[str]:
    argv = _manifest([])(w)
    (w.root / "poly" / "annotations.json").write_text(text)
    return argv


def _parquet(w: World, content: bytes | None) -> list[str]:
    """A parquet manifest: ``content`` bytes as the file, or (None) a valid table without image columns."""
    root = w.root / "pq"
    root.mkdir()
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": ["a"], "mask_path": ["m.png"]}), root / "manifest.parquet")
    else:
        (root / "manifest.parquet").write_bytes(content)
    return ["data", "preview", *w.run("data.kind=parquet", f"data.root={root}")]


def _other_base(w: World) -> list[str]:
    """A checkpoint trained on one base model, evaluated on another (a fresh tiny model)."""
    ck = w.ckpt()
    other = w.root / "other_base"
    from policies.checkpoint import save_base_model
    from policies.config import PolicyConfig
    from policies.factory import build_base_model

    save_base_model(build_base_model(PolicyConfig(), seed=11), other)
    return ["eval", "--checkpoint", str(ck), *w.run(f"policy.checkpoint={other}")]


def _drop_tensor(ck: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "trainable.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(ck / "trainable.safetensors"))


def _corrupt_base(w: World) -> list[str]:
    base = w.base()
    _truncate(base / "model.safetensors")
    return ["train", *w.run(f"policy.checkpoint={base}")]


def _pickle_base(w: World) -> list[str]:
    base = w.base()
    (base / "model.safetensors").write_bytes(_pickle_bomb())
    return ["train", *w.run(f"policy.checkpoint={base}")]


def _over_finished_run(*, other_storage: bool = False, keep_checkpoints: bool = True) -> Callable:
    """``raysys train`` under the name of a finished run (no --resume)."""

    def argv(w: World) -> list[str]:
        run = w.finished_run()
        if not keep_checkpoints:
            shutil.rmtree(run / "checkpoints")
        storage = [f"run.storage_path={w.root / 'elsewhere'}"] if other_storage else []
        return ["train", *w.run("run.name=done", *storage)]

    return argv


def _resume_changed(w: World) -> list[str]:
    run = w.finished_run()
    (run / "ray" / "done").mkdir(parents=True)  # its Ray Train checkpoints
    return ["train", "--resume", *w.run("run.name=done", "learner.lr=1e-3")]


# -------------------------------------------------------------------------------------------- the table

NAME = r"run\.name.*plain"
FINITE = r"finite"

CASES: list[Case] = [
    # ---- config: every value checked once, at load, naming the key
    *(
        Case(f"config-run-name-{i}", "config", _cfg(f"run.name={v}"), 2, NAME)
        for i, v in enumerate(["..", "../x", "a/b", "''", ".hidden", "-x", "a b", "'~'", "/etc"])
    ),
    *(
        Case(f"config-nonfinite-{k}={v}", "config", _cfg(f"{k}={v}"), 2, rf"{re.escape(k)}.*{FINITE}")
        for k, v in [
            ("sft.lr", "inf"),
            ("sft.lr", "nan"),
            ("learner.lr", "inf"),
            ("learner.kl_coef", "inf"),
            ("rollout.temperature", "inf"),
            ("reward.weights.dice", "nan"),
            ("learner.clip", "-inf"),
            ("eval.threshold", "nan"),
        ]
    ),
    Case("config-num-cpus-inf", "config", _cfg("run.num_cpus=inf"), 2, r"run\.num_cpus"),
    Case("config-lr-negative", "config", _cfg("learner.lr=-1e-3"), 2, r"learner\.lr"),
    Case("config-sft-lr-zero", "config", _cfg("sft.lr=0"), 2, r"sft\.lr"),
    Case("config-kl-negative", "config", _cfg("learner.kl_coef=-0.1"), 2, r"learner\.kl_coef"),
    Case("config-temperature-zero", "config", _cfg("rollout.temperature=0"), 2, r"rollout\.temperature"),
    Case("config-lora-alpha-zero", "config", _cfg("policy.lora_alpha=0"), 2, r"policy\.lora_alpha"),
    Case("config-lora-alpha-negative", "config", _cfg("policy.lora_alpha=-16"), 2, r"policy\.lora_alpha"),
    Case("config-lora-r-zero", "config", _cfg("policy.lora_r=0"), 2, r"policy\.lora_r"),
    Case("config-sft-bce-negative", "config", _cfg("sft.bce_weight=-1"), 2, r"sft\.bce_weight"),
    Case("config-sft-weights-zero", "config", _cfg("sft.bce_weight=0", "sft.dice_weight=0"), 2, r"sft\."),
    Case(
        "config-reward-weights-all-zero",
        "config",
        _cfg(*(f"reward.weights.{k}=0" for k in ("dice", "recall", "topology", "length"))),
        2,
        r"reward\.weights",
    ),
    Case("config-reward-weight-negative", "config", _cfg("reward.weights.dice=-1"), 2, r"reward\.weights"),
    Case("config-tile-larger-than-image", "config", _cfg("reward.tile_sizes=[128]"), 2, r"tile"),
    Case(
        "config-reward-cuda-no-rollout-gpu",
        "config",
        _cfg("reward.device=cuda"),
        2,
        r"reward\.device.*rollout\.gpus_per_worker=0",
    ),
    Case(
        "config-reward-device-unknown",
        "config",
        _cfg("reward.device=gpu"),
        2,
        r"reward\.device.*'auto', 'cpu', 'cuda'",
    ),
    Case("config-tile-zero", "config", _cfg("reward.tile_sizes=[0]"), 2, r"reward\.tile_sizes"),
    Case("config-thresholds-empty", "config", _cfg("eval.thresholds=[]"), 2, r"eval\.thresholds"),
    Case("config-threshold-above-one", "config", _cfg("eval.threshold=1.5"), 2, r"eval\.threshold"),
    Case(
        "config-select-metric-typo", "config", _cfg("eval.select_metric=val/dcie"), 2, r"eval\.select_metric"
    ),
    Case("config-iterations-zero", "config", _cfg("learner.iterations=0"), 2, r"learner\.iterations"),
    Case("config-iterations-float", "config", _cfg("learner.iterations=1.5"), 2, r"learner\.iterations"),
    Case("config-lr-not-a-number", "config", _cfg("learner.lr=fast"), 2, r"learner\.lr"),
    Case("config-workers-zero", "config", _cfg("rollout.num_workers=0"), 2, r"rollout\.num_workers"),
    Case("config-group-of-one", "config", _cfg("rollout.samples_per_image=1"), 2, r"samples_per_image"),
    Case("config-minibatch-zero", "config", _cfg("learner.minibatch_size=0"), 2, r"learner\.minibatch_size"),
    Case("config-algorithm-unknown", "config", _cfg("learner.algorithm=reinforce"), 2, r"learner\.algorithm"),
    Case("config-policy-kind-unknown", "config", _cfg("policy.kind=unet"), 2, r"policy\.kind"),
    Case("config-data-kind-unknown", "config", _cfg("data.kind=kaggle"), 2, r"data\.kind"),
    Case("config-crop-negative", "config", _cfg("data.crop=-5"), 2, r"data\.crop"),
    Case("config-scale-zero", "config", _cfg("data.scale=0"), 2, r"data\.scale"),
    Case("config-window-overlap-one", "config", _cfg("eval.window_overlap=1.0"), 2, r"eval\.window_overlap"),
    Case("config-val-fraction-one", "config", _cfg("data.val_fraction=1.0"), 2, r"data\.val_fraction"),
    Case(
        "config-unknown-key-typo",
        "config",
        _cfg("learner.lrr=1"),
        2,
        r"unknown config key 'learner\.lrr'.*did you mean",
    ),
    Case("config-unknown-section", "config", _cfg("optimizer.lr=1"), 2, r"unknown config key 'optimizer'"),
    Case("config-no-equals", "config", lambda w: ["config", "learner.lr"], 2, r"learner\.lr=VALUE"),
    Case("config-file-missing", "config", lambda w: ["config", str(w.root / "nope.yaml")], 2, r"nope\.yaml"),
    Case("config-file-is-a-list", "config", _yaml("- 1\n- 2\n"), 2, r"cfg\.yaml.*mapping"),
    Case("config-file-bad-yaml", "config", _yaml("learner: {lr: [\n"), 2, r"cfg\.yaml"),
    Case(
        "config-file-duplicate-key",
        "config",
        _yaml("learner:\n  lr: 1e-3\n  lr: 1e-4\n"),
        2,
        r"duplicate.*lr",
    ),
    Case("config-file-unknown-key", "config", _yaml("learner:\n  lrr: 1e-3\n"), 2, r"learner\.lrr"),
    Case(
        "config-file-not-utf8",
        "config",
        lambda w: ["config", str(w.file("cfg.yaml", b"\xff\xfe\x00bad"))],
        2,
        r"cfg\.yaml",
    ),
    Case(
        "config-file-wrong-type", "config", _yaml("learner:\n  iterations: many\n"), 2, r"learner\.iterations"
    ),
    Case("config-section-not-mapping", "config", _yaml("learner: 3\n"), 2, r"learner"),
    Case(
        "config-learned-reward-without-net", "config", _cfg("reward.source=learned"), 2, r"reward\.reward_net"
    ),
    Case("config-reward-source-unknown", "config", _cfg("reward.source=oracle"), 2, r"reward\.source"),
    Case("config-tune-mode", "config", _cfg("tune.mode=maximize"), 2, r"tune\.mode"),
    Case(
        "config-tune-search-key-unknown",
        "config",
        _cfg("tune.search_space={learner.lrr: [1, 2]}"),
        2,
        r"learner\.lrr",
    ),
    Case("config-max-failures", "config", _cfg("learner.max_failures=-2"), 2, r"learner\.max_failures"),
    Case("config-sft-steps-negative", "config", _cfg("sft.steps=-1"), 2, r"sft\.steps"),
    Case("config-valid-prints", "config", _cfg("learner.lr=1e-3"), 0, r"lr: 0\.001"),
    # ---- data: clear errors naming the file, loud warnings for degenerate ground truth
    Case(
        "data-root-missing",
        "data",
        _cfg("data.kind=drive", "data.root=/nonexistent/drive", cmd="data preview"),
        2,
        r"/nonexistent/drive",
    ),
    Case("data-root-unset", "data", _cfg("data.kind=drive", cmd="data preview"), 2, r"data\.root"),
    Case(
        "data-root-empty-folder",
        "data",
        lambda w: ["data", "preview", *w.run("data.kind=drive", f"data.root={w.root}")],
        2,
        r"(?i)does not hold a drive dataset",
    ),
    Case(
        "data-root-is-a-file",
        "data",
        lambda w: ["data", "preview", *w.run("data.kind=drive", f"data.root={w.file('x.txt', 'x')}")],
        2,
        r"x\.txt",
    ),
    Case(
        "data-corrupt-image",
        "data",
        _drive(lambda r: _train_img(r).write_bytes(b"not a tiff")),
        2,
        r"21_training\.tif",
    ),
    Case("data-truncated-image", "data", _drive(lambda r: _truncate(_train_img(r))), 2, r"21_training\.tif"),
    Case(
        "data-zero-byte-image",
        "data",
        _drive(lambda r: _train_img(r).write_bytes(b"")),
        2,
        r"21_training\.tif",
    ),
    Case(
        "data-corrupt-mask",
        "data",
        _drive(lambda r: _train_gt(r).write_bytes(b"GIF89a garbage")),
        2,
        r"21_manual1\.gif",
    ),
    Case(
        "data-mask-size-mismatch",
        "data",
        _drive(lambda r: _write_gif(_train_gt(r), np.zeros((100, 100)))),
        2,
        r"21_manual1\.gif.*584",
    ),
    Case("data-image-resized", "data", _drive(_resize_image), 2, r"21_training\.tif|21_manual1\.gif"),
    Case(
        "data-missing-mask",
        "data",
        _drive(lambda r: _train_gt(r).unlink()),
        2,
        r"missing vessel mask .*21_training\.tif.*expected .*21_manual1\.gif",
    ),
    Case("data-stare-corrupt-gz", "data", _stare_gz_garbage, 2, r"im0001\.ppm\.gz"),
    Case(
        "data-empty-masks-eval",
        "data",
        _drive(_empty_masks, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        2,
        r"none of the 2 labelled images has a vessel pixel",
    ),
    Case(
        "data-one-empty-mask-eval",
        "data",
        _drive(_empty_one, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        0,
        r"WARNING.*no vessel pixel.*\(21_training\)",
    ),
    Case(
        "data-full-masks-eval",
        "data",
        _drive(_full_masks, "data.scale=0.25", "eval.window=0", cmd="eval --split train"),
        0,
        r"WARNING.*invert",
    ),
    Case(
        "data-val-fraction-leaves-nothing",
        "data",
        _drive(lambda r: None, "data.val_fraction=0.9", cmd="data preview"),
        2,
        r"val_fraction",
    ),
    Case(
        "data-split-empty",
        "data",
        _drive(lambda r: shutil.rmtree(r / "test"), cmd="data preview --split test"),
        2,
        r"test",
    ),
    Case(
        "data-manifest-dotdot",
        "security",
        _manifest([{"image": "../../../../etc/passwd", "mask": _POLY}]),
        2,
        r"passwd|outside",
    ),
    Case(
        "data-manifest-absolute",
        "security",
        _manifest([{"image": "images/a.png", "mask": "/etc/hostname"}]),
        2,
        r"outside the dataset folder",
    ),
    Case(
        "data-manifest-symlink-out",
        "security",
        lambda w: _symlink_manifest(w),
        2,
        r"outside the dataset folder",
    ),
    Case(
        "data-manifest-outside-opt-in",
        "data",
        _manifest([{"image": "images/a.png", "mask": _POLY}], "data.allow_outside_root=true"),
        0,
        r"wrote .*png",
    ),
    Case("data-manifest-bad-json", "data", lambda w: _bad_manifest(w, "{not json"), 2, r"annotations\.json"),
    Case("data-manifest-empty-list", "data", lambda w: _bad_manifest(w, "[]"), 2, r"non-empty"),
    Case("data-manifest-no-image-key", "data", _manifest([{"mask": _POLY}]), 2, r"entry 0 needs an 'image'"),
    Case(
        "data-manifest-bad-polygon",
        "data",
        _manifest([{"image": "a.png", "mask": [[1, 2, 3]]}]),
        2,
        r"polygon 0",
    ),
    Case(
        "data-manifest-nan-polygon",
        "data",
        _manifest([{"image": "a.png", "mask": [[1, 2, 3, "x", 5, 6]]}]),
        2,
        r"polygon 0",
    ),
    Case(
        "data-manifest-bad-split",
        "data",
        _manifest([{"image": "a.png", "mask": _POLY, "split": "dev"}]),
        2,
        r"split 'dev'",
    ),
    Case("data-manifest-image-missing", "data", _manifest([{"image": "b.png", "mask": _POLY}]), 2, r"b\.png"),
    Case("data-parquet-corrupt", "data", lambda w: _parquet(w, b"PAR1 garbage"), 2, r"manifest\.parquet"),
    Case("data-parquet-no-image-column", "data", lambda w: _parquet(w, None), 2, r"image_path"),
    Case("data-mixed-sizes", "data", _mixed_sizes, 0, r"2 train images at threshold"),
    Case(
        "data-synth-folder-not-empty",
        "data",
        lambda w: ["data", "synth-folder", "--layout", "drive", "--out", str(w.drive())],
        2,
        r"not empty|exists",
    ),
    Case(
        "data-synth-folder-bad-layout",
        "data",
        lambda w: ["data", "synth-folder", "--layout", "kaggle", "--out", str(w.root / "k")],
        2,
        r"kaggle",
    ),
    Case(
        "data-synth-folder-negative-count",
        "data",
        lambda w: [
            "data",
            "synth-folder",
            "--layout",
            "drive",
            "--n-train",
            "-1",
            "--out",
            str(w.root / "k"),
        ],
        2,
        r"n.train",
    ),
    # ---- checkpoints: refuse what does not fit, never unpickle
    Case(
        "ckpt-missing-folder",
        "checkpoint",
        lambda w: ["eval", "--checkpoint", str(w.root / "nope"), *w.run()],
        2,
        r"nope",
    ),
    Case(
        "ckpt-file-not-folder",
        "checkpoint",
        lambda w: ["eval", "--checkpoint", str(w.ckpt() / "trainable.safetensors"), *w.run()],
        2,
        r"not a folder; give the folder",
    ),
    Case("ckpt-no-meta", "checkpoint", _ckpt(lambda w, c: (c / "meta.json").unlink()), 2, r"meta\.json"),
    Case(
        "ckpt-meta-bad-json",
        "checkpoint",
        _ckpt(lambda w, c: (c / "meta.json").write_text("{")),
        2,
        r"meta\.json.*not valid JSON",
    ),
    Case(
        "ckpt-corrupt-safetensors",
        "checkpoint",
        _ckpt(lambda w, c: (c / "trainable.safetensors").write_bytes(b"\x00" * 64)),
        2,
        r"trainable\.safetensors",
    ),
    Case(
        "ckpt-no-weights",
        "checkpoint",
        _ckpt(lambda w, c: (c / "trainable.safetensors").unlink()),
        2,
        r"trainable\.safetensors",
    ),
    Case(
        "ckpt-pickle-weights",
        "security",
        _ckpt(lambda w, c: (c / "trainable.safetensors").write_bytes(_pickle_bomb())),
        2,
        r"trainable\.safetensors",
    ),
    Case("ckpt-other-base", "checkpoint", _other_base, 2, r"trained on base model.*set policy\.checkpoint"),
    Case(
        "ckpt-base-digest-changed",
        "checkpoint",
        _ckpt(_meta_edit(lambda m: m["base"].update(digest="0" * 16))),
        2,
        r"digest",
    ),
    Case(
        "ckpt-base-moved",
        "checkpoint",
        _ckpt(lambda w, c: shutil.rmtree(w.root / "base")),
        2,
        r"base|config\.json",
    ),
    Case(
        "ckpt-uses-recorded-base",
        "checkpoint",
        _ckpt(lambda w, c: None),
        0,
        r"policy\.checkpoint is not set: using",
    ),
    Case(
        "ckpt-uses-recorded-alpha",
        "checkpoint",
        _ckpt(lambda w, c: None, "policy.lora_alpha=64"),
        0,
        r"trained with .*alpha.*used, not the configured",
    ),
    Case(
        "ckpt-export-uses-recorded",
        "checkpoint",
        _ckpt(lambda w, c: None, "policy.lora_alpha=64", cmd="export"),
        0,
        r"merged:",
    ),
    Case(
        "ckpt-tensor-missing",
        "checkpoint",
        _ckpt(lambda w, c: _drop_tensor(c)),
        2,
        r"trainable\.safetensors.*missing",
    ),
    Case(
        "ckpt-tensor-shape",
        "checkpoint",
        _ckpt(_meta_edit(lambda m: m["lora"].update(r=4))),
        2,
        r"trainable\.safetensors",
    ),
    Case("ckpt-export-requires-checkpoint", "checkpoint", lambda w: ["export", *w.run()], 2, r"--checkpoint"),
    Case(
        "ckpt-base-missing-train",
        "checkpoint",
        lambda w: ["train", *w.run(f"policy.checkpoint={w.root / 'nope'}")],
        2,
        r"policy\.checkpoint.*nope",
    ),
    Case(
        "ckpt-base-corrupt-train",
        "checkpoint",
        lambda w: _corrupt_base(w),
        2,
        r"policy\.checkpoint.*model\.safetensors",
    ),
    Case(
        "ckpt-base-pickle-train",
        "security",
        lambda w: _pickle_base(w),
        2,
        r"policy\.checkpoint.*model\.safetensors",
    ),
    Case(
        "ckpt-reward-net-missing",
        "checkpoint",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.root / 'rn.safetensors'}"),
        ],
        2,
        r"reward\.reward_net.*rn\.safetensors",
    ),
    Case(
        "ckpt-reward-net-pickle",
        "security",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.pt', _pickle_bomb())}"),
        ],
        2,
        r"reward\.reward_net.*rn\.pt",
    ),
    Case(
        "ckpt-reward-net-corrupt",
        "checkpoint",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.safetensors', b'junk')}"),
        ],
        2,
        r"reward\.reward_net.*rn\.safetensors",
    ),
    # ---- runs: nothing finished is overwritten, nothing outside the run is touched
    Case("run-finished-not-overwritten", "run", _over_finished_run(), 2, r"already holds a run.*--resume"),
    Case(
        "run-finished-other-storage",
        "run",
        _over_finished_run(other_storage=True),
        2,
        r"already holds a run",
    ),
    Case(
        "run-finished-metrics-only",  # its checkpoints (and Ray storage) are gone: metrics alone are kept
        "run",
        _over_finished_run(keep_checkpoints=False),
        2,
        r"already holds a run",
    ),
    Case("run-resume-changed-config", "run", lambda w: _resume_changed(w), 2, r"changed config.*learner\.lr"),
    Case(
        "run-resume-nothing",
        "run",
        lambda w: ["train", "--resume", *w.run("run.name=fresh")],
        2,
        r"nothing to resume",
    ),
    Case("run-second-process", "run", _held_lock, 2, r"busy.*(in use|running|another)"),
    Case(
        "run-output-dir-is-a-file",
        "run",
        lambda w: ["train", *w.run(f"run.output_dir={w.file('o.txt', 'x')}")],
        2,
        r"o\.txt",
    ),
    Case("run-pipeline-dotdot", "run", lambda w: ["pipeline", *w.run("run.name=..")], 2, NAME),
    Case("run-pipeline-unknown-stage", "run", lambda w: ["pipeline", *w.run(), "--force", "rll"], 2, r"rll"),
    Case(
        "run-pipeline-from-unknown",
        "run",
        lambda w: ["pipeline", *w.run(), "--from", "evaluate"],
        2,
        r"evaluate",
    ),
    Case(
        "run-pipeline-until-before-from",
        "run",
        lambda w: ["pipeline", *w.run(), "--from", "eval", "--until", "sft"],
        2,
        r"until|from",
    ),
    Case(
        "run-tune-resume-nothing",
        "run",
        lambda w: [
            "tune",
            "--resume",
            *w.run("run.name=sw", "tune.search_space={learner.lr: {grid: [1e-4, 1e-3]}}"),
        ],
        2,
        r"nothing to resume|no sweep",
    ),
    Case("run-tune-empty-space", "run", lambda w: ["tune", *w.run("run.name=sw")], 2, r"tune\.search_space"),
    Case(
        "run-sft-sa2va",
        "run",
        lambda w: [
            "sft",
            *w.run(
                "policy.kind=sa2va", "policy.checkpoint=OpenGVLab/Sa2VA-4B", "policy.trust_remote_code=true"
            ),
        ],
        2,
        r"tiny policy",
    ),
    Case("run-unknown-command", "run", lambda w: ["trian"], 2, r"invalid choice"),
    Case("run-eval-bad-split", "run", lambda w: ["eval", "--split", "dev", *w.run()], 2, r"invalid choice"),
    Case(
        "run-ctrl-c",
        "run",
        _patched("raysys.stages.run_sft", KeyboardInterrupt(), ["sft"]),
        130,
        r"interrupted; finished outputs .* are kept",
    ),
    Case(
        "run-failure-nothing-to-resume",
        "run",
        _patched("raysys.train.run_training", RuntimeError("boom"), ["train"]),
        1,
        r"failed: RuntimeError: boom.*no checkpoint was written",
    ),
    Case(
        "run-failure-resumable", "run", _failed_with_checkpoints, 1, r"failed: RuntimeError: boom.*--resume"
    ),
    Case(
        "run-pipeline-ctrl-c",
        "run",
        _patched("raysys.stages.run_sft", KeyboardInterrupt(), ["pipeline"]),
        130,
        r"raysys pipeline skips finished stages",
    ),
    # ---- security
    Case(
        "security-sa2va-remote-code-opt-in",
        "security",
        lambda w: ["eval", *w.run("policy.kind=sa2va", f"policy.checkpoint={_booby_trapped(w)}")],
        2,
        r"policy\.trust_remote_code.*runs with your permissions",
    ),
    Case(
        "security-sa2va-missing-folder",
        "checkpoint",
        lambda w: [
            "eval",
            *w.run(
                "policy.kind=sa2va", f"policy.checkpoint={w.root / 'sa2va'}", "policy.trust_remote_code=true"
            ),
        ],
        2,
        r"sa2va.*no model-hub access",
    ),
    Case(
        "security-yaml-python-tag",
        "security",
        _yaml("run: !!python/object/apply:os.system ['echo pwned']\n"),
        2,
        r"cfg\.yaml",
    ),
]
