"""The fault-matrix harness: a case (``Case``), the world it builds its bad input in (``World``), running it
through ``raysys.cli.main`` with Ray blocked (``run_case``) and judging what happened (``classify``).

Outcomes: ``clear`` (the expected exit code and the message naming the key/file and the fix), ``silent``
(exit 0 where an error or warning was due, or an unclear message), ``data_loss`` (a file that existed before
the command changed or vanished).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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
