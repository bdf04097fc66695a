"""`sft` stage: supervised fine-tuning, full or LoRA (peft), on chat `messages`, prompt/completion data or whole
conversations in `chosen` (HH-RLHF), with the loss on completions only: each conversation's last assistant turn, or
every assistant turn under `data.train_on: all_turns` (one prompt/completion row per turn; see pipeline.data). Thin
glue over TRL's SFTTrainer. Metrics: held-out completion loss before and after, and exact match on held-out answers
when the eval data's last turn holds a checkable answer.
"""
from __future__ import annotations

import json

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import answers, measures
from pipeline.rl import tools
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import length_grouped, load_policy, load_stage_data, run_trainer, tags


def completion_loss(model, tokenizer, dataset) -> float:
    """Mean per-token NLL of the held-out completions."""
    if dataset is None or len(dataset) == 0:
        return float("nan")
    logps = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["completion"])
    tokens = [len(tokenizer(measures.render(tokenizer, p, c)[1], add_special_tokens=False)["input_ids"])
              for p, c in zip(dataset["prompt"], dataset["completion"])]
    return -sum(logps) / max(sum(tokens), 1)


def held_out_accuracy(model, tokenizer, dataset, max_new_tokens: int = 16) -> float | None:
    """Exact match of greedy answers vs the reference completion's number, when there is one."""
    if dataset is None or len(dataset) == 0:
        return None
    references = answers.reference_answers(dataset["completion"])
    if references is None:
        return None
    predictions = measures.generate(model, tokenizer, dataset["prompt"], max_new_tokens=max_new_tokens)
    return answers.exact_match(predictions, references)


def packing_strategy(model) -> str:
    """Best-fit packing is padding-free, which only FlashAttention runs efficiently (one varlen sequence per batch);
    with SDPA/eager attention it attends over the whole flattened batch, so pack by wrapping rows instead."""
    return "bfd" if "flash" in str(getattr(model.config, "_attn_implementation", "")) else "wrapped"


def use_packing(setting: bool | None, model) -> bool:
    """`train.packing` when the recipe sets it; unset, pack only where packing is padding-free (FlashAttention),
    since wrapped packing cuts conversations at row boundaries."""
    return setting if setting is not None else packing_strategy(model) == "bfd"


def held_out_measures(tokenizer, dataset):
    """Completion loss before and after; exact match of greedy answers after, when the answers are checkable."""
    def measure(model, phase: str) -> dict:
        metrics = {f"eval_loss_{phase}": completion_loss(model, tokenizer, dataset)}
        accuracy = held_out_accuracy(model, tokenizer, dataset) if phase == "after" else None
        return metrics if accuracy is None else {**metrics, "eval_exact_match": accuracy}

    return measure


def run(ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    shown = tools.schemas(cfg.tools) if cfg.tools else None  # the tools' JSON schemas every prompt shows
    loaded = load_stage_data(ctx, too_long=data_lib.too_long_for(tokenizer, cfg.train.max_length, shown))
    args = SFTConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length,
                     packing=use_packing(cfg.train.packing, model), packing_strategy=packing_strategy(model),
                     completion_only_loss=cfg.completion_only_loss, eos_token=tokenizer.eos_token)
    peft_config = models.lora_config(cfg.lora) if cfg.lora else None
    rows = length_grouped(ctx, loaded.train, data_lib.row_tokens(tokenizer))
    if shown:  # TRL renders each row's `tools` column (JSON text) into its prompt, as a grpo stage with them does
        rows = rows.add_column("tools", [json.dumps(shown)] * len(rows))
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_rows": len(loaded.train)},
        measure=held_out_measures(tokenizer, loaded.eval) if loaded.eval is not None else None,
        make_trainer=lambda: SFTTrainer(model=model, args=args, train_dataset=rows,
                                        processing_class=tokenizer, peft_config=peft_config),
        base_model=base, tags=tags(ctx, "sft"))
