"""`rloo` stage: REINFORCE leave-one-out with TRL's RLOOTrainer (each completion's baseline is the mean reward of
the other completions of its prompt). Rewards come from the `reward` stage's model (`reward_model: ${reward}`)
and/or rule rewards on the data (`rewards:`); metrics are the held-out mean reward and exact match before and
after. Launched by `python -m pipeline run recipe.yaml` when the recipe has an `rloo` stage; the shared glue lives
in `pipeline.stages.online_rl`.
"""
from __future__ import annotations

from pipeline.stage import StageContext, StageResult
from pipeline.stages.online_rl import run_online


def run(ctx: StageContext) -> StageResult:
    from trl import RLOOConfig, RLOOTrainer

    return run_online(ctx, RLOOTrainer, RLOOConfig, tag="rloo")
