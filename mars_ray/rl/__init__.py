"""The policy stage: alignment against the served reward model (`mars-ray align`), LLM-judged
win-rates (`mars-ray winrate`) and one policy per reward model judged pairwise (`mars-ray align-compare`,
:mod:`~mars_ray.rl.align_compare`).

May import everything below the commands (config, core, data, models, generation, runtime, serve).
Heavy imports (TRL, transformers, Ray) happen inside the functions.
"""

from mars_ray.rl.rewards import RewardTarget, ServedReward

__all__ = ["RewardTarget", "ServedReward"]
