"""Reading and writing the config tree (:mod:`raysys.config`): YAML files and dotted overrides in, YAML, plain
dicts, dotted keys and hashes out.

YAML files hold only overrides of the defaults; ``key.sub=value`` strings override further. Each value is
converted to its field's type, and an unknown key or a value of the wrong type raises :class:`ConfigError`
naming the dotted key and what is allowed (the nodes check their own values when built)::

    cfg = load_config("examples/tiny_synthetic.yaml", ["learner.lr=1e-5"])
    save_config(cfg, run_dir / "config.yaml")
    assert load_config(run_dir / "config.yaml") == cfg
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from raysys.config import Config, ConfigError

__all__ = [
    "changed_settings",
    "config_hash",
    "flatten",
    "load_config",
    "parse_override",
    "replace",
    "save_config",
    "to_dict",
]


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any, limit: int = 120) -> str:
    """A value as an error message quotes it: at most ``limit`` characters (a YAML alias bomb expands to MBs)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to ``tp`` or raise ConfigError naming ``key`` and what is allowed."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"invalid value for '{key}': {_shown(value)}; expected {_describe(tp)}")
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"invalid value for '{key}': expected a mapping of its fields, got {_shown(value)}"
            )
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"invalid value for '{key}': {_shown(value)}; allowed: {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else bad
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"invalid value for '{key}': expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        ktp, vtp = typing.get_args(tp)
        return {_convert(k, ktp, key): _convert(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e7 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
            if number.is_integer():
                return int(number)
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(number):  # inf learning rates save NaN models; inf KL skips every update
            raise ConfigError(f"invalid value for '{key}': {_shown(value)}; must be a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"'{key}': unsupported field type {tp!r}")


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    full = f"{prefix}.{key}" if prefix else key
    hint = difflib.get_close_matches(key, names, n=1)
    did_you_mean = f"did you mean '{prefix + '.' if prefix else ''}{hint[0]}'? " if hint else ""
    return ConfigError(f"unknown config key '{full}'; {did_you_mean}allowed keys: {', '.join(names)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _convert(value, hints[key], f"{prefix}.{key}" if prefix else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # ConfigError included
        # Package-owned nodes name their fields as ``RewardConfig.tile_sizes``; the user knows ``reward.tile_sizes``.
        text = str(exc).replace(f"'{cls.__name__}.", f"'{prefix}." if prefix else "'")
        if isinstance(exc, ConfigError) and text == str(exc):
            raise  # already names the user's key
        if text.startswith("invalid value for"):
            raise ConfigError(text) from exc
        raise ConfigError(f"invalid value for '{prefix or 'config'}': {text}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config tree, for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _merge(base: dict[str, Any], over: Mapping[str, Any], cls: type, prefix: str, source: str) -> None:
    """Deep-merge ``over`` into ``base`` in place, rejecting keys ``cls`` does not have."""
    if not isinstance(over, Mapping):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping, got {over!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in over.items():
        if key not in names:
            err = _unknown_key(cls, str(key), prefix)
            raise ConfigError(f"{source}: {err}")
        sub = hints[key]
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(sub, type) and dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            _merge(base[key], value, sub, full, source)
        else:
            base[key] = value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"learner.lr=1e-5"`` -> (["learner", "lr"], 1e-5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'section.key=value' (e.g. learner.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from exc
    return key.split("."), value


def _apply_override(merged: dict[str, Any], text: str) -> None:
    """Apply one dotted override to the nested dict ``merged`` (validated later by ``_build``)."""
    keys, value = parse_override(text)
    node, cls = merged, Config
    for i, part in enumerate(keys):
        prefix = ".".join(keys[:i])
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(f"override {text!r}: {_unknown_key(cls, part, prefix)}")
        tp = _hints(cls)[part]
        rest = keys[i + 1 :]
        if not rest:
            node[part] = value
            return
        if typing.get_origin(tp) is dict:  # dict-typed fields take the remaining dotted path as one key
            node[part] = {**node[part], ".".join(rest): value}
            return
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ConfigError(f"override {text!r}: '{prefix + '.' if prefix else ''}{part}' has no sub-keys")
        node, cls = node[part], tp


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (overrides only) <- dotted CLI overrides, validated into a :class:`Config`."""
    merged = to_dict(Config())
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; give the path of a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from exc
        _merge(merged, data, Config, "", str(path))
    for text in overrides:
        _apply_override(merged, text)
    return _build(Config, merged)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the fully resolved tree as YAML; :func:`load_config` on it gives back an equal tree."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def flatten(cfg: Any) -> dict[str, Any]:
    """Dotted key -> value of every leaf (``{"learner.lr": 3e-4, ...}``), e.g. to list what two configs change."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(to_dict(cfg), "")
    return out


def changed_settings(
    before: Any, after: Any, *, ignore: Iterable[str] = (), prefixes: tuple[str, ...] | None = None
) -> str:
    """What ``after`` changes in ``before`` (configs): ``"key: old -> new, ..."`` (the first five, then
    ``...``), or ``""`` when nothing changes. Keys in ``ignore`` are left out; with ``prefixes``, so is every
    key that starts with none of them."""
    old, new = flatten(before), flatten(after)
    skip = set(ignore)
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k) and k not in skip and (prefixes is None or k.startswith(prefixes))
    )
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
    return shown + (", ..." if len(changed) > 5 else "")


def config_hash(node: Any) -> str:
    """Stable short hash of a config node or any JSON-able value (stage manifests, run identities)."""
    blob = json.dumps(to_dict(node), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def replace(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with dotted overrides applied and validated."""
    merged = to_dict(cfg)
    for text in overrides:
        _apply_override(merged, text)
    return _build(Config, merged)
