"""RolloutWorker: holds a policy copy and samples K masks per image at the current policy version; with
``reward.device: cuda`` it also scores them on its GPU (``sample_scored``, ``raysys.reward.TorchGTScorer``).

A plain class; ``ray.remote(num_gpus=..., num_cpus=..., max_restarts=...)`` is applied where it is launched,
so tests build it in-process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from envs.datasets import load_dataset
from policies.distributions import pack_masks, sample_masks
from policies.factory import build_policy
from policies.policy import bf16_autocast
from raysys.batches import RolloutBatch
from raysys.config import Config
from raysys.data import dataset_for_split, train_view
from raysys.features import feature_cache

if TYPE_CHECKING:
    from raysys.batches import ScoredRollout

log = logging.getLogger(__name__)


def sample_seed(seed: int, iteration: int, index: int) -> int:
    """Seed of the K samples of image ``index`` at ``iteration``: the same masks whichever worker (or a
    restarted one) draws them, so retries neither lose nor duplicate samples and resumed runs match."""
    return (seed * 1_000_003 + iteration * 10_007 + index) % (2**63 - 1)


def pick_device(gpus: float) -> torch.device:
    return torch.device("cuda") if gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


class RolloutWorker:
    def __init__(self, cfg: Config, worker_index: int = 0) -> None:
        if cfg.rollout.torch_threads > 0:
            torch.set_num_threads(cfg.rollout.torch_threads)
        self.cfg = cfg
        self.index = worker_index
        self.device = pick_device(cfg.rollout.gpus_per_worker)
        self.policy = build_policy(cfg.policy, seed=cfg.run.seed, device=self.device)
        self.train = train_view(cfg, dataset_for_split(cfg.data, "train", load=load_dataset))
        self.features = feature_cache(self.policy, self.train, cfg.rollout.images_per_iteration)
        self.version = 0
        self.scorer = None  # scores the GT reward on this device with reward.device cuda (as resolved)
        if cfg.reward.device == "cuda":
            from raysys.reward import TorchGTScorer

            if self.device.type != "cuda":
                log.warning("reward.device=cuda but rollout actor %d has no CUDA device: it scores on its CPU "
                            "(the same rewards, slower)", worker_index)  # fmt: skip
            self.scorer = TorchGTScorer(cfg, self.train, self.device)

    def _logits(self, keys: Sequence, samples: Sequence) -> torch.Tensor:
        """Mask logits [B,H,W] (float32) of the samples, ``rollout.batch_size`` images per policy call (each with
        its cached frozen features), under the learner's autocast (``learner.amp``)."""
        step = self.cfg.rollout.batch_size or len(samples)
        out = []
        for start in range(0, len(samples), step):
            part = samples[start : start + step]
            feats = self.features.get(keys[start : start + step], [s.image for s in part])
            with bf16_autocast(self.device, enabled=self.cfg.learner.amp):
                logits = self.policy.mask_logits(
                    np.stack([s.image for s in part]), [s.prompt for s in part], features=feats
                )
            out.append(logits.float())
        return out[0] if len(out) == 1 else torch.cat(out)

    def ready(self) -> dict[str, object]:
        from raysys.placement import placement

        out = {**placement(), "worker": self.index, "version": self.version, "device": str(self.device)}
        if self.scorer is not None:
            out["reward_device"] = str(self.scorer.reward.device)
        return out

    def set_weights(self, state_dict: dict[str, torch.Tensor], version: int) -> int:
        """Load only the trainable tensors (Ray resolves an ObjectRef argument to the dict)."""
        self.policy.load_trainable_state_dict(state_dict, strict=True)
        self.version = int(version)
        return self.version

    def sample(self, indices: Sequence[int], *, iteration: int) -> RolloutBatch:
        """K masks per image [B, K, H, W] (H x W: the training crop or the whole image), sampled from
        Bernoulli(sigmoid(z / T)) inside the FOV."""
        return self._sample(indices, iteration=iteration)[0]

    def sample_scored(self, indices: Sequence[int], *, iteration: int) -> ScoredRollout:
        """``sample``, then the GT reward of the masks on this actor's device, from the tensors still there: the
        ScoredRollout a reward actor would return. Its ``seconds`` is the scoring, the batch's the sampling."""
        if self.scorer is None:
            raise RuntimeError(f"rollout actor {self.index} scores only with reward.device=cuda")
        return self.scorer.score(*self._sample(indices, iteration=iteration))

    @torch.no_grad()
    def _sample(
        self, indices: Sequence[int], *, iteration: int
    ) -> tuple[RolloutBatch, torch.Tensor, torch.Tensor | None]:
        """The RolloutBatch, with its masks bool [B, K, H, W] and greedy masks bool [B, H, W] (or None) still on
        the device."""
        t0 = time.perf_counter()
        k, temperature = self.cfg.rollout.samples_per_image, self.cfg.rollout.temperature
        greedy = self.cfg.learner.advantage == "self_critical"
        indices = [int(i) for i in indices]
        keys, samples = zip(*(self.train.get(i, iteration) for i in indices), strict=True)
        if len({smp.mask.shape for smp in samples}) > 1:
            sizes = sorted({smp.mask.shape for smp in samples})
            raise ValueError(
                f"training images of different sizes {sizes} cannot share a rollout batch; train on crops "
                "(data.crop, e.g. 128)"
            )
        logits = self._logits(keys, samples)
        fovs = torch.from_numpy(np.stack([s.fov for s in samples])).to(logits.device)
        # one generator per image: its masks depend neither on the other images nor on rollout.batch_size
        seeds = [sample_seed(self.cfg.run.seed, iteration, i) for i in indices]
        gens = [torch.Generator(device=logits.device).manual_seed(seed) for seed in seeds]
        masks = torch.cat(
            [
                sample_masks(logits[b : b + 1], k=k, temperature=temperature, generator=g)
                for b, g in enumerate(gens)
            ]
        )
        masks &= fovs[:, None]
        greedy_masks = greedy_on_device = None
        if greedy:  # the deployed masks (thresholded as evaluation does), the self-critical baseline
            greedy_on_device = (torch.sigmoid(logits) >= self.cfg.eval.threshold) & fovs
            greedy_masks = pack_masks(greedy_on_device.cpu())
        batch = RolloutBatch(
            indices=indices,
            ids=[s.id for s in samples],
            masks=pack_masks(masks.cpu()),
            version=self.version,
            iteration=iteration,
            temperature=temperature,
            worker=self.index,
            seconds=time.perf_counter() - t0,
            greedy_masks=greedy_masks,
            # float16 holds |z| <= 65504; clamped first so a saturated logit stays finite
            logits=logits.clamp(-3e4, 3e4).cpu().numpy().astype(np.float16)
            if self.cfg.rollout.max_staleness > 0
            else None,
        )
        return batch, masks, greedy_on_device
