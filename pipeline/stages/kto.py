"""`kto` stage: Kahneman-Tversky optimisation with TRL's KTOTrainer, on unpaired data (prompt, completion, label:
desirable or not) or on paired preference data (prompt/chosen/rejected in any preference format), which TRL's
`unpair_preference_dataset` splits into one desirable and one undesirable row per pair for training; held-out pairs
stay pairs. The rows are read like every stage's (`common.load_stage_data`, the `kto` shape of `pipeline.data`). The
reference model is the input model (or the base under LoRA). Metrics: on held-out pairs the chosen-over-rejected
log-prob margin and accuracy before and after (as in `dpo`); on held-out unpaired rows the mean log-prob of
desirable minus undesirable completions.

Launched by `python -m pipeline run recipe.yaml` when the recipe has a `kto` stage. Nothing runs at import.
"""
from __future__ import annotations

from pipeline import models, training
from pipeline.data import LoadedData
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_policy, load_stage_data, preference_logprobs, run_trainer, tags


def unpaired_for_training(loaded: LoadedData) -> LoadedData:
    """KTOTrainer's training rows: unpaired rows as read; pairs split into a desirable (chosen) and an undesirable
    (rejected) row each by TRL's `unpair_preference_dataset`. The held-out rows are left as they are."""
    from trl.data_utils import unpair_preference_dataset

    if "chosen" in loaded.train.column_names:
        loaded.train = unpair_preference_dataset(loaded.train)
    return loaded


def held_out_metrics(model, tokenizer, dataset, suffix: str) -> dict[str, float]:
    """Pairs: chosen-over-rejected log-prob margin and accuracy. Unpaired: desirable minus undesirable mean log-prob."""
    if "chosen" in dataset.column_names:
        result = measures.pairwise_accuracy(*preference_logprobs(model, tokenizer, dataset))
        return {f"eval_margin_{suffix}": result["margin"], f"eval_preference_accuracy_{suffix}": result["accuracy"]}
    logps = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["completion"])
    good = [lp for lp, label in zip(logps, dataset["label"]) if label]
    bad = [lp for lp, label in zip(logps, dataset["label"]) if not label]
    if not good or not bad:
        return {}
    return {f"eval_label_margin_{suffix}": sum(good) / len(good) - sum(bad) / len(bad)}


def run(ctx: StageContext) -> StageResult:
    from trl import KTOConfig, KTOTrainer

    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    loaded = unpaired_for_training(load_stage_data(ctx))
    args = KTOConfig(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length, beta=cfg.beta,
                     loss_type=cfg.loss_type, desirable_weight=cfg.desirable_weight,
                     undesirable_weight=cfg.undesirable_weight)
    labels = loaded.train["label"]
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded,
        metrics={"train_rows": len(labels), "train_desirable": sum(map(bool, labels))},
        measure=(lambda m, phase: held_out_metrics(m, tokenizer, loaded.eval, phase)) if loaded.eval is not None
        else None,
        make_trainer=lambda: KTOTrainer(model=model, args=args, train_dataset=loaded.train, processing_class=tokenizer,
                                        peft_config=models.lora_config(cfg.lora) if cfg.lora else None),
        base_model=base, tags=tags(ctx, "kto"))
