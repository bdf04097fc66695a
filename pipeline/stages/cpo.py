"""`cpo` and `simpo` stages: reference-free preference optimisation with TRL's CPOTrainer (`trl.experimental.cpo`).
`cpo` is contrastive preference optimisation: a preference loss on the policy's own log-probs (`loss_type`: sigmoid,
hinge or ipo) plus a behaviour-cloning term on the chosen answers weighted by `cpo_alpha`. `simpo` is SimPO, the
same trainer with `loss_type="simpo"` and `cpo_alpha=0`: the length-normalised log-prob margin must beat a target
margin `simpo_gamma`. No reference model is kept. Metrics (`common.preference_measures`, as `dpo`): on held-out
pairs the chosen-over-rejected log-prob margin and preference accuracy before and after, and the implicit-reward
accuracy against the starting model.

Launched by `python -m pipeline run recipe.yaml` for a recipe's `cpo` and `simpo` stages. Nothing runs at import.
"""
from __future__ import annotations

from typing import Any

from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import run_preference_trainer


def loss_settings(cfg) -> dict[str, Any]:
    """CPOConfig's loss fields for a `cpo` or a `simpo` stage."""
    if cfg.kind == "simpo":
        return {"loss_type": "simpo", "simpo_gamma": cfg.simpo_gamma, "cpo_alpha": cfg.cpo_alpha}
    return {"loss_type": cfg.loss_type, "cpo_alpha": cfg.cpo_alpha}


def run(ctx: StageContext) -> StageResult:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    return run_preference_trainer(ctx, CPOTrainer, CPOConfig, card_tags=[ctx.config.kind], **loss_settings(ctx.config))
