"""envs and policies must import on a machine without Ray (docs/design.md import rules); raysys.testing, shared
by the tests and the benchmarks, imports without starting anything."""

from __future__ import annotations

import subprocess
import sys

BLOCK_RAY = """
import importlib.abc, sys
class _NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"ray is unavailable in this test (import of {name!r})")
        return None
sys.meta_path.insert(0, _NoRay())
import pkgutil, importlib
import envs, policies
for pkg in (envs, policies):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(mod.name)
try:
    import ray  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the ray blocker did not work")
assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
print("ok", len([m for m in sys.modules if m.startswith(("envs", "policies"))]))
"""


def test_envs_and_policies_import_with_ray_unavailable() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCK_RAY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


TESTING_IMPORTS_QUIETLY = (
    BLOCK_RAY.split("import pkgutil")[0]
    + """
import os, sys
before = sorted(os.listdir("."))
import raysys.testing.faults, raysys.testing.rl_small
heavy = [m for m in ("ray", "torch", "raysys.cli") if m in sys.modules]
assert not heavy, f"importing raysys.testing imported {heavy}"
assert sorted(os.listdir(".")) == before, "importing raysys.testing wrote files"
print("ok")
"""
)


def test_raysys_testing_imports_without_ray_torch_or_files(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", TESTING_IMPORTS_QUIETLY],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
