"""How much the learner and the rollout actors put through the policy at once: micro-batches with gradient
accumulation (``learner.micro_batch_size``), activation checkpointing of the LLM
(``learner.activation_checkpointing``) and images per policy call (``rollout.batch_size``). Each only moves
memory and time: the gradients, metrics and masks are those of the whole batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from policies.factory import build_policy
from policies.policy import language_model
from raysys.config_io import load_config
from raysys.learner import Learner
from raysys.reward import RewardWorker
from raysys.rollout import RolloutWorker
from raysys.testing.rl_small import SMALL_RL

FOUR = [*SMALL_RL, "learner.minibatch_size=4"]
"""One minibatch of all 4 images of an iteration."""


@pytest.fixture(scope="module")
def scored():
    cfg = load_config(None, FOUR)
    return [RewardWorker(cfg).score(RolloutWorker(cfg, 0).sample([0, 1, 2, 3], iteration=0))]


def _with(learner: Learner, **learner_keys) -> None:
    learner.cfg = dataclasses.replace(
        learner.cfg, learner=dataclasses.replace(learner.cfg.learner, **learner_keys)
    )


def _gradients(learner: Learner) -> dict[str, torch.Tensor]:
    params = dict(learner.policy.named_trainable_parameters())
    if learner.value_head is not None:
        params.update({f"value_head.{n}": p for n, p in learner.value_head.named_parameters()})
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _move_away_from_the_reference(policy) -> None:
    """Every trainable tensor moved by seeded noise: the LoRA B matrices leave 0, so LoRA A gets gradients."""
    with torch.no_grad():
        for n, p in policy.named_trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))


@pytest.mark.parametrize(
    ("overrides", "phase"),
    [
        ([], "grpo"),  # pixel advantages from whole-image and tile rewards
        (["learner.algorithm=ppo"], "ppo"),  # + the value head's per-image and per-tile losses
        (["learner.algorithm=rce_grpo", "learner.rce_epochs=1"], "rce"),
        (["learner.algorithm=dpo"], "dpo"),
    ],
    ids=["grpo_tiles", "ppo_value_head", "rce", "dpo"],
)
def test_micro_batches_accumulate_the_whole_minibatchs_gradient(scored, overrides, phase) -> None:
    learner = Learner(load_config(None, [*FOUR, "learner.entropy_coef=0.01", *overrides]))
    _move_away_from_the_reference(learner.policy)  # else the KL and its gradient are 0
    b, _ = learner._assemble(scored)
    # Uneven shares of every normaliser: FOVs of other sizes (pixels), fewer valid tiles on one image (tiles),
    # and for dpo an image whose K rewards are equal (no preference pair).
    b.fov[0, :20] = False
    b.fov[3, :, :40] = False
    b.tile_valid[2, :2] = False
    if phase == "dpo":
        b.rewards[1] = 0.5
    feats = learner.features.get(b.keys, [s.image for s in b.samples])
    _, logp_old, ref_logits = learner._rollout_logprobs(b, feats)
    adv = None if phase in ("rce", "dpo") else learner._advantages(b, feats)
    rows = torch.tensor([2, 0, 3, 1])

    whole = learner._backward(b, feats, rows, phase, adv, logp_old, ref_logits)
    expected = _gradients(learner)
    _with(learner, micro_batch_size=3)  # pieces of 3 and 1 images
    assert len(learner._micro_batches(b, rows)) == 2
    split = learner._backward(b, feats, rows, phase, adv, logp_old, ref_logits)
    got = _gradients(learner)

    assert set(got) == set(expected) and len(got) > 0
    # dpo's gradient and margin are differences of the pair's nearly equal terms (the margin times beta = 50):
    # the same minibatch unsplit, only in another row order, already moves a gradient by 5e-5 of its largest
    # element (split: the same 5e-5).
    noise = 2e-4 if phase == "dpo" else 1e-6
    for name, grad in expected.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(
            got[name],
            grad,
            rtol=1e-5,
            atol=noise * float(grad.abs().max()),
            msg=lambda m, n=name: f"{n}: {m}",
        )
    assert set(split) == set(whole)
    for key, value in whole.items():
        torch.testing.assert_close(
            split[key],
            value,
            rtol=1e-5,
            atol=1e-5 if phase == "dpo" else 1e-7,
            msg=lambda m, k=key: f"{k}: {m}",
        )


def test_a_nonfinite_micro_batch_skips_the_step(scored, monkeypatch) -> None:
    import raysys.learner as learner_mod

    learner = Learner(load_config(None, [*FOUR, "learner.micro_batch_size=1"]))
    before = learner.trainable_state_dict()
    real = learner_mod.kl_penalty
    calls = iter(range(100))
    # the third micro-batch of the minibatch is NaN: the two before it were backpropagated already
    monkeypatch.setattr(
        learner_mod, "kl_penalty", lambda *a, **k: real(*a, **k) * (np.nan if next(calls) == 2 else 1.0)
    )
    m = learner.update(scored, iteration=0)
    assert m["update/nonfinite_steps"] == 1 and m["batch/images"] == 4
    after = learner.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in learner.policy.trainable_parameters())


def _llm_grads(policy, images: np.ndarray) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a loss on the policy's logits, and how often the first LLM layer ran."""
    layer = language_model(policy.base).model.layers[0].mlp
    runs = []
    hook = layer.register_forward_pre_hook(lambda *_: runs.append(1))  # a recompute stops early, after it
    logits = policy.mask_logits(images, ["Please segment the blood vessels."] * len(images))
    (logits.sigmoid() * torch.linspace(-1, 1, logits.shape[-1])).mean().backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in policy.named_trainable_parameters() if p.grad is not None}, len(
        runs
    )


def test_activation_checkpointing_recomputes_the_llm_and_keeps_the_gradients() -> None:
    cfg = load_config(None, SMALL_RL)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    plain, checkpointed = (build_policy(cfg.policy, seed=3) for _ in range(2))
    for policy in (plain, checkpointed):
        _move_away_from_the_reference(policy)
    checkpointed.enable_activation_checkpointing()
    expected, runs = _llm_grads(plain, images)
    got, reruns = _llm_grads(checkpointed, images)
    assert (runs, reruns) == (1, 2)  # the layer ran again in the backward pass
    assert any(".lora_A." in n and "language_model" in n for n in got)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_is_the_learners_only() -> None:
    cfg = load_config(None, [*SMALL_RL, "learner.activation_checkpointing=true"])
    learner, rollout = Learner(cfg), RolloutWorker(cfg, 0)
    assert language_model(learner.policy.base).model.layers[0].gradient_checkpointing
    assert not language_model(rollout.policy.base).model.layers[0].gradient_checkpointing


def test_rollout_masks_do_not_depend_on_the_images_per_policy_call(scored) -> None:
    cfg = load_config(None, [*FOUR, "rollout.max_staleness=1"])  # the logits travel too
    whole = RolloutWorker(cfg, 0)
    one = RolloutWorker(dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, batch_size=1)), 0)
    a, b = (w.sample([3, 0, 5], iteration=2) for w in (whole, one))
    np.testing.assert_array_equal(a.unpack(), b.unpack())
    np.testing.assert_allclose(a.logits, b.logits, atol=2e-3)  # float16 of float32 logits, other batch shapes
    np.testing.assert_array_equal(scored[0].batch.unpack(), whole.sample([0, 1, 2, 3], iteration=0).unpack())


def test_ddp_all_reduces_once_a_minibatch(scored, tmp_path, monkeypatch) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        learner = Learner(load_config(None, [*FOUR, "learner.micro_batch_size=1", "learner.algorithm=ppo"]))
        learner.use_ddp(DDP)
        skipped = []
        real = DDP.no_sync
        monkeypatch.setattr(
            DDP, "no_sync", lambda self: skipped.append(type(self.module).__name__) or real(self)
        )
        m = learner.update(scored, iteration=0)
    finally:
        dist.destroy_process_group()
    # 4 micro-batches: the first 3 accumulate locally in both wrapped modules, the last one all-reduces
    assert m["update/nonfinite_steps"] == 0 and np.isfinite(m["loss/value"])
    assert sorted(skipped) == ["PeftModel"] * 3 + ["ValueHead"] * 3
