"""Rollout, reward and learner classes in-process (no Ray): the same objects the actors wrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from policies.distributions import kl_bernoulli
from policies.losses import kl_penalty
from raysys.config import ConfigError
from raysys.config_io import load_config
from raysys.coordinator import LocalCoordinator, shards
from raysys.learner import Learner, learned_gt_alignment
from raysys.reward import RewardWorker, part_rows
from raysys.rollout import RolloutWorker
from raysys.testing.rl_small import SMALL_RL as SMALL
from raysys.train import iteration_indices


def all_parameters(learner: Learner) -> dict[str, torch.Tensor]:
    """A copy of every parameter the learner holds, frozen ones included: the policy model's, and the PPO
    value head's under ``value_head.``."""
    params = dict(learner.policy.model.named_parameters())
    if learner.value_head is not None:
        params.update({f"value_head.{n}": p for n, p in learner.value_head.named_parameters()})
    return {n: p.detach().clone() for n, p in params.items()}


def assert_exactly_the_trainable_set_changed(learner: Learner, before: dict[str, torch.Tensor]) -> None:
    """Every parameter that trains now moved, and no other (a frozen part that moved, or a trainable one left
    behind, fails)."""
    after = all_parameters(learner)
    trainable = {n for n, p in learner.policy.model.named_parameters() if p.requires_grad}
    if learner.value_head is not None:
        trainable |= {f"value_head.{n}" for n, p in learner.value_head.named_parameters() if p.requires_grad}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert trainable, "nothing is trainable"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert trainable <= changed, f"trainable parameters did not change: {sorted(trainable - changed)[:3]}"


@pytest.fixture(scope="module")
def cfg():
    return load_config(None, SMALL)


@pytest.fixture(scope="module")
def rollout(cfg):
    return RolloutWorker(cfg, 0)


@pytest.fixture(scope="module")
def reward(cfg):
    return RewardWorker(cfg)


def test_rollout_masks_are_seeded_fov_restricted_and_versioned(cfg, rollout) -> None:
    a = rollout.sample([1, 3], iteration=5)
    b = rollout.sample([3], iteration=5)
    masks = a.unpack()
    assert masks.shape == (2, 4, 64, 64) and masks.dtype == bool
    assert a.masks.nbytes * 8 == masks.size  # bit-packed for transport
    np.testing.assert_array_equal(masks[1], b.unpack()[0])  # same (iteration, image) -> same samples
    assert not np.array_equal(masks[1], rollout.sample([3], iteration=6).unpack()[0])
    assert not masks[0][:, ~rollout.train[1].fov].any()
    assert a.version == 0 and a.ids == [rollout.train[1].id, rollout.train[3].id]


def test_set_weights_changes_version_and_samples(cfg) -> None:
    worker = RolloutWorker(cfg, 1)
    before = worker.sample([0], iteration=0).unpack()
    sd = {k: v + 0.5 for k, v in worker.policy.trainable_state_dict().items()}
    assert worker.set_weights(sd, 7) == 7
    after = worker.sample([0], iteration=0)
    assert after.version == 7 and not np.array_equal(before, after.unpack())
    with pytest.raises(ValueError, match="does not match"):
        worker.set_weights({"nope": torch.zeros(1)}, 8)


def test_reward_worker_scores_tags_and_skips_nan(cfg, rollout, reward, monkeypatch) -> None:
    scored = reward.score(rollout.sample([0, 2], iteration=0))
    assert scored.rewards.shape == (2, 4) and scored.valid.all() and scored.sources == ["gt", "gt"]
    assert scored.tile_rewards.shape == (2, 4, 4, 4) and scored.tile_valid.any()
    assert {"dice", "recall", "topology", "length", "dice_raw"} <= set(scored.components)
    perfect = np.stack([np.stack([reward.train[i].mask] * 4) for i in (0, 2)])
    best = reward.score_masks([0, 2], perfect)
    assert (best.rewards > scored.rewards.max()).all()

    real_score = reward.reward.score

    def nan_for_second_image(pred, target):
        r = real_score(pred, target)
        if target is reward._target(*reward.train.get(2, 0)):
            object.__setattr__(r, "total", float("nan"))
        return r

    monkeypatch.setattr(reward.reward, "score", nan_for_second_image)
    bad = reward.score(rollout.sample([0, 2], iteration=0))
    assert bad.valid.tolist() == [True, False]
    assert "non-finite" in bad.errors[0]


def test_learner_update_moves_trainable_weights_and_rejects_stale_and_empty(cfg, rollout, reward) -> None:
    learner = Learner(cfg)
    before = all_parameters(learner)
    scored = [reward.score(rollout.sample([0, 1, 2, 3], iteration=0))]
    m = learner.update(scored, iteration=0)  # two minibatch steps: LoRA B leaves 0, then LoRA A moves too
    assert learner.version == 1 and m["batch/images"] == 4
    for key in (
        "loss/policy",
        "loss/kl",
        "policy/entropy",
        "policy/clipfrac",
        "rollout/reward_mean",
        "custom/gt_dice",
        "reward/dice",
        "time/update_s",
    ):
        assert np.isfinite(m[key]), key
    assert_exactly_the_trainable_set_changed(learner, before)
    # The same rollouts are now stale (sampled at version 0): nothing is trained on them.
    m2 = learner.update(scored, iteration=1)
    assert m2["update/skipped"] == 1.0 and m2["batch/stale"] == 4 and learner.version == 1
    scored[0].valid[:] = False
    scored[0].batch.version = 1
    m3 = learner.update(scored, iteration=1)
    assert m3["update/skipped"] == 1.0 and m3["batch/invalid"] == 4


@pytest.mark.parametrize("algorithm", ["ppo", "rce_grpo"])
def test_other_algorithms_update(cfg, rollout, reward, algorithm) -> None:
    c = load_config(
        None,
        [
            *SMALL,
            f"learner.algorithm={algorithm}",
            "learner.rce_epochs=1",
            "learner.grpo_lr=1e-4",
            "learner.heads_only_after_rce=true",
        ],
    )
    learner = Learner(c)
    co = LocalCoordinator([RolloutWorker(c, 0)], [RewardWorker(c)])
    for it in range(2):
        scored, _ = co.collect(iteration_indices(c, it, 6), iteration=it)
        before = all_parameters(learner)
        m = learner.update(scored, iteration=it)
        co.push_weights(learner.trainable_state_dict(), learner.version)
        assert np.isfinite(m["loss/total"])
        # ppo: the value head too; rce_grpo: everything in RCE, then the heads only (LoRA frozen)
        assert_exactly_the_trainable_set_changed(learner, before)
    if algorithm == "ppo":
        assert np.isfinite(m["loss/value"])
    else:
        assert m["learner/phase_rce"] == 0.0 and m["learner/lr"] == pytest.approx(1e-4)
        frozen = [n for n, p in learner.policy.model.named_parameters() if ".lora_" in n and p.requires_grad]
        assert not frozen  # heads only during GRPO


def test_advantage_and_policy_loss_come_from_the_config(cfg, rollout, reward, monkeypatch) -> None:
    import raysys.learner as learner_mod

    asked = []
    for name in ("get_advantage_fn", "get_policy_loss"):
        real = getattr(learner_mod, name)
        monkeypatch.setattr(learner_mod, name, lambda key, real=real: asked.append(key) or real(key))
    scored = reward.score(rollout.sample([0, 1, 2, 3], iteration=0))
    weights = {}
    for advantage, loss in (("grpo", "ppo_clip"), ("rloo", "pg")):
        c = load_config(None, [*SMALL, f"learner.advantage={advantage}", f"learner.policy_loss={loss}"])
        learner = Learner(c)
        before = all_parameters(learner)
        m = learner.update([scored], iteration=0)
        assert np.isfinite(m["loss/total"]) and advantage in asked and loss in asked
        assert_exactly_the_trainable_set_changed(learner, before)
        weights[advantage] = learner.trainable_state_dict()
    # same start, same rollouts: another estimator and loss give another step, in every trainable tensor
    assert all(not torch.equal(weights["grpo"][k], weights["rloo"][k]) for k in weights["grpo"])


def test_checkpoint_round_trip_restores_learner(cfg, rollout, reward, tmp_path) -> None:
    learner = Learner(cfg)
    learner.update([reward.score(rollout.sample([0, 1], iteration=0))], iteration=0)
    learner.save(tmp_path / "c", iteration=0)
    other = Learner(cfg)
    assert other.load(tmp_path / "c") == 1 and other.version == 1
    for k, v in learner.trainable_state_dict().items():
        torch.testing.assert_close(v, other.trainable_state_dict()[k])
    assert other.optimizer.state_dict()["state"].keys() == learner.optimizer.state_dict()["state"].keys()


def test_iteration_indices_and_shards_cover_without_duplicates(cfg) -> None:
    idx = iteration_indices(cfg, 3, 6)
    assert idx == iteration_indices(cfg, 3, 6) and len(set(idx)) == 4
    parts = shards(idx, 3)
    assert sorted(i for p in parts for i in p) == idx
    assert shards([1], 4) == [[1]]


def test_part_rows_split_evenly_in_order() -> None:
    for n in range(0, 12):
        for parts in range(1, 5):
            bounds = [part_rows(n, p, parts) for p in range(parts)]
            assert [i for a, b in bounds for i in range(a, b)] == list(range(n))  # all, in order, once
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    with pytest.raises(ValueError, match="part 2 of 2"):
        part_rows(4, 2, 2)


def test_a_shard_scored_in_parts_is_the_shard_scored_whole(cfg, rollout, reward) -> None:
    # What the learner gets when more reward actors than rollout actors split a shard (RayCoordinator).
    batch = rollout.sample([0, 1, 2, 3, 4], iteration=2)
    whole = reward.score(batch)
    parts = [reward.score(batch, (p, 2)) for p in range(2)]
    assert [s.batch.indices for s in parts] == [[0, 1, 2], [3, 4]]
    np.testing.assert_array_equal(np.concatenate([s.batch.unpack() for s in parts]), batch.unpack())
    np.testing.assert_array_equal(np.concatenate([s.rewards for s in parts]), whole.rewards)
    np.testing.assert_array_equal(np.concatenate([s.tile_rewards for s in parts]), whole.tile_rewards)
    for name, v in whole.components.items():
        np.testing.assert_array_equal(np.concatenate([s.components[name] for s in parts]), v)
    learner = Learner(cfg)
    a = learner._assemble(parts)[0]
    b = learner._assemble([whole])[0]
    assert a.indices == b.indices and torch.equal(a.masks, b.masks) and torch.equal(a.rewards, b.rewards)


def test_nonfinite_loss_is_never_stepped_on(cfg, rollout, reward, monkeypatch) -> None:
    import raysys.learner as learner_mod

    learner = Learner(cfg)
    before = learner.trainable_state_dict()
    monkeypatch.setattr(learner_mod, "kl_penalty", lambda *a, **k: torch.tensor(float("nan")))
    m = learner.update([reward.score(rollout.sample([0, 1, 2, 3], iteration=0))], iteration=0)
    assert m["update/nonfinite_steps"] == 2  # 1 epoch x 2 minibatches, both skipped
    after = learner.trainable_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kl_penalty_gradient_is_exactly_zero_at_the_reference() -> None:
    # The learner's KL term when the policy is its reference (every iteration 0): the gradient must be 0,
    # not rounding noise. Autograd through the logsigmoid formula gave up to 6e-8 per pixel on ~60% of the
    # pixels, and Adam turns even a 1e-11 gradient into steps of ~lr * g / eps.
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 64, 64, generator=g) * 4
    fov = torch.rand(2, 64, 64, generator=g) > 0.2
    for t in (0.5, 1.0, 3.0):
        z = ref.clone().requires_grad_(True)
        kl = kl_penalty(z, ref, fov=fov, temperature=t)
        kl.backward()
        assert kl == 0 and torch.equal(z.grad, torch.zeros_like(z)), t
    # Away from the reference it is the analytic gradient, p (1 - p) (z - z_ref) / T with p = sigmoid(z / T).
    z = (ref + torch.randn(2, 64, 64, generator=g)).double().requires_grad_(True)
    kl_bernoulli(z, ref.double(), temperature=2.0).sum().backward()
    zs, rs = z.detach() / 2, ref.double() / 2
    torch.testing.assert_close(z.grad, torch.sigmoid(zs) * torch.sigmoid(-zs) * (zs - rs) / 2)
    a, b = (torch.randn(1, 4, 4, generator=g, dtype=torch.float64).mul(3).requires_grad_(True) for _ in "ab")
    assert torch.autograd.gradcheck(lambda x, y: kl_bernoulli(x, y, temperature=1.7), (a, b))


@pytest.fixture(scope="module")
def reward_net_path(tmp_path_factory):
    from policies.reward_net import LightweightRewardNetwork

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rn") / "best_reward_net.pth"
    torch.save({"model_state_dict": LightweightRewardNetwork().state_dict()}, path)
    return path


def test_learned_gt_alignment_is_the_mean_correlation_of_the_group_rewards() -> None:
    from types import SimpleNamespace

    gt = np.array([[0.1, 0.2, 0.4, 0.3], [0.5, 0.1, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3]], np.float32)
    learned = np.array([[0.6, 0.7, 0.9, 0.8], [0.1, 0.5, 0.4, -0.3], [0.1, 0.2, 0.3, 0.4]], np.float32)
    rollout = SimpleNamespace(
        components={"learned_score": learned, "gt_total": gt}, valid=np.array([True, True, True])
    )
    # Image 0: a shifted copy (+1), image 1: a mirrored one (-1), image 2: constant GT (left out).
    assert learned_gt_alignment([rollout]) == pytest.approx(0.0, abs=1e-6)
    rollout.valid = np.array([True, False, True])
    assert learned_gt_alignment([rollout]) == pytest.approx(1.0)
    only_gt = SimpleNamespace(components={"gt_total": gt}, valid=rollout.valid)
    assert learned_gt_alignment([only_gt]) is None
    rollout.valid = np.array([False, False, True])
    assert learned_gt_alignment([rollout]) is None


def test_learned_rewards_are_tagged_weighted_or_skipped(rollout, reward_net_path) -> None:
    learned = [*SMALL, "reward.source=learned", f"reward.reward_net={reward_net_path}"]
    cfg_l = load_config(None, learned)
    worker = RewardWorker(cfg_l)
    scored = worker.score(rollout.sample([0, 1], iteration=0))
    assert scored.sources == ["learned", "learned"] and scored.valid.all()
    assert ((scored.rewards > 0) & (scored.rewards < 1)).all()  # the net's sigmoid output
    assert not scored.tile_valid.any()  # no tiles from a whole-image reward net
    assert "dice_raw" in scored.components  # GT still logged when it exists (learned-vs-GT gap)

    skip = Learner(load_config(None, [*learned, "reward.skip_learned=true"]))
    m = skip.update([scored], iteration=0)
    assert m["update/skipped"] == 1.0 and m["batch/skipped_learned"] == 2

    # Control: at the default weight 1 the same learned rewards give a gradient that moves every trainable
    # weight (two epochs of the one minibatch: LoRA A moves only once LoRA B has left 0).
    full = Learner(load_config(None, [*learned, "learner.epochs=2"]))
    before = all_parameters(full)
    m = full.update([scored], iteration=0)
    assert m["batch/images"] == 2 and m["policy/grad_norm"] > 1e-4
    assert m["custom/learned_gt_alignment"] == pytest.approx(learned_gt_alignment([scored]))
    assert_exactly_the_trainable_set_changed(full, before)

    # PPO and self-critical baselines under learned rewards (no tile rewards: no tile signal) train too; both
    # used to skip every step on a NaN (the value loss's and the tile std's mean over no valid tile).
    for extra in (["learner.algorithm=ppo"], ["learner.advantage=self_critical"]):
        learner = Learner(load_config(None, [*learned, "learner.epochs=2", *extra]))
        scored_here = scored
        if extra[0].endswith("self_critical"):  # greedy masks sampled and scored too
            sampled = RolloutWorker(learner.cfg).sample([0, 1], iteration=0)
            scored_here = RewardWorker(learner.cfg).score(sampled)
        before = all_parameters(learner)
        m = learner.update([scored_here], iteration=0)
        assert m["update/nonfinite_steps"] == 0.0 and np.isfinite(m["loss/total"]), extra
        assert_exactly_the_trainable_set_changed(learner, before)

    zero = Learner(load_config(None, [*learned, "reward.learned_weight=0"]))
    before = zero.trainable_state_dict()
    m = zero.update([scored], iteration=0)
    assert m["batch/images"] == 2
    # Weight 0 zeroes the advantages, so the surrogate and its gradient are exactly 0. The KL term is the
    # only one left, and at iteration 0 the policy is its reference: KL 0 with an exactly-0 gradient. So
    # the gradient is exactly 0 and Adam does not move a single weight (a tolerance would hide gradient
    # noise, which Adam's normalisation turns into steps of ~lr * g / eps).
    assert m["loss/policy"] == 0.0 and m["loss/kl"] == 0.0 and m["policy/grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in zero.trainable_state_dict().items())

    val = zero.validator.run()
    for key in ("val/learned_score", "val/reward_gap", "val/reward_gap_abs", "val/dice@0.5"):
        assert np.isfinite(val[key]), key
    assert val["val/reward_gap"] == pytest.approx(val["val/learned_score"] - val["val/dice"], abs=1e-6)
    # Dice and clDice at the validation-best threshold (what a sweep selects on) are those of a plain
    # evaluation at that threshold.
    from envs.datasets import load_dataset
    from policies.evaluation import evaluate_probs, predict_probs
    from raysys.data import dataset_for_split, inference_for

    images = list(dataset_for_split(zero.cfg.data, "val", load=load_dataset))
    probs = predict_probs(lambda im, pr: zero.policy.mask_logits(im, pr), images, inference_for(zero.cfg))
    at_best = evaluate_probs(probs, images, threshold=val["val/best_threshold"]).mean
    assert val["val/best_threshold_dice"] == pytest.approx(at_best["dice"], abs=1e-6)
    assert val["val/best_threshold_cldice"] == pytest.approx(at_best["cldice"], abs=1e-6)


def test_self_critical_baseline_is_the_greedy_masks_reward(cfg, rollout, reward) -> None:
    sc = load_config(None, [*SMALL, "learner.advantage=self_critical"])
    worker = RolloutWorker(sc, 0)
    batch = worker.sample([1, 3], iteration=5)
    # The K samples are the ones the group baselines see; the greedy masks ride along in their own field.
    np.testing.assert_array_equal(batch.unpack(), rollout.sample([1, 3], iteration=5).unpack())
    greedy = batch.unpack_greedy()
    assert greedy.shape == (2, 64, 64) and rollout.sample([1, 3], iteration=5).greedy_masks is None
    sample = worker.train[3]
    probs = torch.sigmoid(worker.policy.mask_logits(sample.image[None], [sample.prompt]))[0].detach().numpy()
    np.testing.assert_array_equal(greedy[1], (probs >= sc.eval.threshold) & sample.fov)
    # A part of the shard (more reward actors than rollout actors) keeps its images' greedy masks.
    np.testing.assert_array_equal(batch.rows(1, 2).unpack_greedy(), greedy[1:2])

    scored = RewardWorker(sc).score(batch)
    alone = reward.score_masks([1, 3], greedy[:, None], iteration=5)
    assert scored.rewards.shape == (2, 4) and scored.greedy_rewards.shape == (2,)
    np.testing.assert_allclose(scored.greedy_rewards, alone.rewards[:, 0], rtol=1e-6)
    np.testing.assert_allclose(scored.greedy_tile_rewards, alone.tile_rewards[:, 0], rtol=1e-6)

    learner = Learner(sc)
    b, _ = learner._assemble([scored])
    torch.testing.assert_close(b.baseline, torch.from_numpy(scored.greedy_rewards))
    # Whole-image part (tile weight 0): A = (R - R_greedy) / std(R - R_greedy) over the batch, every pixel.
    whole = Learner(
        load_config(None, [*SMALL, "learner.advantage=self_critical", "learner.tile_advantage_weight=0"])
    )
    diff = b.rewards - b.baseline[:, None]
    expected = (diff / (diff.std() + 1e-6))[..., None, None].expand_as(b.masks)
    torch.testing.assert_close(whole._advantages(b, None), expected)
    # Tile part: each tile's samples against the greedy mask's reward on that tile.
    tiles = Learner(
        load_config(None, [*SMALL, "learner.advantage=self_critical", "learner.tile_advantage_weight=1"])
    )
    tile = sc.reward.tile_sizes[0]
    tdiff = (b.tile_rewards - b.tile_baseline[:, None]) * b.tile_valid[:, None]
    tdiff = tdiff / (tdiff[b.tile_valid[:, None].expand_as(tdiff)].std() + 1e-6)
    got = tiles._advantages(b, None)
    torch.testing.assert_close(got[:, :, ::tile, ::tile], tdiff)
    m = learner.update([scored], iteration=0)
    assert np.isfinite(m["loss/total"]) and m["rollout/greedy_reward_mean"] == pytest.approx(
        float(scored.greedy_rewards.mean())
    )
    with pytest.raises(ConfigError, match=r"learner\.advantage"):
        load_config(None, ["learner.algorithm=ppo", "learner.advantage=self_critical"])


def test_postprocessed_reward_ignores_the_speckle_deployment_removes(cfg, reward) -> None:
    from scipy import ndimage

    sample = reward.train[0]
    far = ~ndimage.binary_dilation(sample.mask, iterations=4) & sample.fov
    speckle = np.zeros_like(far)
    ys, xs = np.nonzero(far)
    speckle[ys[::40], xs[::40]] = True  # isolated single pixels away from every vessel
    masks = np.stack([sample.mask & sample.fov, (sample.mask | speckle) & sample.fov])[None]
    raw = reward.score_masks([0], masks)
    assert raw.rewards[0, 1] < raw.rewards[0, 0]  # the raw reward pays for speckle
    post = RewardWorker(load_config(None, [*SMALL, "reward.postprocess=true"])).score_masks([0], masks)
    assert post.rewards[0, 0] == post.rewards[0, 1]
    np.testing.assert_array_equal(post.tile_rewards[0, 0], post.tile_rewards[0, 1])


def test_dpo_learns_offline_from_the_starting_policys_masks(cfg, rollout, reward) -> None:
    dpo = load_config(None, [*SMALL, "learner.algorithm=dpo"])
    learner = Learner(dpo)
    start = {k: v.clone() for k, v in learner.trainable_state_dict().items()}
    before = all_parameters(learner)
    co = LocalCoordinator([RolloutWorker(dpo, 0)], [RewardWorker(dpo)])
    for it in range(2):
        co.push_weights(learner.behaviour_state_dict(), learner.version)
        scored, _ = co.collect(iteration_indices(dpo, it, len(learner.train)), iteration=it)
        m = learner.update(scored, iteration=it)
        assert m["batch/images"] == 4 and np.isfinite(m["loss/total"]) and m["policy/dpo_pairs"] > 0
    # The learner moved; what the rollout actors sample with did not (offline preference data).
    assert_exactly_the_trainable_set_changed(learner, before)
    for k, v in learner.behaviour_state_dict().items():
        assert torch.equal(start[k], v)
    # Same seed and iteration: the offline masks are exactly those of a fresh starting policy.
    fresh = RolloutWorker(dpo, 0).sample([0, 1], iteration=1).unpack()
    np.testing.assert_array_equal(co.rollout[0].sample([0, 1], iteration=1).unpack(), fresh)


def test_multi_scale_tiles_reach_the_advantage_as_the_mean_over_sizes(cfg, rollout) -> None:
    ms = load_config(None, [*SMALL, "reward.tile_sizes=[16,8,32]"])
    batch = rollout.sample([1, 3], iteration=2)
    worker = RewardWorker(ms)
    scored = worker.score(batch)
    # The first size fills the usual fields; every other size rides in ``scales``, each equal to scoring
    # that size alone.
    assert sorted(scored.scales) == [8, 32]
    single = RewardWorker(load_config(None, [*SMALL, "reward.tile_sizes=[16]"])).score(batch)
    np.testing.assert_array_equal(scored.tile_rewards, single.tile_rewards)
    np.testing.assert_array_equal(scored.rewards, single.rewards)
    masks = batch.unpack()
    for t, tiles in scored.scales.items():
        assert tiles.rewards.shape == (2, 4, 64 // t, 64 // t) and tiles.valid.shape == (2, 64 // t, 64 // t)
        assert tiles.greedy is None
        for i, index in enumerate(batch.indices):
            sample = worker.train.get(index, 2)[1]
            alone = worker.reward.score_tiles(
                masks[i], worker.reward.prepare_target(sample.mask, sample.fov), tile=t
            )
            np.testing.assert_array_equal(tiles.rewards[i], alone.total)
            np.testing.assert_array_equal(tiles.valid[i], alone.valid)

    # Tile weight 1: a pixel's advantage is the mean of its three tiles' group advantages.
    learner = Learner(
        load_config(None, [*SMALL, "reward.tile_sizes=[16,8,32]", "learner.tile_advantage_weight=1"])
    )
    b, _ = learner._assemble([scored])
    assert sorted(b.scales) == [8, 32]
    from policies.losses import expand_tiles, tile_advantages

    expected = (
        sum(
            expand_tiles(tile_advantages(tr, valid=tv), tile=t, height=64, width=64)
            for t, (tr, tv) in [(16, (b.tile_rewards, b.tile_valid))]
            + [(t, (s.rewards, s.valid)) for t, s in b.scales.items()]
        )
        / 3
    )
    torch.testing.assert_close(learner._advantages(b, None), expected)
    m = learner.update([scored], iteration=0)
    assert np.isfinite(m["loss/total"])
    # Self-critical: every size has the greedy mask's tile rewards as its baseline.
    sc = load_config(None, [*SMALL, "reward.tile_sizes=[16,32]", "learner.advantage=self_critical"])
    greedy_batch = RolloutWorker(sc, 0).sample([1, 3], iteration=2)
    sc_scored = RewardWorker(sc).score(greedy_batch)
    tiles = sc_scored.scales[32]
    alone = RewardWorker(sc).score_masks([1, 3], greedy_batch.unpack_greedy()[:, None], iteration=2)
    np.testing.assert_allclose(tiles.greedy, alone.scales[32].rewards[:, 0], rtol=1e-6)
    assert tiles.rewards.shape == (2, 4, 2, 2)
    b, _ = Learner(sc)._assemble([sc_scored])
    torch.testing.assert_close(b.scales[32].baseline, torch.from_numpy(tiles.greedy))
    # Rows of a batch are one selection over every field, the nested tile sizes included.
    sub = b.select(torch.tensor([1, 0]))
    assert sub.indices == b.indices[::-1] and sub.samples == b.samples[::-1] and sub.keys == b.keys[::-1]
    for name in (
        "masks",
        "fov",
        "rewards",
        "tile_rewards",
        "tile_valid",
        "weight",
        "baseline",
        "tile_baseline",
    ):
        torch.testing.assert_close(getattr(sub, name), getattr(b, name).flip(0))
    torch.testing.assert_close(sub.scales[32].rewards, b.scales[32].rewards.flip(0))
    torch.testing.assert_close(sub.scales[32].baseline, b.scales[32].baseline.flip(0))
    assert sub.lag is None and sub.behaviour_logits is None
    with pytest.raises(ConfigError, match=r"reward\.tile_sizes"):
        load_config(None, ["learner.algorithm=ppo", "reward.tile_sizes=[16,32]"])


def test_stale_batches_within_max_staleness_train_with_truncated_importance_weights(rollout) -> None:
    from policies.distributions import pixel_log_probs

    cfg = load_config(None, [*SMALL, "rollout.max_staleness=1", "learner.is_cap=1.5"])
    worker, scorer = RolloutWorker(cfg, 0), RewardWorker(cfg)
    learner = Learner(cfg)
    co = LocalCoordinator([worker], [scorer])
    co.push_weights(learner.trainable_state_dict(), learner.version)
    # Both iterations are sampled before the first update, as asynchronous rollouts do.
    first, _ = co.dispatch(iteration_indices(cfg, 0, 6), iteration=0)
    second, _ = co.dispatch(iteration_indices(cfg, 1, 6), iteration=1)
    batch = first[0].batch
    assert batch.logits.dtype == np.float16 and batch.logits.shape == (4, 64, 64)
    # The masks are the lock-step ones (same seeds); only the logits ride along.
    np.testing.assert_array_equal(batch.unpack(), rollout.sample(batch.indices, iteration=0).unpack())
    assert rollout.sample(batch.indices, iteration=0).logits is None

    m = learner.update(first, iteration=0)
    # Same weights on both sides: the rollout's float16 logits give the learner's log-probabilities.
    assert m["async/staleness_0"] == 4 and m["async/staleness_mean"] == 0.0
    assert 0 <= m["async/logprob_mismatch"] < 2e-3 and "async/is_ratio_mean" not in m
    co.push_weights(learner.trainable_state_dict(), learner.version)
    b, counts = learner._assemble(second)
    assert counts["batch/stale"] == 0 and b.lag.tolist() == [1, 1, 1, 1]
    # The weights are pi_learner / pi_behaviour per pixel, truncated at learner.is_cap.
    feats = learner.features.get(b.keys, [s.image for s in b.samples])
    _, logp_old, _ = learner._rollout_logprobs(b, feats)
    b.behaviour_logits = b.behaviour_logits + 2.0  # a behaviour policy far enough away to be truncated
    weight, stats = learner._importance_weights(b, logp_old)
    ratio = torch.exp(logp_old - pixel_log_probs(b.behaviour_logits, b.masks))
    torch.testing.assert_close(weight, ratio.clamp(max=1.5))
    assert stats["async/is_clipped_frac"] > 0 and stats["async/is_ratio_max"] > 1.5
    m = learner.update(second, iteration=1)
    assert m["async/staleness_1"] == 4 and np.isfinite(m["loss/total"]) and m["async/is_ratio_mean"] > 0
    # Two versions behind is more than max_staleness 1: dropped and counted.
    assert learner._assemble(second)[1]["batch/stale"] == 4
    with pytest.raises(ConfigError, match=r"rollout\.max_staleness.*dpo"):
        load_config(None, ["learner.algorithm=dpo", "rollout.max_staleness=1"])
