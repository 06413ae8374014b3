"""The one check of config values, shared by every config node (the reward objective here, the policy, SFT and
reward-net nodes in ``policies.config``, the rest of the tree in ``raysys.config``).

Every invalid value raises :class:`ConfigError` worded ``invalid value for '<key>': <what to change>``. A node
owned by a package does not know where the tree mounts it, so it names its fields by class
(``RewardConfig.tile_sizes``); the loader (``raysys.config_io``) rewrites that to the key the user wrote
(``reward.tile_sizes``). The few helpers below are shared by the nodes' checks.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

__all__ = ["ConfigError", "as_number", "check", "check_label_selector", "field_type"]


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds an invalid value."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("invalid value for '<key>': <msg>")`` unless ``cond``; ``msg`` says what is allowed."""
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {msg}")


def check_label_selector(selector: dict[str, str], key: str) -> None:
    """Ray's own syntax check of a node-label selector (keys like ``role`` or ``example.com/role``; values
    ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``), so a typo stops here and not as an actor that never starts."""
    try:
        from ray._private.label_utils import validate_label_selector
    except ImportError:  # config without Ray (e.g. reading a run's config.yaml): Ray checks it at launch
        return
    error = validate_label_selector(selector)
    check(error is None, key, f"{selector!r}: {error}")


def as_number(value: Any) -> Any:
    """A string that reads as a float becomes one (YAML reads ``1e-4``, without a dot, as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def field_type(cls: type, path: list[str]) -> Any | None:
    """Type of the field at ``path`` under dataclass ``cls``, or None if there is no such field."""
    tp: Any = cls
    for part in path:
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints or part not in {f.name for f in dataclasses.fields(tp)}:
            return None
        tp = hints[part]
    return tp
