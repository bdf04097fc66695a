"""`dpo` stage: direct preference optimisation with TRL's DPOTrainer. The reference model is the input model
(TRL keeps a frozen copy), or with LoRA the same base with the adapter disabled (one copy of the weights).
Metrics: on held-out pairs, the policy's chosen-over-rejected log-prob margin and preference accuracy, before and
after, plus the implicit-reward accuracy against the reference.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult
from pipeline.stages.sft import load_policy


def logprob_margin(model, tokenizer, dataset) -> tuple[list[float], list[float]]:
    chosen = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["chosen"])
    rejected = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["rejected"])
    return chosen, rejected


def run(ctx: StageContext) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    loaded = data_lib.load_data(cfg.data, "preference", seed=ctx.seed,
                                too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length))
    args = DPOConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length, beta=cfg.beta,
                     loss_type=[cfg.loss_type], precompute_ref_log_probs=cfg.precompute_ref_log_probs,
                     padding_free=False)
    metrics: dict = {"train_pairs": len(loaded.train)}
    ref_chosen = ref_rejected = None
    if loaded.eval is not None:
        ref_chosen, ref_rejected = logprob_margin(model, tokenizer, loaded.eval)
        before = measures.pairwise_accuracy(ref_chosen, ref_rejected)
        metrics.update(eval_margin_before=before["margin"], eval_preference_accuracy_before=before["accuracy"])
    peft_config = models.lora_config(cfg.lora) if cfg.lora else None
    trainer = DPOTrainer(model=model, args=args, train_dataset=loaded.train, processing_class=tokenizer,
                         peft_config=peft_config)
    output = training.train(trainer, ctx)
    metrics["train_loss"] = output.training_loss
    if loaded.eval is not None:
        chosen, rejected = logprob_margin(trainer.model, tokenizer, loaded.eval)
        after = measures.pairwise_accuracy(chosen, rejected)
        implicit = measures.pairwise_accuracy([c - r for c, r in zip(chosen, ref_chosen)],
                                             [c - r for c, r in zip(rejected, ref_rejected)])
        metrics.update(eval_margin_after=after["margin"], eval_preference_accuracy_after=after["accuracy"],
                       eval_reward_accuracy=implicit["accuracy"], eval_reward_margin=cfg.beta * implicit["margin"])
    library = models.save_trained(ctx, trainer, tokenizer)
    return StageResult(metrics=metrics, base_model=base, datasets=loaded.sources, held_out=loaded.held_out,
                       library_name=library, log_history=training.log_history(trainer),
                       tags=["dpo"] + (["lora"] if cfg.lora else []))
