"""Metric names: what metrics.jsonl, TensorBoard, Ray reports and the report page call each number. Code
that writes or reads a metric uses these names, so a renamed metric cannot silently drop out of a reader.
Every name in raysys comes from here (a unit test fails on a literal of one of the GROUPS elsewhere); names
with a variable part come from the functions at the end.

Groups: ``rollout/`` (sampled masks and their rewards), ``reward/`` (reward components), ``custom/`` (GT Dice,
learned score and best reward, as RLlib's custom metrics), ``loss/`` and ``policy/`` (the update),
``learner/`` (phase and learning rate), ``async/`` (asynchronous rollouts), ``val/`` (validation at
eval.threshold, plus ``val/dice@T`` per threshold), ``time/`` (seconds per stage), ``sync/``, ``batch/``,
``update/`` and ``fault/`` (counts), ``tune/`` (sweeps).
"""

from envs.metrics import SEGMENTATION_METRICS

GROUPS = (
    "rollout/", "reward/", "custom/", "loss/", "policy/", "learner/", "async/", "val/", "time/", "sync/",
    "batch/", "update/", "fault/", "tune/",
)  # fmt: skip
"""The prefixes of every metric name."""

REWARD_MEAN = "rollout/reward_mean"
REWARD_STD = "rollout/reward_std"
EP_REW_MEAN = "rollout/ep_rew_mean"
"""The mean episode return under RLlib's name (= REWARD_MEAN for mask RL), so dashboards compare both."""
LEARNED_FRACTION = "rollout/learned_fraction"
GREEDY_REWARD_MEAN = "rollout/greedy_reward_mean"
"""Reward of the greedy mask (``eval.threshold``), the deployed one; with ``learner.advantage=self_critical``."""
GREEDY_DICE = "rollout/greedy_dice"

BEST_REWARD = "custom/best_reward"
"""The best REWARD_MEAN so far."""
GT_DICE = "custom/gt_dice"
"""Mean GT Dice of the sampled masks (the ``dice_raw`` reward component), also under a learned reward."""
REWARD_NET_SCORE = "custom/reward_net_score"
"""Mean learned-reward score of the sampled masks (the ``learned_score`` component)."""
LEARNED_GT_ALIGNMENT = "custom/learned_gt_alignment"
"""Under a learned reward on labelled images: mean over images of the correlation between the learned scores
and the GT rewards of the image's K masks, i.e. between the group advantages each would give (GRPO centres
and scales per group, so this is what the update sees). Near 0 the learned reward steers nowhere, however
small its mean gap to GT (``REWARD_NET_SCORE`` vs ``GT_DICE``)."""

LOSS_TOTAL = "loss/total"
LOSS_POLICY = "loss/policy"
LOSS_KL = "loss/kl"
LOSS_VALUE = "loss/value"
ENTROPY = "policy/entropy"
GRAD_NORM = "policy/grad_norm"
KL_OLD_NEW = "policy/kl_old_new"
VERSION = "policy/version"
NONFINITE_STEPS = "update/nonfinite_steps"
SKIPPED = "update/skipped"
PHASE_RCE = "learner/phase_rce"
"""1 while ``rce_grpo`` runs its RCE iterations, else 0."""
LR = "learner/lr"

STALENESS_MEAN = "async/staleness_mean"
"""``rollout.max_staleness`` >= 1: mean over the batch's images of learner version - sampling version."""
STALENESS_MAX = "async/staleness_max"
STALENESS_COUNT = "async/staleness_"
"""Prefix: ``async/staleness_<n>`` images trained on at staleness n (the histogram)."""
IS_RATIO_MEAN = "async/is_ratio_mean"
"""Per-pixel pi_learner / pi_behaviour on stale images, before truncation at ``learner.is_cap``."""
IS_RATIO_MAX = "async/is_ratio_max"
IS_CLIPPED = "async/is_clipped_frac"
LOGPROB_MISMATCH = "async/logprob_mismatch"
"""Mean |log pi_learner - log pi_rollout| per pixel on fresh images (the same weights on both sides)."""
STALE = "batch/stale"
"""Images dropped because their sampling version lagged by more than ``rollout.max_staleness``."""
BATCH_IMAGES = "batch/images"
"""Images trained on."""
BATCH_INVALID = "batch/invalid"
"""Images dropped for an invalid reward (or a crop id the learner does not derive)."""
SKIPPED_LEARNED = "batch/skipped_learned"
"""Images dropped for a learned reward under ``reward.skip_learned``."""
RETRIES = "fault/retries"
"""Shards resubmitted after an actor failure."""

VAL_DICE = "val/dice"
VAL_RECALL = "val/recall"
VAL_PRECISION = "val/precision"
VAL_CLDICE = "val/cldice"
VAL_BEST_THRESHOLD = "val/best_threshold"
VAL_BEST_THRESHOLD_DICE = "val/best_threshold_dice"
VAL_BEST_THRESHOLD_CLDICE = "val/best_threshold_cldice"
VAL_LEARNED_SCORE = "val/learned_score"
"""With ``reward.reward_net``: the learned reward of the greedy validation masks (the reward-gap monitor)."""
VAL_REWARD_GAP = "val/reward_gap"
"""Mean learned score - GT Dice over the validation images: reward hacking shows up here first."""
VAL_REWARD_GAP_ABS = "val/reward_gap_abs"

TIME_ITERATION = "time/iteration_s"
TIME_ROLLOUT = "time/rollout_s"
TIME_ROLLOUT_WAIT = "time/rollout_wait_s"
"""The part of TIME_ROLLOUT the learner waited for (the rest overlapped the previous update)."""
TIME_SAMPLE = "time/sample_s"
TIME_REWARD = "time/reward_s"
TIME_UPDATE = "time/update_s"
TIME_SYNC = "time/sync_s"
TIME_VALIDATE = "time/validate_s"
TIME_STARTUP = "time/startup_s"
"""First row of a run (or of a resumed segment): seconds from the driver's start to the first iteration's
start (Ray, actors loading models and data, Train's workers, resuming a checkpoint)."""
SYNC_BYTES = "sync/bytes"

POSTPROCESS_THRESHOLD_MEAN = "policy/threshold_mean"
"""RLlib post-processing experiment (raysys/rllib/postprocess.py): the mean and spread of the chosen
threshold, closing radius and minimum component size."""
POSTPROCESS_THRESHOLD_STD = "policy/threshold_std"
POSTPROCESS_CLOSING_RADIUS_MEAN = "policy/closing_radius_mean"
POSTPROCESS_MIN_SIZE_MEAN = "policy/min_size_mean"
PROMPT_GREEDY_ENTROPY = "policy/greedy_entropy"
"""RLlib prompt experiment (raysys/rllib/prompt.py): entropy of the mean prompt choice."""

OBJECTIVE = "tune/objective"
"""Reported every iteration when sweeping: ``tune.metric`` evaluated on the latest validation metrics."""
ITERATIONS_DONE = "tune/iterations"
"""Reported with OBJECTIVE: iterations finished, the time axis of ASHA and PBT."""

SUMMARY = (REWARD_MEAN, VAL_DICE, VAL_RECALL, VAL_PRECISION, VAL_CLDICE)
"""What the end-of-run summaries show."""


def val(metric: str) -> str:
    """``val/<metric>``: an evaluation metric (``envs.metrics``, e.g. ``dice``) on the validation split."""
    return f"val/{metric}"


VAL_DICE_AT_PREFIX = val("dice@")
"""What every ``val/dice@T`` name starts with."""
VAL_METRICS = (
    *(val(k) for k in SEGMENTATION_METRICS),
    VAL_BEST_THRESHOLD_DICE, VAL_BEST_THRESHOLD_CLDICE, VAL_LEARNED_SCORE, VAL_REWARD_GAP, VAL_REWARD_GAP_ABS,
)  # fmt: skip
"""Every metric validation reports (``raysys.validation``) besides ``val/dice@T``: ``eval.select_metric`` and
``tune.metric`` must name one of them, so a typo stops at once."""


def val_dice_at(threshold: float) -> str:
    """``val/dice@T``: validation Dice at threshold T of the sweep (``eval.thresholds``)."""
    return f"val/dice@{threshold:g}"


def reward_component(name: str) -> str:
    """The metric of reward component ``name``: ``reward/<name>``, except the raw GT Dice (GT_DICE) and the
    learned score (REWARD_NET_SCORE)."""
    return {"dice_raw": GT_DICE, "learned_score": REWARD_NET_SCORE}.get(name, f"reward/{name}")


def policy_stat(name: str) -> str:
    """``policy/<name>``: a statistic a policy loss returns (``policies.losses``: clipfrac, approx_kl, ...)."""
    return f"policy/{name}"


def prompt_action_share(action: int) -> str:
    """RLlib prompt experiment: share of images whose greedy prompt is ``action``."""
    return f"policy/action_{action}_share"


def prompt_action_prob(action: int) -> str:
    """RLlib prompt experiment: mean probability of prompt ``action``."""
    return f"policy/action_{action}_prob"
