"""`reward` stage: a sequence-classification reward model trained on chosen/rejected pairs with TRL's
RewardTrainer (Bradley-Terry loss). Reports held-out pairwise accuracy before and after training. Saved with full
weights (a LoRA adapter is merged) so PPO, GRPO, RLOO and evaluation load it with AutoModelForSequenceClassification.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult


def pairwise(model, tokenizer, dataset) -> dict[str, float]:
    chosen = measures.reward_scores(model, tokenizer, dataset["prompt"], dataset["chosen"])
    rejected = measures.reward_scores(model, tokenizer, dataset["prompt"], dataset["rejected"])
    return measures.pairwise_accuracy(chosen, rejected)


def tokenized_pairs(dataset, tokenizer, max_length: int):
    """`chosen_ids` / `rejected_ids` of each pair rendered by `measures.reward_text`, the text the reward model is
    scored on everywhere else (TRL's RewardTrainer takes pre-tokenised pairs as they are)."""
    def encode(row):
        return {side: tokenizer(measures.reward_text(tokenizer, row["prompt"], row[name]),
                                add_special_tokens=False)["input_ids"][:max_length]
                for side, name in (("chosen_ids", "chosen"), ("rejected_ids", "rejected"))}

    return dataset.map(encode, remove_columns=dataset.column_names)


def run(ctx: StageContext) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    cfg = ctx.config
    path = ctx.resolve(cfg.model.path)
    tokenizer = models.load_tokenizer(ctx.resolve(cfg.tokenizer) or path,
                                      trust_remote_code=cfg.model.trust_remote_code, gguf_file=cfg.model.gguf_file)
    model = models.load_reward_model(path, cfg.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora is not None:
        models.check_lora_targets(model, cfg.lora)
    loaded = data_lib.load_data(cfg.data, "preference", seed=ctx.seed,
                                too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length))
    args = RewardConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length,
                        center_rewards_coefficient=cfg.center_rewards_coefficient)
    metrics: dict = {"train_pairs": len(loaded.train)}
    if loaded.eval is not None:
        before = pairwise(model, tokenizer, loaded.eval)
        metrics.update(eval_accuracy_before=before["accuracy"], eval_margin_before=before["margin"])
    peft_config = models.lora_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora else None
    trainer = RewardTrainer(model=model, args=args, processing_class=tokenizer,
                            train_dataset=tokenized_pairs(loaded.train, tokenizer, cfg.train.max_length),
                            peft_config=peft_config)
    output = training.train(trainer, ctx)
    metrics["train_loss"] = output.training_loss
    if loaded.eval is not None:
        after = pairwise(trainer.model, tokenizer, loaded.eval)
        metrics.update(eval_accuracy=after["accuracy"], eval_margin=after["margin"], eval_pairs=len(loaded.eval))
    models.save_trained(ctx, trainer, tokenizer, merge_lora=True)
    return StageResult(metrics=metrics, base_model=path, datasets=loaded.sources, held_out=loaded.held_out,
                       pipeline_tag="text-classification", log_history=training.log_history(trainer),
                       tags=["reward-model"])
