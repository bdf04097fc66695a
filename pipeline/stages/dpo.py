"""`dpo` and `ipo` stages: direct preference optimisation with TRL's DPOTrainer (`ipo`: the same trainer with IPO's
loss, `loss_type="ipo"`). The reference model is the input model (TRL keeps a frozen copy), or with LoRA the same
base with the adapter disabled (one copy of the weights). Metrics (`common.preference_measures`): on held-out pairs,
the policy's chosen-over-rejected log-prob margin and preference accuracy, before and after, plus the
implicit-reward accuracy against the reference.

Launched by `python -m pipeline run recipe.yaml` for a recipe's `dpo` and `ipo` stages. Nothing runs at import.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import (length_grouped, load_policy, load_stage_data, preference_measures, run_trainer,
                                    tags)


def run(ctx: StageContext) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    loaded = load_stage_data(ctx, too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length))
    args = DPOConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length, beta=cfg.beta,
                     loss_type=[cfg.loss_type], precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                     padding_free=False)
    peft_config = models.lora_config(cfg.lora) if cfg.lora else None
    pairs = length_grouped(ctx, loaded.train, data_lib.row_tokens(tokenizer))
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_pairs": len(loaded.train)},
        measure=preference_measures(tokenizer, loaded.eval, cfg.beta) if loaded.eval is not None else None,
        make_trainer=lambda: DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                        peft_config=peft_config),
        base_model=base, tags=tags(ctx, *dict.fromkeys((cfg.kind, "dpo"))))
