"""The typed configuration tree.

One tree of frozen dataclasses (run, data, policy, reward, rollout, learner, tune, eval, sft, reward_net,
rllib). Every default and every field's doc string lives here or, for nodes owned by a package, in that package
(the reward objective in ``envs.rewards``; policy, sft and reward_net in ``policies.config``). Each node checks
its values when built (``envs.config_checks.check``) and raises :class:`ConfigError` naming the dotted key and
what is allowed. Reading YAML files and ``key.sub=value`` overrides into this tree, and writing it back, is
``raysys.config_io``::

    cfg = load_config("examples/tiny_synthetic.yaml", ["learner.lr=1e-5"])
    save_config(cfg, run_dir / "config.yaml")
    assert load_config(run_dir / "config.yaml") == cfg
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from envs.config_checks import ConfigError as ConfigError  # the tree's error, raised by raysys too
from envs.config_checks import as_number, check, check_label_selector, field_type
from envs.metrics import SWEEP_THRESHOLDS
from envs.rewards import RewardConfig as ObjectiveConfig
from envs.types import DEFAULT_PROMPT
from policies.config import PolicyConfig, RewardNetConfig, SFTConfig
from raysys import keys

FOLDER_CROP = 128
"""Training crop of folder datasets when ``data.crop`` is null (see benchmarks/crop_quality.py)."""
MAX_NAME_BYTES = 128
"""A run name is a folder name; with the suffixes raysys adds it stays far below the filesystems' 255 bytes."""
MAX_IMAGES = 1_000_000
"""Images per synthetic split (the splits' seed ranges are this far apart)."""


@dataclass(frozen=True)
class RunConfig:
    name: str = "tiny"
    """Run name; outputs go to ``<output_dir>/<name>/``. Also the Ray Train run name, so keep it stable."""
    output_dir: str = "runs"
    """Parent folder of run directories."""
    seed: int = 0
    """Global seed (policy init, sampling, data order)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Python logging level of the driver and the actors."""
    ray_address: str | None = None
    """Ray cluster to attach to; None uses RAY_ADDRESS or starts a private local Ray."""
    num_cpus: float | None = None
    """Logical CPUs of a private local Ray (more than the physical cores is fine: actors use fractions)."""
    num_gpus: float | None = None
    """Logical GPUs of a private local Ray; null detects them. On a CPU machine a number fakes GPUs, which
    tests placement (torch still runs on the CPU)."""
    storage_path: str | None = None
    """Where Ray Train persists checkpoints: null uses ``<run dir>/ray`` (one node); on a multi-node cluster
    a shared filesystem path or an object-store URI (``s3://bucket/raysys``) that every node can reach."""

    def __post_init__(self) -> None:
        check(
            re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
            "run.name",
            f"{self.name!r} is not a plain name: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit (a run lives in run.output_dir/<name>, never outside it)",
        )
        check(
            len(self.name.encode()) <= MAX_NAME_BYTES,
            "run.name",
            f"is longer than {MAX_NAME_BYTES} bytes; choose a shorter name",
        )
        check(self.seed >= 0, "run.seed", f"{self.seed} is negative; seeds are integers >= 0")
        check(self.num_cpus is None or self.num_cpus > 0, "run.num_cpus", "must be > 0 or null")
        check(self.num_gpus is None or self.num_gpus >= 0, "run.num_gpus", "must be >= 0 or null")


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["synthetic", "drive", "stare", "chase_db1", "hrf", "fives", "polygon_json", "parquet"] = (
        "synthetic"
    )
    """Dataset kind understood by ``envs.datasets.load_dataset``."""
    root: str | None = None
    """Dataset folder or file; must be null for ``synthetic``."""
    size: int = 256
    """Synthetic image size (square), in pixels."""
    n_train: int = 64
    """Synthetic training images (rollouts and SFT)."""
    n_val: int = 16
    """Synthetic validation images (model selection, threshold choice)."""
    n_test: int = 32
    """Synthetic held-out images (never used for training or selection)."""
    seed: int = 0
    """Synthetic data seed; splits use disjoint seed ranges."""
    domain: Literal["source", "shifted"] = "source"
    """Synthetic domain (``envs.synthetic.DOMAINS``): ``shifted`` is a second site (smaller field of view,
    thinner and fainter vessels, more blur and noise) for domain-adaptation runs."""
    val_fraction: float = 0.0
    """For folder datasets without a validation split: fraction of train carved out as ``val`` (the last
    images by sorted id, or in file order for polygon_json/parquet; the test split is never touched)."""
    prompt: str = DEFAULT_PROMPT
    """Prompt used when a dataset carries none."""
    allow_outside_root: bool = False
    """polygon_json / parquet: let manifest paths point outside the dataset folder (absolute or ``../``)."""
    skip_unlabelled: bool = False
    """hrf: leave out images without a vessel mask (with a warning) instead of refusing the set; the public
    HRF copies in circulation lack 3 of the 45 labels."""
    crop: int | None = None
    """Side of the random square crops that SFT, reward-net data and RL rollouts train on (seeded per image
    and iteration). null: whole images for synthetic data, 128 for folder datasets (the best Dice per
    CPU-minute measured in benchmarks/crop_quality.py) with the tiny policy; whole images for a real Sa2VA
    checkpoint (trained on whole images); 0: always whole images."""
    crop_min_fov: float = 0.5
    """A training crop holds at least this fraction of FOV pixels (best of 16 draws otherwise)."""
    scale: float = 1.0
    """Images are resampled by this factor for training and inference (e.g. 0.5 for HRF 3504x2336 or
    FIVES 2048x2048); probabilities are mapped back and every metric is at native resolution."""
    standardize: bool = False
    """Map every image's colours inside its field of view to one fixed mean and spread per channel
    (``envs.windows.standardize_sample``) before any model, reward or metric sees it. For models meant to
    work across sites (cameras, exposure): no label is needed, so it applies to a new site's images as is."""

    def __post_init__(self) -> None:
        check(self.size >= 64, "data.size", f"{self.size} is too small; use >= 64")
        check(
            self.crop is None or self.crop == 0 or self.crop >= 64,
            "data.crop",
            "must be null, 0 or >= 64 (the learned reward net needs 64 px)",
        )
        check(0.0 <= self.crop_min_fov <= 1.0, "data.crop_min_fov", "must be in [0, 1]")
        check(
            not self.skip_unlabelled or self.kind == "hrf",
            "data.skip_unlabelled",
            f"only applies to data.kind=hrf (got {self.kind!r}); the other kinds refuse an image without a mask",
        )
        check(0.0 < self.scale <= 4.0 and math.isfinite(self.scale), "data.scale", "must be in (0, 4]")
        least = 1 if self.kind == "synthetic" else 0  # folder datasets take their images from the folder
        for key in ("n_train", "n_val", "n_test"):
            n = getattr(self, key)
            check(least <= n <= MAX_IMAGES, f"data.{key}", f"{n} is not in {least}..{MAX_IMAGES:,} (images)")
        check(self.seed >= 0, "data.seed", f"{self.seed} is negative; seeds are integers >= 0")
        check(0.0 <= self.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        check(
            self.kind != "synthetic" or self.root is None,
            "data.root",
            "must be null for kind 'synthetic' (set data.kind to a folder dataset to use a root)",
        )
        check(self.kind == "synthetic" or bool(self.root), "data.root", f"kind '{self.kind}' needs a root")
        check(
            self.kind == "synthetic" or self.domain == "source",
            "data.domain",
            "only synthetic data has domains; a folder dataset is its own domain",
        )


@dataclass(frozen=True)
class RewardConfig(ObjectiveConfig):
    """The reward objective (weights, scales, tiles: see ``envs.rewards.RewardConfig``) plus its actors."""

    source: Literal["gt", "learned", "auto"] = "gt"
    """``gt``: multi-objective reward vs ground truth; ``learned``: the reward net only (GT-free);
    ``auto``: GT where an image has a mask, learned otherwise."""
    reward_net: str | None = None
    """Path of a trained reward net (``best_reward_net.pth``); needed for ``learned``/``auto``."""
    skip_learned: bool = False
    """Drop learned-reward samples from training (they are still logged)."""
    learned_weight: float = 1.0
    """Loss weight of learned-reward samples when they are kept."""
    postprocess: bool = False
    """Score each mask after the deployed post-processing (closing by ``eval.closing_radius``, components
    under ``eval.min_size`` pixels removed), as ``raysys eval`` with ``eval.postprocess`` shows it: speckle
    that post-processing removes costs no reward (the log-probabilities stay those of the raw sample)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the GT reward is scored: ``cpu`` the reward actors (numpy), ``cuda`` each rollout actor on its GPU after
    sampling (bit-identical, no reward actors), ``auto`` cuda if they get CUDA GPUs. Learned, postprocess: cpu."""
    num_actors: int = 1
    """Reward actors (CPU only; each scores on one core). With more of them than ``rollout.num_workers``, each
    rollout shard is scored in ``ceil(num_actors / rollout.num_workers)`` parts at once."""
    cpus_per_actor: float = 0.5
    """Logical CPUs reserved by each reward actor."""
    label_selector: dict[str, str] = field(default_factory=dict)
    """Ray node labels a reward actor's node must have, e.g. ``{role: reward}`` for nodes started with
    ``ray start --labels role=reward``; empty: any node."""
    scheduling: Literal["default", "spread"] = "default"
    """Placement of the reward actors over the nodes the selector allows: ``default`` (Ray's) or ``spread``
    (over as many nodes as fit)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(
            self.source == "gt" or bool(self.reward_net),
            "reward.reward_net",
            f"source '{self.source}' needs the path of a trained reward net",
        )
        check(0.0 <= self.learned_weight <= 1.0, "reward.learned_weight", "must be in [0, 1]")
        check(
            self.source == "learned" or sum(self.weights.as_dict().values()) > 0,
            "reward.weights",
            "are all 0: every mask would get the same reward and nothing is learned; give a term a weight",
        )
        check(self.num_actors >= 1, "reward.num_actors", "must be >= 1")
        check(self.cpus_per_actor > 0, "reward.cpus_per_actor", "must be > 0")
        check_label_selector(self.label_selector, "reward.label_selector")


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = 2
    """Rollout actors, each holding a policy copy (one GPU each on a cluster)."""
    gpus_per_worker: float = 0.0
    """GPUs per rollout actor (0 on a laptop or CI)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs per rollout actor (fractions let everything fit 2 cores)."""
    samples_per_image: int = 8
    """K: masks sampled per image (the GRPO group)."""
    temperature: float = 1.0
    """Sampling temperature T: m ~ Bernoulli(sigmoid(z / T))."""
    images_per_iteration: int = 8
    """Images per iteration across all rollout workers."""
    jitter: float = 0.0
    """Photometric jitter of the RL training images: each image (or crop) gets a gamma and a contrast factor
    exp(U(-jitter, jitter)) per iteration inside its field of view, seeded by ``run.seed`` (the rollout actors,
    reward actors and learner see the same pixels; so do the reward net's training pieces). 0: off. For sets
    whose test images differ in exposure or vessel contrast from the few training ones (0.4 spans
    x0.67-x1.5). SFT crops are jittered by ``sft.jitter``; validation and test images never."""
    batch_size: int | None = None
    """Images per policy call in a rollout actor (null: its whole shard at once); the masks do not depend on it."""
    max_restarts: int = 2
    """Ray restarts of a dead rollout actor before the run fails."""
    torch_threads: int = 1
    """torch intra-op threads per rollout actor (several actors share the cores)."""
    max_staleness: int = 0
    """0: lock step (sample, then update, then sync). N >= 1: the rollout actors sample the batches of the
    next N iterations while the learner updates; a batch sampled by policy version v is trained on only while
    ``learner version - v <= N`` (else dropped and counted in ``batch/stale``), with a truncated
    importance-sampling correction for the lag (``learner.is_cap``)."""
    timeout_s: float = 600.0
    """Longest wait on any actor call (sampling, scoring, a weight sync, a restarted actor answering); past it
    the run fails with an error naming the actor and what it was doing."""
    label_selector: dict[str, str] = field(default_factory=dict)
    """Ray node labels a rollout actor's node must have, e.g. ``{role: rollout}`` for nodes started with
    ``ray start --labels role=rollout``; empty: any node. A restarted actor (its node lost) is placed by the
    same rule."""
    scheduling: Literal["default", "spread"] = "default"
    """Placement of the rollout actors over the nodes the selector allows: ``default`` (Ray's) or ``spread``
    (over as many nodes as fit: losing one node then costs the fewest actors)."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "rollout.num_workers", "must be >= 1")
        check(self.torch_threads >= 1, "rollout.torch_threads", f"{self.torch_threads} must be >= 1")
        check_label_selector(self.label_selector, "rollout.label_selector")
        check(0 <= self.max_staleness <= 8, "rollout.max_staleness", "must be in 0..8")
        check(self.timeout_s > 0 and math.isfinite(self.timeout_s), "rollout.timeout_s", "must be > 0")
        check(self.gpus_per_worker >= 0, "rollout.gpus_per_worker", "must be >= 0")
        check(self.cpus_per_worker > 0, "rollout.cpus_per_worker", "must be > 0")
        check(self.samples_per_image >= 2, "rollout.samples_per_image", "needs >= 2 for a group baseline")
        check(self.temperature > 0, "rollout.temperature", "must be > 0")
        check(self.images_per_iteration >= 1, "rollout.images_per_iteration", "must be >= 1")
        check(0.0 <= self.jitter <= 1.0 and math.isfinite(self.jitter), "rollout.jitter", "must be in [0, 1]")
        check(self.batch_size is None or self.batch_size >= 1, "rollout.batch_size", "must be >= 1 or null")


@dataclass(frozen=True)
class LearnerConfig:
    algorithm: Literal["grpo", "ppo", "rce_grpo", "dpo"] = "grpo"
    """``grpo``: group baseline (default); ``ppo``: value-head baseline; ``rce_grpo``: RCE warm-up then GRPO;
    ``dpo``: offline direct preference optimisation: the rollout actors keep the starting (SFT) weights, and
    each image's best and worst of its K masks (by the reward) form a preference pair."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "self_critical"] = "grpo"
    """Baseline of ``grpo``/``rce_grpo``: ``grpo`` (R - mean) / std, ``dr_grpo`` R - mean (no std), ``rloo``
    leave-one-out mean (policies/losses.py ADVANTAGE_FNS); ``self_critical`` (R - R_greedy) / std: the
    baseline is the reward of the mask users get (``eval.threshold``) on the same image and tile, which the
    rollout actors then also return, so training improves that mask rather than the average sample."""
    policy_loss: Literal["ppo_clip", "pg"] = "ppo_clip"
    """``ppo_clip``: clipped surrogate per pixel; ``pg``: unclipped importance-weighted policy gradient
    (policies/losses.py POLICY_LOSSES)."""
    iterations: int = 60
    """Rollout/update iterations."""
    lr: float = 3e-4
    """Adam learning rate (1e-3 let the KL run away at small scale)."""
    grpo_lr: float | None = None
    """Learning rate of the GRPO phase after an RCE warm-up (null: ``lr``)."""
    rce_epochs: int = 0
    """RCE warm-up iterations before GRPO (``rce_grpo`` only)."""
    heads_only_after_rce: bool = False
    """Freeze everything but the heads during the GRPO phase of ``rce_grpo``."""
    epochs: int = 2
    """Optimisation epochs per rollout batch."""
    minibatch_size: int = 4
    """Images per minibatch (each with its K samples)."""
    micro_batch_size: int | None = None
    """Images per forward and backward pass; their gradients add up to the minibatch's before its one step, and
    the no-grad passes use it too (null: the whole minibatch at once)."""
    activation_checkpointing: bool = False
    """Recompute the LLM's activations in the backward pass instead of keeping them (less memory, ~30 % more
    compute; for 4B-class Sa2VA). The learner's policy only."""
    clip: float = 0.2
    """PPO clip range on the per-pixel ratio."""
    kl_coef: float = 0.05
    """Coefficient of the exact per-pixel KL to the adapter-disabled reference."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    value_coef: float = 0.5
    """Value-loss coefficient (``ppo``)."""
    is_cap: float = 2.0
    """``rollout.max_staleness`` >= 1: per-pixel importance weights pi_learner / pi_behaviour of a stale batch
    are truncated at this value (truncated IS); the learner's weights before the update stay the PPO ratio's
    reference."""
    dpo_beta: float = 50.0
    """``dpo``: beta on the pair's log-ratio margin, each log-ratio being a mean over FOV pixels (a sum over
    ~10^4-10^5 pixels would saturate the sigmoid at once)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    tile_advantage_weight: float = 0.8
    """Share of the advantage from tiled rewards (the rest from whole-image rewards)."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """Train workers run on a GPU (``gpus_per_worker`` of one each)."""
    gpus_per_worker: float = 1.0
    """GPUs per Train worker with ``use_gpu``; a fraction shares one GPU with the rollout workers (one-GPU
    machines: e.g. 0.5 here and ``rollout.gpus_per_worker`` 0.25 with two rollout workers)."""
    cpus_per_worker: float = 0.5
    """Logical CPUs per Train worker."""
    label_selector: dict[str, str] = field(default_factory=dict)
    """Ray node labels a Train worker's node must have, e.g. ``{role: learner}``; empty: any node."""
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] = "pack"
    """Ray Train's placement strategy of the learner ranks: ``pack`` fills a node first (fastest all-reduce),
    ``spread`` prefers other nodes, the ``strict_`` forms refuse the alternative."""
    dist_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend of the learner workers; auto is nccl with GPUs, gloo without."""
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """DDP for <= 4B-class models; DeepSpeed ZeRO for larger ones."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (``strategy: deepspeed``)."""
    amp: bool = True
    """bf16 autocast on GPU, in the learner and the rollout actors alike (ignored on CPU)."""
    checkpoint_every: int = 10
    """Report a Ray Train checkpoint every N iterations."""
    max_failures: int = 1
    """Times Ray Train restarts a failed learner worker group from its latest checkpoint within one run
    (-1: no limit; 0: the run fails, continue it with ``--resume``)."""
    torch_threads: int = 0
    """torch intra-op threads per Train worker (0: torch's default)."""

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "learner.iterations", "must be >= 1")
        check(self.torch_threads >= 0, "learner.torch_threads", "must be >= 0 (0: torch's default)")
        check(self.lr > 0, "learner.lr", "must be > 0")
        check(self.grpo_lr is None or self.grpo_lr > 0, "learner.grpo_lr", "must be > 0 or null")
        check(self.epochs >= 1, "learner.epochs", "must be >= 1")
        check(self.minibatch_size >= 1, "learner.minibatch_size", "must be >= 1")
        check(
            self.micro_batch_size is None or 1 <= self.micro_batch_size <= self.minibatch_size,
            "learner.micro_batch_size",
            "must be in 1..learner.minibatch_size or null",
        )
        check(
            self.micro_batch_size is None or self.strategy == "ddp",
            "learner.micro_batch_size",
            "is not supported with strategy deepspeed (its engine owns accumulation); use null or strategy ddp",
        )
        check(0 < self.clip < 1, "learner.clip", "must be in (0, 1)")
        for key in ("kl_coef", "entropy_coef", "value_coef", "rce_epochs"):
            check(getattr(self, key) >= 0, f"learner.{key}", "must be >= 0")
        check(self.max_grad_norm > 0, "learner.max_grad_norm", "must be > 0")
        check(self.dpo_beta > 0, "learner.dpo_beta", "must be > 0")
        check(self.is_cap >= 1 and math.isfinite(self.is_cap), "learner.is_cap", "must be >= 1")
        check(0 <= self.tile_advantage_weight <= 1, "learner.tile_advantage_weight", "must be in [0, 1]")
        check(self.num_workers >= 1, "learner.num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, "learner.cpus_per_worker", "must be > 0")
        check(
            0 < self.gpus_per_worker <= 1,
            "learner.gpus_per_worker",
            "must be in (0, 1]: a rank uses one device",
        )
        check(
            not (
                self.use_gpu
                and self.gpus_per_worker < 1
                and self.num_workers > 1
                and self.dist_backend != "gloo"
            ),
            "learner.gpus_per_worker",
            "is a fraction with several GPU ranks: Ray may put two ranks on one GPU, which NCCL refuses; "
            "use 1, one rank, or learner.dist_backend=gloo",
        )
        check_label_selector(self.label_selector, "learner.label_selector")
        check(self.zero_stage in (1, 2, 3), "learner.zero_stage", "allowed: 1, 2, 3")
        check(
            not (self.strategy == "deepspeed" and self.algorithm == "ppo"),
            "learner.strategy",
            "the PPO value head runs outside the DeepSpeed engine; use algorithm grpo or rce_grpo with deepspeed",
        )
        check(
            not (self.advantage == "self_critical" and self.algorithm in ("ppo", "dpo")),
            "learner.advantage",
            "self_critical goes with algorithm grpo or rce_grpo (ppo's baseline is its value head, dpo has none)",
        )
        check(self.checkpoint_every >= 1, "learner.checkpoint_every", "must be >= 1")
        check(self.max_failures >= -1, "learner.max_failures", "must be >= -1 (-1: no limit)")


SEARCH_SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")


def parse_objective(metric: str) -> dict[str, float]:
    """``"val/dice"`` -> {"val/dice": 1.0}; ``"0.7*val/dice + 0.3*val/cldice"`` -> both with their weights."""
    terms: dict[str, float] = {}
    for raw in metric.split("+"):
        weight, _, name = raw.strip().rpartition("*")
        name = name.strip()
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            w = math.nan
        check(
            name.startswith(keys.val("")) and math.isfinite(w) and name not in terms,
            "tune.metric",
            f"{metric!r} must be a val/... metric or a sum like '0.7*val/dice + 0.3*val/cldice'",
        )
        terms[name] = w
    return terms


@dataclass(frozen=True)
class TuneConfig:
    num_samples: int = 1
    """Samples drawn from the search space (grid axes multiply this)."""
    metric: str = keys.VAL_DICE
    """Validation metric to optimise (``val/dice``, ``val/cldice``, ``val/recall``, ...) or a weighted sum
    of them, e.g. ``0.7*val/dice + 0.3*val/cldice``."""
    mode: Literal["max", "min"] = "max"
    """Optimisation direction of ``metric``."""
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    """Trial scheduler."""
    max_concurrent_trials: int = 0
    """Trials at once; 0 derives it from the cluster's resources."""
    search_space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Dotted key -> spec, e.g. ``{"learner.lr": {"loguniform": [1e-5, 1e-3]}}``; spec kinds: grid, choice,
    uniform, loguniform."""
    normalize_reward_weights: bool = False
    """After sampling, rescale all ``reward.weights`` so they sum to 1 (swept and fixed ones alike)."""
    grace_iterations: int = 0
    """ASHA: iterations before a trial can be stopped, and PBT: iterations between perturbations;
    0 uses ``eval.every`` (a trial is only compared on validated iterations)."""

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials", "must be >= 0")
        check(self.grace_iterations >= 0, "tune.grace_iterations", "must be >= 0")
        parse_objective(self.metric)
        object.__setattr__(self, "search_space", dict(self.search_space))  # own copy: values get normalised
        for key, spec in list(self.search_space.items()):
            where = f"tune.search_space.{key}"
            check(
                isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in SEARCH_SPACE_KINDS,
                where,
                f"must be one mapping {{kind: values}} with kind in {list(SEARCH_SPACE_KINDS)}",
            )
            path = key.split(".")
            check(
                field_type(Config, path) is not None,
                where,
                f"'{key}' is not a config key",
            )
            kind, values = next(iter(spec.items()))
            check(
                isinstance(values, list | tuple) and len(values) >= 1,
                where,
                f"{kind} takes a list of values, got {values!r}",
            )
            if kind in ("uniform", "loguniform"):
                values = [as_number(v) for v in values]  # YAML reads 1e-4 (no dot) as a string
                self.search_space[key] = {kind: values}
                lo_hi = len(values) == 2 and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in values
                )
                check(lo_hi and values[0] < values[1], where, f"{kind} takes [low, high] with low < high")
                check(kind == "uniform" or values[0] > 0, where, "loguniform needs low > 0")


PROMPT_TARGETS = ("vessels", "dilated", "thick", "thin", "centerline", "wide", "core")
"""How the tiny prompt-conditioned segmenter's SFT target is derived from the vessel mask, per prompt."""


@dataclass(frozen=True)
class RLlibConfig:
    """The small RLlib PPO experiments: ``raysys prompt-rl`` and ``raysys postproc-rl``."""

    iterations: int = 30
    """PPO training iterations (each samples ``train_batch_size`` single-step episodes)."""
    train_batch_size: int = 256
    """Episodes (= env steps: one image each) per iteration."""
    minibatch_size: int = 64
    num_epochs: int = 4
    lr: float = 3e-4
    entropy_coeff: float = 0.01
    """Entropy bonus: guards the prompt policy against collapsing onto one action too early."""
    patience: int = 10
    """Early stopping: iterations without a better validation reward (0 = never stop early)."""
    num_env_runners: int = 0
    """0 samples in the algorithm's own process (fastest on a few cores); more for a cluster."""
    reward: Literal["gt", "learned"] = "gt"
    """Training reward of prompt-rl: the GT multi-objective reward, or the learned reward net only
    (``reward.reward_net``); evaluation always uses GT."""
    prompt_bank: tuple[str, ...] = (
        "Please segment the blood vessels.",
        "Segment the retinal vasculature.",
        "Segment all vessels, including the faintest capillaries.",
        "Segment the major vessels only.",
        "Segment only the thin vessels.",
        "Trace the vessel centerlines.",
        "Segment the vessels and their borders.",
        "Segment the vessel cores.",
    )
    """Prompts the policy chooses from (>= 8)."""
    prompt_targets: tuple[str, ...] = (
        "vessels", "vessels", "dilated", "thick", "thin", "centerline", "wide", "core",
    )  # fmt: skip
    """Per prompt, the SFT target of the tiny prompt-conditioned segmenter (``raysys prompt-rl`` trains one
    when ``policy.kind`` is tiny and no ``policy.checkpoint`` is given); kinds: see PROMPT_TARGETS."""
    segmenter_steps: int = 400
    """SFT steps of that segmenter."""
    grid_thresholds: tuple[float, ...] = SWEEP_THRESHOLDS
    """postproc-rl baseline: the global grid searched on the training images."""
    grid_closing: tuple[int, ...] = (0, 1, 2, 3)
    grid_min_size: tuple[int, ...] = (0, 8, 16, 32, 64)

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "rllib.iterations", "must be >= 1")
        check(
            self.train_batch_size >= self.minibatch_size >= 1,
            "rllib.minibatch_size",
            "must be in 1..train_batch_size",
        )
        check(len(self.prompt_bank) >= 8, "rllib.prompt_bank", "needs at least 8 prompts")
        check(
            len(set(self.prompt_bank)) == len(self.prompt_bank),
            "rllib.prompt_bank",
            "prompts must be distinct",
        )
        check(
            len(self.prompt_targets) == len(self.prompt_bank)
            and set(self.prompt_targets) <= set(PROMPT_TARGETS),
            "rllib.prompt_targets",
            f"needs one target per prompt, each one of {list(PROMPT_TARGETS)}",
        )
        check(self.patience >= 0, "rllib.patience", "must be >= 0")
        check(self.num_env_runners >= 0, "rllib.num_env_runners", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    threshold: float = 0.5
    """Greedy-mask threshold on sigmoid(z)."""
    thresholds: tuple[float, ...] = SWEEP_THRESHOLDS
    """Thresholds swept on probability maps."""
    every: int = 10
    """Validate every N iterations."""
    select_metric: str = keys.VAL_DICE
    """Validation metric that picks runs/<name>/checkpoints/best (model selection on val, never test)."""
    select_mode: Literal["max", "min"] = "max"
    """Direction of ``select_metric``."""
    postprocess: bool = False
    """Also score post-processed masks (closing, then small-component removal) in ``raysys eval``."""
    closing_radius: int = 1
    """Post-processing: disk radius of the morphological closing (0 disables)."""
    min_size: int = 16
    """Post-processing: components smaller than this many pixels are removed."""
    window: int | None = None
    """Side of the sliding windows of full-image inference (validation, eval, reports). null: the training
    crop (``data.crop``) when crops are on, else whole images; 0: whole images."""
    window_overlap: float = 0.25
    """Fraction of a window shared with each neighbour; overlaps are blended with centre-weighted means."""

    def __post_init__(self) -> None:
        check(
            self.window is None or self.window == 0 or self.window >= 64,
            "eval.window",
            "must be null, 0 or >= 64",
        )
        check(0.0 <= self.window_overlap < 1.0, "eval.window_overlap", "must be in [0, 1)")
        check(0 < self.threshold < 1, "eval.threshold", "must be in (0, 1)")
        check(all(0 < t < 1 for t in self.thresholds), "eval.thresholds", "every threshold must be in (0, 1)")
        check(len(self.thresholds) > 0, "eval.thresholds", "give at least one threshold, e.g. [0.3, 0.5]")
        check(self.every >= 1, "eval.every", "must be >= 1")
        check(
            self.select_metric in keys.VAL_METRICS or self.select_metric.startswith(keys.VAL_DICE_AT_PREFIX),
            "eval.select_metric",
            f"{self.select_metric!r} is not a validation metric; allowed: {', '.join(keys.VAL_METRICS)}",
        )
        check(self.closing_radius >= 0 and self.min_size >= 0, "eval.closing_radius/min_size", "must be >= 0")


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward_net: RewardNetConfig = field(default_factory=RewardNetConfig)
    rllib: RLlibConfig = field(default_factory=RLlibConfig)

    def __post_init__(self) -> None:
        side = self.train_crop or (self.data.size if self.data.kind == "synthetic" else None)
        tile = max(self.reward.tile_sizes)
        check(
            side is None or tile <= side,
            "reward.tile_sizes",
            f"tile {tile} is larger than the {side}-px images the rewards score (data.crop / data.size)",
        )
        check(
            self.rollout.max_staleness == 0 or self.learner.algorithm != "dpo",
            "rollout.max_staleness",
            "dpo learns from the starting policy's own masks, which are never stale; use 0",
        )
        no_gpu = self.reward.device == "cuda" and self.rollout.gpus_per_worker == 0
        check(not no_gpu, "reward.device", "cuda needs rollout GPUs (rollout.gpus_per_worker=0); use auto")
        check(
            len(self.reward.tile_sizes) == 1 or self.learner.algorithm != "ppo",
            "reward.tile_sizes",
            "several tile sizes need a group baseline (learner.algorithm grpo or rce_grpo); "
            "the ppo value head predicts one tile grid",
        )

    @property
    def train_crop(self) -> int | None:
        """The training crop in effect (None: whole images): ``data.crop``, or when null 128 for the tiny policy
        on folder data and whole images for synthetic data and real Sa2VA checkpoints (which resize every
        input to 1024 px and were trained on whole images)."""
        if self.data.crop is None:
            tiny_on_folder = self.data.kind != "synthetic" and self.policy.kind == "tiny"
            return FOLDER_CROP if tiny_on_folder else None
        return self.data.crop or None

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name
