"""The small RLlib experiments (PPO on the new API stack over the single-step environments of
envs/environments.py): ``prompt`` (prompt selection per image) and ``postprocess`` (post-processing per
image); ``common`` holds what they share. Both select on the validation split (early stopping on the
validation reward) and report on the test split, per seed, against fixed baselines; metrics go to
metrics.jsonl / TensorBoard and a results JSON."""

from raysys.rllib.postprocess import run_postproc_rl
from raysys.rllib.prompt import run_prompt_rl

__all__ = ["run_postproc_rl", "run_prompt_rl"]
