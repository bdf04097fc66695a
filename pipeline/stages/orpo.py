"""`orpo` stage: odds-ratio preference optimisation with TRL's ORPOTrainer (`trl.experimental.orpo`): the SFT loss on
the chosen answers plus `beta` (the paper's lambda) times a log odds-ratio loss of chosen over rejected, in one stage
with no reference model (it can start from a base model, without an SFT stage before it). Metrics
(`common.preference_measures`, as `dpo`): on held-out pairs the chosen-over-rejected log-prob margin and preference
accuracy before and after, and the implicit-reward accuracy against the starting model.

Launched by `python -m pipeline run recipe.yaml` for a recipe's `orpo` stages. Nothing runs at import.
"""
from __future__ import annotations

from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import run_preference_trainer


def run(ctx: StageContext) -> StageResult:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return run_preference_trainer(ctx, ORPOTrainer, ORPOConfig, card_tags=["orpo"])
