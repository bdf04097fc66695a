"""`orpo` stage: odds-ratio preference optimisation with TRL's ORPOTrainer (`trl.experimental.orpo`): the SFT loss on
the chosen answers plus `beta` (the paper's lambda) times a log odds-ratio loss of chosen over rejected, in one stage
with no reference model (it can start from a base model, without an SFT stage before it). Metrics
(`common.preference_measures`, as `dpo`): on held-out pairs the chosen-over-rejected log-prob margin and preference
accuracy before and after, and the implicit-reward accuracy against the starting model.

Launched by `python -m pipeline run recipe.yaml` for a recipe's `orpo` stages. Nothing runs at import.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import (length_grouped, load_policy, load_stage_data, preference_measures, run_trainer,
                                    tags)


def run(ctx: StageContext) -> StageResult:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    loaded = load_stage_data(ctx, too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length))
    args = ORPOConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length, beta=cfg.beta)
    peft_config = models.lora_config(cfg.lora) if cfg.lora else None
    pairs = length_grouped(ctx, loaded.train, data_lib.row_tokens(tokenizer))
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_pairs": len(loaded.train)},
        measure=preference_measures(tokenizer, loaded.eval, cfg.beta) if loaded.eval is not None else None,
        make_trainer=lambda: ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                         peft_config=peft_config),
        base_model=base, tags=tags(ctx, "orpo"))
