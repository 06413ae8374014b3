"""Checkpoint faults: missing or corrupt meta.json and weights, pickles where safetensors belong, a checkpoint
on the wrong base model, a moved or changed base, bad base models and reward networks given to ``train``."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from raysys.testing.faults.builders import pickle_bomb, truncate
from raysys.testing.faults.harness import Case, World


def _ckpt(edit: Callable[[World, Path], None], *overrides: str, cmd: str = "eval") -> Callable:
    """A trained checkpoint edited by ``edit``, then ``raysys <cmd> --checkpoint ...``."""

    def argv(w: World) -> list[str]:
        ck = w.ckpt()
        edit(w, ck)
        return [cmd, "--checkpoint", str(ck), *w.run(*overrides)]

    return argv


def _meta_edit(fn: Callable[[dict], None]) -> Callable[[World, Path], None]:
    def edit(w: World, ck: Path) -> None:
        meta = json.loads((ck / "meta.json").read_text())
        fn(meta)
        (ck / "meta.json").write_text(json.dumps(meta))

    return edit


def _other_base(w: World) -> list[str]:
    """A checkpoint trained on one base model, evaluated on another (a fresh tiny model)."""
    ck = w.ckpt()
    other = w.root / "other_base"
    from policies.checkpoint import save_base_model
    from policies.config import PolicyConfig
    from policies.factory import build_base_model

    save_base_model(build_base_model(PolicyConfig(), seed=11), other)
    return ["eval", "--checkpoint", str(ck), *w.run(f"policy.checkpoint={other}")]


def _drop_tensor(ck: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(ck / "trainable.safetensors"))
    state.pop(sorted(state)[0])
    save_file(state, str(ck / "trainable.safetensors"))


def _corrupt_base(w: World) -> list[str]:
    base = w.base()
    truncate(base / "model.safetensors")
    return ["train", *w.run(f"policy.checkpoint={base}")]


def _pickle_base(w: World) -> list[str]:
    base = w.base()
    (base / "model.safetensors").write_bytes(pickle_bomb())
    return ["train", *w.run(f"policy.checkpoint={base}")]


# checkpoints: refuse what does not fit, never unpickle
CASES: list[Case] = [
    Case(
        "ckpt-missing-folder",
        "checkpoint",
        lambda w: ["eval", "--checkpoint", str(w.root / "nope"), *w.run()],
        2,
        r"nope",
    ),
    Case(
        "ckpt-file-not-folder",
        "checkpoint",
        lambda w: ["eval", "--checkpoint", str(w.ckpt() / "trainable.safetensors"), *w.run()],
        2,
        r"not a folder; give the folder",
    ),
    Case("ckpt-no-meta", "checkpoint", _ckpt(lambda w, c: (c / "meta.json").unlink()), 2, r"meta\.json"),
    Case(
        "ckpt-meta-bad-json",
        "checkpoint",
        _ckpt(lambda w, c: (c / "meta.json").write_text("{")),
        2,
        r"meta\.json.*not valid JSON",
    ),
    Case(
        "ckpt-corrupt-safetensors",
        "checkpoint",
        _ckpt(lambda w, c: (c / "trainable.safetensors").write_bytes(b"\x00" * 64)),
        2,
        r"trainable\.safetensors",
    ),
    Case(
        "ckpt-no-weights",
        "checkpoint",
        _ckpt(lambda w, c: (c / "trainable.safetensors").unlink()),
        2,
        r"trainable\.safetensors",
    ),
    Case(
        "ckpt-pickle-weights",
        "security",
        _ckpt(lambda w, c: (c / "trainable.safetensors").write_bytes(pickle_bomb())),
        2,
        r"trainable\.safetensors",
    ),
    Case("ckpt-other-base", "checkpoint", _other_base, 2, r"trained on base model.*set policy\.checkpoint"),
    Case(
        "ckpt-base-digest-changed",
        "checkpoint",
        _ckpt(_meta_edit(lambda m: m["base"].update(digest="0" * 16))),
        2,
        r"digest",
    ),
    Case(
        "ckpt-base-moved",
        "checkpoint",
        _ckpt(lambda w, c: shutil.rmtree(w.root / "base")),
        2,
        r"base|config\.json",
    ),
    Case(
        "ckpt-uses-recorded-base",
        "checkpoint",
        _ckpt(lambda w, c: None),
        0,
        r"policy\.checkpoint is not set: using",
    ),
    Case(
        "ckpt-uses-recorded-alpha",
        "checkpoint",
        _ckpt(lambda w, c: None, "policy.lora_alpha=64"),
        0,
        r"trained with .*alpha.*used, not the configured",
    ),
    Case(
        "ckpt-export-uses-recorded",
        "checkpoint",
        _ckpt(lambda w, c: None, "policy.lora_alpha=64", cmd="export"),
        0,
        r"merged:",
    ),
    Case(
        "ckpt-tensor-missing",
        "checkpoint",
        _ckpt(lambda w, c: _drop_tensor(c)),
        2,
        r"trainable\.safetensors.*missing",
    ),
    Case(
        "ckpt-tensor-shape",
        "checkpoint",
        _ckpt(_meta_edit(lambda m: m["lora"].update(r=4))),
        2,
        r"trainable\.safetensors",
    ),
    Case("ckpt-export-requires-checkpoint", "checkpoint", lambda w: ["export", *w.run()], 2, r"--checkpoint"),
    Case(
        "ckpt-base-missing-train",
        "checkpoint",
        lambda w: ["train", *w.run(f"policy.checkpoint={w.root / 'nope'}")],
        2,
        r"policy\.checkpoint.*nope",
    ),
    Case(
        "ckpt-base-corrupt-train",
        "checkpoint",
        lambda w: _corrupt_base(w),
        2,
        r"policy\.checkpoint.*model\.safetensors",
    ),
    Case(
        "ckpt-base-pickle-train",
        "security",
        lambda w: _pickle_base(w),
        2,
        r"policy\.checkpoint.*model\.safetensors",
    ),
    Case(
        "ckpt-reward-net-missing",
        "checkpoint",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.root / 'rn.safetensors'}"),
        ],
        2,
        r"reward\.reward_net.*rn\.safetensors",
    ),
    Case(
        "ckpt-reward-net-pickle",
        "security",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.pt', pickle_bomb())}"),
        ],
        2,
        r"reward\.reward_net.*rn\.pt",
    ),
    Case(
        "ckpt-reward-net-corrupt",
        "checkpoint",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.safetensors', b'junk')}"),
        ],
        2,
        r"reward\.reward_net.*rn\.safetensors",
    ),
]


def _rl_checkpoint_as(flag: str, cmd: str) -> Callable:
    def argv(w: World) -> list[str]:
        if flag == "--policy-checkpoint":
            return [cmd, flag, str(w.ckpt()), *w.run("reward_net.epochs=1")]
        return [cmd, *w.run(f"policy.checkpoint={w.ckpt()}")]

    return argv


# the other kind of checkpoint where one is expected; files only torch's pickle reader would take
CASES += [
    Case(
        "ckpt-base-folder-as-rl-eval",
        "checkpoint",
        lambda w: ["eval", "--checkpoint", str(w.base()), *w.run()],
        2,
        r"base is a base model folder .* not an RL checkpoint.*policy\.checkpoint=",
    ),
    Case(
        "ckpt-base-folder-as-rl-export",
        "checkpoint",
        lambda w: ["export", "--checkpoint", str(w.base()), *w.run()],
        2,
        r"base is a base model folder",
    ),
    Case(
        "ckpt-rl-as-policy-checkpoint",
        "checkpoint",
        _rl_checkpoint_as("policy.checkpoint", "eval"),
        2,
        r"ckpt is an RL checkpoint .* not a base model folder.*--checkpoint",
    ),
    Case(
        "ckpt-rl-as-policy-checkpoint-train",
        "checkpoint",
        _rl_checkpoint_as("policy.checkpoint", "train"),
        2,
        r"policy\.checkpoint: .*ckpt is an RL checkpoint",
    ),
    Case(
        "ckpt-rl-as-reward-net-policy",
        "checkpoint",
        _rl_checkpoint_as("--policy-checkpoint", "reward-net"),
        2,
        r"--policy-checkpoint: .*ckpt is an RL checkpoint",
    ),
    Case(
        "ckpt-recorded-base-deleted",
        "checkpoint",
        _ckpt(lambda w, c: shutil.rmtree(w.root / "base")),
        2,
        r"was trained on the base model .*base \(recorded in its meta\.json\), which no longer exists",
    ),
    Case(
        "ckpt-reward-net-pickle-message",
        "security",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.pt', pickle_bomb())}"),
        ],
        2,
        r"^(?!.*weights_only=False).*rn\.pt cannot be loaded as plain tensors.*never unpickles",
    ),
    Case(
        "ckpt-reward-net-truncated",
        "checkpoint",
        lambda w: [
            "train",
            *w.run("reward.source=learned", f"reward.reward_net={w.file('rn.pt', b'PK' + bytes(40))}"),
        ],
        2,
        r"reward\.reward_net: reward net checkpoint .*rn\.pt",
    ),
]
