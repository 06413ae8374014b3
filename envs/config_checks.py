"""The one check of config values, shared by every config node (the reward objective here, the policy, SFT and
reward-net nodes in ``policies.config``, the rest of the tree in ``raysys.config``).

Every invalid value raises :class:`ConfigError` worded ``invalid value for '<key>': <what to change>``. A node
owned by a package does not know where the tree mounts it, so it names its fields by class
(``RewardConfig.tile_sizes``); the loader (``raysys.config_io``) rewrites that to the key the user wrote
(``reward.tile_sizes``).
"""

from __future__ import annotations

__all__ = ["ConfigError", "check"]


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds an invalid value."""


def check(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("invalid value for '<key>': <msg>")`` unless ``cond``; ``msg`` says what is allowed."""
    if not cond:
        raise ConfigError(f"invalid value for '{key}': {msg}")
