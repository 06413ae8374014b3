"""The real CLI: config printing, data preview, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from raysys.config_io import load_config, to_dict


def raysys(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysys", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def test_config_prints_the_resolved_tree(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("learner:\n  lr: 1.0e-4\n")
    out = raysys("config", str(path), "rollout.temperature=0.7")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed == to_dict(load_config(path, ["rollout.temperature=0.7"]))
    assert printed["learner"]["lr"] == 1e-4 and printed["rollout"]["temperature"] == 0.7


def test_data_preview_writes_a_grid(tmp_path) -> None:
    out_png = tmp_path / "grid.png"
    out = raysys("data", "preview", "data.size=128", "data.n_train=3", "-n", "3", "--out", str(out_png))
    assert out.returncode == 0, out.stderr
    assert str(out_png) in out.stdout
    img = np.asarray(Image.open(out_png).convert("RGB"))
    h, w, _ = img.shape
    assert w > 600 and h > 2 * 200  # three rows of three panels
    assert img.std() > 20  # not a blank canvas


def test_unknown_key_exits_2_with_the_key_named(tmp_path) -> None:
    out = raysys("data", "preview", "data.sise=128", "--out", str(tmp_path / "x.png"))
    assert out.returncode == 2
    assert "unknown config key 'data.sise'" in out.stderr and "did you mean 'data.size'" in out.stderr
    assert not (tmp_path / "x.png").exists()
