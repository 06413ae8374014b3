"""Every metric name in raysys comes from raysys/keys.py: a literal of one of its groups elsewhere fails."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import raysys
from raysys import keys

PACKAGE = Path(raysys.__file__).resolve().parent
EXEMPT = {
    "keys.py",  # where the names live
}


def metric_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of each string constant that starts with a metric group, f-string parts included."""
    return sorted(
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith(keys.GROUPS)
    )


def test_the_check_finds_plain_and_formatted_metric_literals() -> None:
    found = metric_literals('m = {"loss/total": 1.0}\nn = f"val/dice@{t:g}"\nx = "runs/val/a"\n')
    assert found == [(1, "loss/total"), (2, "val/dice@")]


def test_groups_cover_every_name_in_keys() -> None:
    names = [v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)]
    assert names and all(n.startswith(keys.GROUPS) for n in names)
    for derived in (keys.val("dice"), keys.val_dice_at(0.5), keys.reward_component("dice")):
        assert derived.startswith(keys.GROUPS)
    assert keys.reward_component("dice_raw") == keys.GT_DICE and keys.val_dice_at(0.5) == "val/dice@0.5"


@pytest.mark.parametrize(
    "path",
    sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in EXEMPT),
    ids=lambda p: p.relative_to(PACKAGE).as_posix(),
)
def test_no_metric_name_literal_outside_keys(path: Path) -> None:
    found = metric_literals(path.read_text())
    assert not found, f"{path.name}: metric names {found} belong in raysys/keys.py (a constant or a function)"
