"""``raysys sa2va random-init``: its arguments and refusals, in process. The real build from Sa2VA's remote code
runs through this command in tests/remote (its checkpoint fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

import policies.sa2va_random
from raysys.cli import main


@pytest.fixture
def remote(tmp_path) -> Path:
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "modeling_sa2va_chat.py").write_text("# stand-in\n")
    return folder


@pytest.fixture
def builds(monkeypatch) -> list:
    calls = []

    def fake_build(remote, folder, shape, *, seed):
        calls.append((Path(remote), Path(folder), shape, seed))
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"0" * 1000)
        return Path(folder)

    monkeypatch.setattr(policies.sa2va_random, "build_checkpoint", fake_build)
    return calls


def test_random_init_builds_into_a_partial_folder_then_renames_it(tmp_path, remote, builds, capsys) -> None:
    out = tmp_path / "sa2va_1b"
    out.mkdir()  # an empty folder is fine
    assert (
        main(
            [
                "sa2va",
                "random-init",
                "--shape",
                "1b",
                "--out",
                str(out),
                "--remote",
                str(remote),
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert builds == [(remote, tmp_path / ".sa2va_1b.partial", "1b", 3)]
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".sa2va_1b.partial").exists()
    assert (
        f"policy.kind=sa2va policy.checkpoint={out.resolve()} policy.trust_remote_code=true"
        in capsys.readouterr().out
    )


def test_random_init_takes_the_remote_code_from_the_environment(
    tmp_path, remote, builds, monkeypatch
) -> None:
    monkeypatch.setenv("RAYSYS_SA2VA_REMOTE", str(remote))
    assert main(["sa2va", "random-init", "--shape", "test", "--out", str(tmp_path / "t")]) == 0
    assert builds[0][0] == remote and builds[0][2] == "test"


def test_random_init_refuses_a_full_folder_and_missing_remote_code(
    tmp_path, remote, builds, capsys, monkeypatch
) -> None:
    monkeypatch.delenv("RAYSYS_SA2VA_REMOTE", raising=False)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["sa2va", "random-init", "--shape", "1b", "--out", str(full), "--remote", str(remote)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err and (full / "keep.txt").read_text() == "mine"
    assert main(["sa2va", "random-init", "--shape", "1b", "--out", str(tmp_path / "new")]) == 2
    assert "pass --remote DIR or set RAYSYS_SA2VA_REMOTE" in capsys.readouterr().err
    assert (
        main(
            [
                "sa2va",
                "random-init",
                "--shape",
                "1b",
                "--out",
                str(tmp_path / "new"),
                "--remote",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert not builds and not (tmp_path / "new").exists()
    with pytest.raises(SystemExit):  # argparse: the shapes policies/sa2va_random.py knows
        main(["sa2va", "random-init", "--shape", "2b", "--out", str(tmp_path / "new")])
