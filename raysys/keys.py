"""Metric names: what metrics.jsonl, TensorBoard, Ray reports and the report page call each number. Code
that writes or reads a metric uses these names, so a renamed metric cannot silently drop out of a reader.

Groups: ``rollout/`` (sampled masks and their rewards), ``reward/`` (reward components), ``loss/`` and
``policy/`` (the update), ``val/`` (validation at eval.threshold, plus ``val/dice@T`` per threshold),
``time/`` (seconds per stage), ``sync/``, ``batch/`` and ``update/`` (counts), ``tune/`` (sweeps).
"""

REWARD_MEAN = "rollout/reward_mean"
REWARD_STD = "rollout/reward_std"
EP_REW_MEAN = "rollout/ep_rew_mean"
"""The mean episode return under RLlib's name (= REWARD_MEAN for mask RL), so dashboards compare both."""
LEARNED_FRACTION = "rollout/learned_fraction"
GREEDY_REWARD_MEAN = "rollout/greedy_reward_mean"
"""Reward of the greedy mask (``eval.threshold``), the deployed one; with ``learner.advantage=self_critical``."""
GREEDY_DICE = "rollout/greedy_dice"

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

VAL_DICE = "val/dice"
VAL_RECALL = "val/recall"
VAL_PRECISION = "val/precision"
VAL_CLDICE = "val/cldice"
VAL_BEST_THRESHOLD = "val/best_threshold"

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

OBJECTIVE = "tune/objective"
"""Reported every iteration when sweeping: ``tune.metric`` evaluated on the latest validation metrics."""
ITERATIONS_DONE = "tune/iterations"
"""Reported with OBJECTIVE: iterations finished, the time axis of ASHA and PBT."""

SUMMARY = (REWARD_MEAN, VAL_DICE, VAL_RECALL, VAL_PRECISION, VAL_CLDICE)
"""What the end-of-run summaries show."""
