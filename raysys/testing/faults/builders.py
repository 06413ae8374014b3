"""Input builders that cases of several classes share: a config command, a YAML config file, a truncated
file, a pickle that must never be unpickled, a fault injected mid-command, and the bad-run-name message."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from raysys.testing.faults.harness import World

RUN_NAME = r"run\.name.*plain"
"""The message for a run name that is not a plain folder name."""


def cfg(*overrides: str, cmd: str = "config") -> Callable[[World], list[str]]:
    return lambda w: [*cmd.split(), *w.run(*overrides)]


def yaml_cfg(text: str, *overrides: str, cmd: str = "config") -> Callable[[World], list[str]]:
    return lambda w: [*cmd.split(), str(w.file("cfg.yaml", text)), *w.run(*overrides)]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def pickle_bomb() -> bytes:
    """A torch-style pickle whose unpickling would run ``os.system``: must never be unpickled."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/raysys_pwned",))

    return pickle.dumps(Boom())


def patched(target: str, exc: BaseException, argv: list[str]) -> Callable[[World], list[str]]:
    """``argv`` with ``module.attr`` replaced by a function that raises ``exc`` (a fault mid-command)."""

    def build(w: World) -> list[str]:
        def boom(*args, **kwargs):
            raise exc

        module, attr = target.rsplit(".", 1)
        w.patches.append((module, attr, boom))
        return [*argv, *w.run()]

    return build
