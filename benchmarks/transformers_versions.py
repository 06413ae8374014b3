"""Sa2VA's real remote code under several transformers versions: the remote-code tests, the compatibility
shims' tests and benchmarks/sa2va_equivalence.py's figures, each version in its own virtual environment ->
benchmarks/results/transformers_versions.json.

    .venv/bin/python benchmarks/transformers_versions.py [--versions 4.51.3 4.57.6] [--json PATH]

Each version gets ``.venv-tf<version>`` (git-ignored; created with the project's torch constraints and the
``dev,sa2va`` extras, then that transformers pinned) unless it exists. The project's own ``.venv`` (the default
install) is run too. The record holds each test's outcome, not only counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import harness

TESTS = ["tests/remote", "tests/unit/test_compat.py"]
RELEASES = ["4.51.3", "4.57.6"]
"""What Sa2VA's releases were built with: 4.51 (InternVL-based checkpoints' remote code loads unchanged), 4.57
(the Qwen-VL-based ones)."""


def constraints() -> Path:
    cuda = shutil.which("nvidia-smi") is not None
    return harness.ROOT / "constraints" / ("cuda.txt" if cuda else "cpu.txt")


def ensure_venv(version: str) -> Path:
    venv = harness.ROOT / f".venv-tf{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "-c", str(constraints()), "-e", ".[dev,sa2va]",
             f"transformers=={version}"],
            cwd=harness.ROOT, check=True,
        )  # fmt: skip
    return python


def package_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in ('transformers', 'peft', 'torch', 'torchvision', 'tokenizers')}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_tests(python: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        t = time.perf_counter()
        proc = subprocess.run(
            [str(python), "-m", "pytest", *TESTS, "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
            cwd=harness.ROOT, capture_output=True, text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
        seconds = time.perf_counter() - t
        tests = {}
        if report.exists():
            for case in ET.parse(report).getroot().iter("testcase"):
                outcome = "passed"
                for tag in ("failure", "error", "skipped"):
                    if case.find(tag) is not None:
                        outcome = {"failure": "failed"}.get(tag, tag)
                tests[f"{case.get('classname')}::{case.get('name')}"] = outcome
    counts = {k: sum(v == k for v in tests.values()) for k in ("passed", "failed", "error", "skipped")}
    return {"exit_code": proc.returncode, "seconds": round(seconds, 1), **counts, "tests": tests,
            "tail": proc.stdout[-1500:] if proc.returncode else ""}  # fmt: skip


def equivalence(python: Path) -> dict:
    """benchmarks/sa2va_equivalence.py's figures under this interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eq.json"
        proc = subprocess.run(
            [str(python), str(harness.ROOT / "benchmarks" / "sa2va_equivalence.py"), "--json", str(out)],
            cwd=harness.ROOT, capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0 or not out.exists():
            return {"error": proc.stderr[-1500:]}
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", nargs="*", default=RELEASES)
    parser.add_argument("--json", default=str(harness.result_path("transformers_versions")))
    args = parser.parse_args()
    pythons = {"installed": harness.ROOT / ".venv" / "bin" / "python"}
    pythons.update({v: ensure_venv(v) for v in args.versions})
    results = {}
    for label, python in pythons.items():
        results[label] = {**package_versions(python), **run_tests(python), "figures": equivalence(python)}
        r = results[label]
        print(f"{label:10s} transformers {r['transformers']}: {r['passed']} passed, {r['failed']} failed, "
              f"{r['error']} errors, {r['skipped']} skipped in {r['seconds']} s", flush=True)  # fmt: skip
    harness.write_result("transformers_versions", {"tests": TESTS, "results": results}, args.json)
    return 0 if all(r["exit_code"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
