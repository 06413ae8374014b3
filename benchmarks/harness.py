"""What every benchmark script shares: paths, the machine block, the ``raysys`` CLI as a subprocess, the result
writer and the one-core set-up.

Scripts run as ``python benchmarks/<name>.py`` (their folder is then first on ``sys.path``) and
``import harness``. Importing it puts the repository root on ``sys.path`` too, so ``envs``, ``policies`` and
``raysys`` import from a checkout without ``pip install -e``; it does nothing else.

A result is one JSON object per file, ``benchmarks/results/<benchmark>.json`` unless the script's ``--json``
(or ``--out``) says otherwise::

    {"benchmark": "<name>", "machine": {...machine()...}, <the script's own keys>}

    harness.write_result("policy_speed", {"torch_threads": 2, ...}, args.json)
    run = harness.run_cli("train", config, *overrides, "--no-progress")   # CliRun: returncode, wall_s, ...
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
"""The repository root."""
RESULTS = ROOT / "benchmarks" / "results"
"""Where results are kept (in git: they are the record the README quotes)."""
RUNS = ROOT / "runs"
"""Run folders of the benchmarks (git-ignored)."""
SA2VA_REMOTE = Path(os.environ.get("RAYSYS_SA2VA_REMOTE", ROOT.parent / "shared" / "sa2va_remote"))
"""Sa2VA's remote-code files (``--remote`` of the Sa2VA benchmarks): ``$RAYSYS_SA2VA_REMOTE`` or
``../shared/sa2va_remote``."""

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ------------------------------------------------------------------------------------------------- paths
def result_path(benchmark: str) -> Path:
    """``benchmarks/results/<benchmark>.json``: a script's default ``--json``."""
    return RESULTS / f"{benchmark}.json"


def read_result(benchmark: str) -> dict | None:
    """The result ``benchmarks/results/<benchmark>.json``, or None when it has not been run."""
    path = result_path(benchmark)
    return json.loads(path.read_text()) if path.is_file() else None


def display_path(path: str | Path) -> str:
    """``path`` as a result records it: relative to the repository root when inside it, else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if ROOT in resolved.parents else str(path)


# ------------------------------------------------------------------------------------------------ machine
PACKAGES = ("torch", "ray", "numpy", "transformers")
"""Installed versions recorded in every machine block (read from package metadata, nothing imported)."""


def _gpus() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def _cpu() -> dict[str, str | None]:
    """The CPU's model name and the vector ISA torch's kernels use. Repeats on one host are bit-identical; a
    long CPU training run on another host can end elsewhere (float results of its kernels may differ)."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    try:
        import torch

        isa = torch.backends.cpu.get_cpu_capability()
    except (ImportError, AttributeError):
        isa = None
    return {"cpu_model": model, "cpu_isa": isa}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """The machine block every result carries, one shape for all benchmarks.

    ``summary`` ("2 CPUs, no GPU", "16 CPUs, NVIDIA H200"), ``cpus``, ``cpu_model`` and ``cpu_isa`` (``_cpu``),
    ``gpus`` (the CUDA devices torch sees, by name), ``arch``, ``platform``, ``python``, ``packages``
    (PACKAGES' versions, None if not installed) and ``loadavg`` (1, 5 and 15 minutes when the result is
    written: other work on a shared machine slows timings down). Importing torch to look for GPUs costs a
    second or two; call it once, at the end."""
    gpus = _gpus()
    if not gpus:
        gpu = "no GPU"
    elif len(set(gpus)) == 1:
        gpu = gpus[0] if len(gpus) == 1 else f"{len(gpus)} x {gpus[0]}"
    else:
        gpu = ", ".join(gpus)
    return {
        "summary": f"{os.cpu_count()} CPUs, {gpu}",
        "cpus": os.cpu_count(),
        **_cpu(),
        "gpus": gpus,
        "arch": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------------- writer
def _plain(value: Any) -> Any:
    """JSON for what ``json`` does not know: numpy scalars and arrays, paths."""
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalar or array, torch tensor
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable: convert it before write_result")


def write_result(
    benchmark: str,
    result: dict[str, Any],
    path: str | Path | None = None,
    *,
    machine_block: dict | None = None,
) -> Path:
    """Write ``{"benchmark": benchmark, "machine": machine(), **result}`` as JSON to ``path`` (default
    ``benchmarks/results/<benchmark>.json``), making its folder; returns the path.

    ``result`` holds the script's own keys; a ``benchmark`` key in it must agree, and ``machine`` belongs to
    the harness (pass ``machine_block`` when the script has already called :func:`machine`)."""
    if "machine" in result:
        raise ValueError(
            f"{benchmark}: the harness writes the 'machine' block; drop 'machine' from the result"
        )
    if result.get("benchmark", benchmark) != benchmark:
        raise ValueError(f"{benchmark}: the result says benchmark {result['benchmark']!r}")
    out = {"benchmark": benchmark, "machine": machine_block or machine()}
    out.update((k, v) for k, v in result.items() if k != "benchmark")
    path = Path(path) if path is not None else result_path(benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=_plain) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- CLI
def cli_argv(*argv: str) -> list[str]:
    """The command line of ``raysys <argv>`` under this interpreter (for a process the script controls
    itself, e.g. to kill it mid-run)."""
    return [sys.executable, "-m", "raysys", *argv]


@dataclass(frozen=True)
class CliRun:
    """One finished ``raysys`` process."""

    argv: tuple[str, ...]
    """Its arguments after ``raysys``."""
    returncode: int
    wall_s: float
    """Wall time of the whole process (start-up included)."""
    stdout: str
    """Empty unless captured."""
    stderr: str

    @property
    def command(self) -> str:
        """``raysys <argv>``, as a user would type it."""
        return " ".join(["raysys", *self.argv])


def run_cli(
    *argv: str,
    check: bool = True,
    capture: bool = True,
    log: IO | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> CliRun:
    """Run the real CLI, ``raysys <argv>``, in a subprocess and time it.

    Output is captured (``capture``), written to the open file ``log`` (stdout and stderr together), or, with
    ``capture=False`` and no log, shown as it comes. ``check``: a non-zero exit stops the script with the
    command and the tail of its stderr. ``cwd`` defaults to the caller's, so relative paths in ``argv`` mean
    what they mean to the script."""
    if log is not None:
        streams: dict[str, Any] = {"stdout": log, "stderr": subprocess.STDOUT}
    elif capture:
        streams = {"capture_output": True, "text": True}
    else:
        streams = {}
    t0 = time.perf_counter()
    proc = subprocess.run(cli_argv(*argv), cwd=cwd, timeout=timeout, check=False, **streams)
    run = CliRun(
        argv=tuple(argv),
        returncode=proc.returncode,
        wall_s=time.perf_counter() - t0,
        stdout=proc.stdout if isinstance(proc.stdout, str) else "",
        stderr=proc.stderr if isinstance(proc.stderr, str) else "",
    )
    if check and run.returncode != 0:
        sys.stderr.write(run.stderr[-4000:])
        where = f" (its output is in {log.name})" if log is not None and hasattr(log, "name") else ""
        raise SystemExit(f"{run.command} failed with exit code {run.returncode}{where}")
    return run


# ----------------------------------------------------------------------------------------------- one core
ONE_CORE_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
"""Thread-pool sizes numpy, scipy and torch read when they load."""


def one_core() -> bool:
    """Run this process on one CPU core: thread pools of one thread (ONE_CORE_VARIABLES) and, where the OS
    allows it (Linux), affinity to one CPU. Returns whether the affinity was set.

    Call it before numpy, scipy or torch is imported: a thread pool is sized when its library loads."""
    loaded = [m for m in ("numpy", "scipy", "torch") if m in sys.modules]
    if loaded:
        raise RuntimeError(
            f"one_core() after {', '.join(loaded)} loaded: their thread pools are sized already; call it "
            "before importing them (import them inside main() after the call)"
        )
    for var in ONE_CORE_VARIABLES:
        os.environ[var] = "1"
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        return False
    return True
