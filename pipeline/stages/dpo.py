"""`dpo` and `ipo` stages: direct preference optimisation with TRL's DPOTrainer (`ipo`: the same trainer with IPO's
loss, `loss_type="ipo"`). The reference model is the input model (TRL keeps a frozen copy), or with LoRA the same
base with the adapter disabled (one copy of the weights). Metrics (`common.preference_measures`): on held-out pairs,
the policy's chosen-over-rejected log-prob margin and preference accuracy, before and after, plus the
implicit-reward accuracy against the reference.

Launched by `python -m pipeline run recipe.yaml` for a recipe's `dpo` and `ipo` stages. Nothing runs at import.
"""
from __future__ import annotations

from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import run_preference_trainer


def run(ctx: StageContext) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.config
    return run_preference_trainer(ctx, DPOTrainer, DPOConfig, card_tags=list(dict.fromkeys((cfg.kind, "dpo"))),
                                  loss_type=[cfg.loss_type], precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                                  padding_free=False)
