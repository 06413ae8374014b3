"""The fault matrix (raysys/testing/faults/): every bad input gets its exit code and a message naming
the key or file, and no file that existed before the command changes. Ray never starts; each case runs the CLI
in this process."""

from __future__ import annotations

import sys

import pytest

from raysys.testing.faults import CASES, Case, World, classify, run_case


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_assets")


@pytest.fixture(scope="module", autouse=True)
def no_ray_session():
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), (
        "a Ray session from an earlier test is still up: the cases' CLIs would attach to it and skip what a "
        "private local Ray checks first"
    )


def test_the_matrix_has_at_least_200_cases_with_unique_ids() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) >= 200 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(case, assets, tmp_path, one_torch_thread) -> None:
    outcome = run_case(case, World(tmp_path / "world", assets))
    verdict = classify(case, outcome)
    assert verdict == "clear", (
        f"{case.id}: {verdict}; exit {outcome.code} (expected {case.code}), expected /{case.message}/, "
        f"changed files {outcome.changed}\n--- output ---\n{outcome.output[-3000:]}"
    )


def test_the_matrix_catches_data_loss_and_unclear_messages(assets, tmp_path) -> None:
    def overwrites(w: World) -> list[str]:
        w.patches.append(
            ("raysys.cli", "cmd_config", lambda args: (w.root / "outside.txt").write_text("") and 0)
        )
        return ["config"]

    lossy = Case("overwrites-a-file", "run", overwrites, 0, "")
    assert classify(lossy, run_case(lossy, World(tmp_path / "a", assets))) == "data_loss"
    vague = Case(
        "vague", "config", lambda w: ["config", "learner.lr=inf"], 2, r"a message raysys does not print"
    )
    assert classify(vague, run_case(vague, World(tmp_path / "b", assets))) == "silent"
    wrong_code = Case("code", "config", lambda w: ["config", "learner.lr=inf"], 0, r"learner\.lr")
    assert classify(wrong_code, run_case(wrong_code, World(tmp_path / "c", assets))) == "silent"
