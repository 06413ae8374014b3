"""Output faults: a standalone command (`sft`, `reward-net`, `eval`, `export`, `prompt-rl`, `postproc-rl`) whose
output folder already holds a result, or whose run is held by a running pipeline, and a command that fails
midway (disk full, Ctrl-C): the earlier result stays, nothing half-written is left."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from raysys.testing.faults.builders import patched
from raysys.testing.faults.harness import Case, World

COMMANDS = {
    "sft": ("sft", "SFT"),
    "reward-net": ("reward_net", "reward-net"),
    "eval": ("eval/test", "evaluation"),
    "export": ("export", "export"),
    "prompt-rl": ("prompt_rl", "prompt-rl"),
    "postproc-rl": ("postproc_rl", "postproc-rl"),
}
"""command -> (its default output folder under the run, the word its messages use)."""
_DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def _extra(cmd: str, w: World) -> list[str]:
    return ["--checkpoint", str(w.ckpt())] if cmd == "export" else []


def _result_there(cmd: str, *, out: bool = False) -> Callable[[World], list[str]]:
    """A finished result in the command's output folder (the default one, or ``--out``)."""

    def argv(w: World) -> list[str]:
        folder = w.root / "mine" if out else w.out / "tiny" / COMMANDS[cmd][0]
        folder.mkdir(parents=True)
        (folder / "result.bin").write_bytes(b"an earlier result")
        return [cmd, *_extra(cmd, w), *(["--out", str(folder)] if out else []), *w.run()]

    return argv


def _under_a_running_pipeline(cmd: str) -> Callable[[World], list[str]]:
    """A pipeline of the same run holds its lock (another process), the command's output folder is empty."""

    def argv(w: World) -> list[str]:
        import fcntl

        run = w.out / "tiny"
        run.mkdir(parents=True)
        fd = os.open(run / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        w.held_fd = fd  # type: ignore[attr-defined]
        return [cmd, *_extra(cmd, w), *w.run()]

    return argv


def _replace_failing(w: World) -> list[str]:
    """`raysys sft --overwrite` over an earlier result, and the disk fills up midway."""
    folder = w.out / "tiny" / "sft"
    folder.mkdir(parents=True)
    (folder / "result.bin").write_bytes(b"an earlier result")
    return patched("raysys.stages.run_sft", _DISK_FULL, ["sft", "--overwrite"])(w)


def _cases() -> list[Case]:
    cases = []
    for cmd, (_, word) in COMMANDS.items():
        cases.append(
            Case(
                f"out-{cmd}-result-kept",
                "run",
                _result_there(cmd),
                2,
                rf"already holds a {word} result.*--overwrite",
            )
        )
        cases.append(
            Case(
                f"out-{cmd}-under-running-pipeline",
                "run",
                _under_a_running_pipeline(cmd),
                2,
                r"in use by another.*--out",
            )
        )
    for cmd in ("sft", "eval"):
        cases.append(
            Case(
                f"out-{cmd}-given-folder-kept", "run", _result_there(cmd, out=True), 2, r"mine.*already holds"
            )
        )
    cases += [
        Case("out-sft-disk-full-keeps-earlier", "run", _replace_failing, 2, r"No space left on device"),
        Case(
            "out-reward-net-disk-full",
            "run",
            patched("raysys.stages.run_reward_net", _DISK_FULL, ["reward-net"]),
            2,
            r"No space left on device",
        ),
    ]
    return cases


CASES: list[Case] = _cases()
