"""`reward` stage: a sequence-classification reward model trained on chosen/rejected pairs with TRL's
RewardTrainer (Bradley-Terry loss). Reports held-out pairwise accuracy before and after training. Saved with full
weights (a LoRA adapter is merged) so PPO, GRPO, RLOO and evaluation load it with AutoModelForSequenceClassification.
"""
from __future__ import annotations

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import length_grouped, load_stage_data, run_trainer


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


def pair_tokens(row: dict) -> int:
    """A tokenised pair's length: its longer side (the trainer pads both sides of a batch to the longest)."""
    return max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def held_out_measures(tokenizer, dataset):
    """Pairwise accuracy and margin of the reward model on the held-out pairs (after: plain names, and the count)."""
    def measure(model, phase: str) -> dict:
        result = pairwise(model, tokenizer, dataset)
        if phase == "before":
            return {"eval_accuracy_before": result["accuracy"], "eval_margin_before": result["margin"]}
        return {"eval_accuracy": result["accuracy"], "eval_margin": result["margin"], "eval_pairs": len(dataset)}

    return measure


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
    loaded = load_stage_data(ctx, too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length))
    args = RewardConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length,
                        center_rewards_coefficient=cfg.center_rewards_coefficient)
    peft_config = models.lora_config(cfg.lora, task_type="SEQ_CLS") if cfg.lora else None
    pairs = length_grouped(ctx, tokenized_pairs(loaded.train, tokenizer, cfg.train.max_length), pair_tokens)
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_pairs": len(loaded.train)},
        measure=held_out_measures(tokenizer, loaded.eval) if loaded.eval is not None else None,
        make_trainer=lambda: RewardTrainer(model=model, args=args, processing_class=tokenizer,
                                           train_dataset=pairs,
                                           peft_config=peft_config),
        merge_lora=True, base_model=path, library_name="transformers", pipeline_tag="text-classification",
        tags=["reward-model"])
