"""What the stage modules share, so no stage imports another: loading the starting policy and the stage's data,
the held-out preference log-probs and measures, and `run_trainer`, the course (`pipeline.course`) for a
transformers/TRL trainer:

    measure the starting model -> build the trainer -> train (resuming) -> measure the trained model -> save -> result

Called by stage modules at run time; nothing runs at import.
"""
from __future__ import annotations

from typing import Any, Callable

from pipeline import chat_templates, models, parallel, training
from pipeline.course import Measure, run_course
from pipeline.data import LoadedData, length_grouped_order, load_data, row_tokens, too_long_for
from pipeline.errors import DataError, PipelineError
from pipeline.eval import measures
from pipeline.stage import StageContext, StageResult


def load_policy(ctx: StageContext, key: str = "model"):
    """The stage's starting causal LM (adapters merged; with `lora.quantize`, loaded in 4 or 8 bits and prepared
    for training an adapter on it), its tokenizer and its path (the card's base model)."""
    cfg = ctx.config
    section = getattr(cfg, key)
    path = ctx.resolve(section.path)
    tokenizer = models.load_tokenizer(ctx.resolve(getattr(cfg, "tokenizer", None)) or path,
                                      trust_remote_code=section.trust_remote_code, gguf_file=section.gguf_file)
    chat_templates.apply(tokenizer, getattr(cfg, "chat_template", None), f"stages.{ctx.name}.chat_template",
                         tools=bool(getattr(cfg, "tools", None)))
    if not tokenizer.chat_template:
        raise PipelineError(f"the tokenizer at {path} has no chat template", key=f"stages.{ctx.name}.{key}",
                            fix="train it with the `tokenizer` stage, or use an instruct model's tokenizer")
    lora = getattr(cfg, "lora", None)
    quantize = lora.quantize if lora is not None else None
    model = models.load_causal_lm(path, section, tp_size=parallel.tensor_parallel_size(ctx), quantize=quantize)
    if quantize:
        model = models.prepare_quantized(model, cfg.train.gradient_checkpointing)
    if lora is not None:
        models.check_lora_targets(model, lora)
    return model, tokenizer, path


def load_stage_data(ctx: StageContext, **options: Any) -> LoadedData:
    """The stage's `data:` rows in the shape its kind reads (`registry.StageKind.data_shape`), drawn by its seed;
    `options`: `pipeline.data.load_data`'s others (too_long, text_fields). A stage reading chat rows says which
    format its file was read in (`data: alpaca`) under its header."""
    shape = ctx.traits.data_shape
    loaded = load_data(ctx.config.data, shape, seed=ctx.seed, reader=f"a {ctx.config.kind} stage", **options)
    if shape != "text":
        ctx.console.say(f"  data: {loaded.format}")
    return loaded


def preference_logprobs(model, tokenizer, dataset) -> tuple[list[float], list[float]]:
    """Summed log-probs of each held-out pair's chosen and of its rejected completion."""
    chosen = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["chosen"])
    rejected = measures.completion_logprobs(model, tokenizer, dataset["prompt"], dataset["rejected"])
    return chosen, rejected


def preference_measures(tokenizer, dataset, beta: float) -> Measure:
    """The held-out measures of the stages that train on preference pairs (dpo, ipo, cpo, simpo, orpo). Before: the
    chosen-over-rejected log-prob margin and preference accuracy, keeping the log-probs as the starting model's.
    After: the same, and the implicit reward (policy minus starting-model log-prob: DPO's and IPO's reference, the
    reference-free methods' starting point) accuracy and margin (times `beta`)."""
    reference: dict[str, list[float]] = {}

    def measure(model, phase: str) -> dict:
        chosen, rejected = preference_logprobs(model, tokenizer, dataset)
        result = measures.pairwise_accuracy(chosen, rejected)
        metrics = {f"eval_margin_{phase}": result["margin"], f"eval_preference_accuracy_{phase}": result["accuracy"]}
        if phase == "before":
            reference.update(chosen=chosen, rejected=rejected)
            return metrics
        implicit = measures.pairwise_accuracy([c - r for c, r in zip(chosen, reference["chosen"])],
                                              [c - r for c, r in zip(rejected, reference["rejected"])])
        return {**metrics, "eval_reward_accuracy": implicit["accuracy"],
                "eval_reward_margin": beta * implicit["margin"]}

    return measure


def length_grouped(ctx: StageContext, dataset, count: Callable[[dict], int]):
    """The training rows in length-grouped batch order (`count(row)`: a row's tokens) when the stage's
    `train.group_by_length` is on (the trainer then reads them in order), else unchanged; then the first
    `data.skip_rows` of that order left out."""
    section, skip = ctx.config.train, ctx.config.data.skip_rows or 0
    if not section.group_by_length and not skip:
        return dataset
    order = list(range(len(dataset)))
    if section.group_by_length:
        order = length_grouped_order([count(row) for row in dataset], section.batch_size, ctx.seed)
    if skip >= len(order):
        raise DataError(f"`skip_rows: {skip}` leaves none of the {len(order)} training rows", file=ctx.config.data.path,
                        key=f"stages.{ctx.name}.data.skip_rows", fix="lower `skip_rows` (or raise `max_rows`)")
    return dataset.select(order[skip:])


def tags(ctx: StageContext, *names: str) -> list[str]:
    """The card's tags: the stage's own, then 'lora' when it trains an adapter."""
    return [*names] + (["lora"] if getattr(ctx.config, "lora", None) else [])


def run_trainer(ctx: StageContext, *, tokenizer, model, make_trainer: Callable[[], Any], loaded: LoadedData,
                metrics: dict[str, Any], measure: Measure | None = None, merge_lora: bool | None = None,
                before_save: Callable[[Any], None] | None = None, **result: Any) -> StageResult:
    """The course (`pipeline.course.run_course`) for a transformers/TRL trainer: measure `model` with
    `measure(model, "before")`, build the trainer with `make_trainer()`, train it (resuming from the stage's last
    checkpoint), measure `trainer.model` with `measure(..., "after")`, save it into the artifact folder and return
    the StageResult (`result`: its other fields, e.g. base_model, tags, pipeline_tag). `measure` is None when there
    are no held-out rows; `before_save(trainer)` runs just before saving."""
    loop = training.TrainerLoop(ctx, model, make_trainer, merge_lora=merge_lora, before_save=before_save)
    return run_course(ctx, loop, tokenizer=tokenizer, loaded=loaded, metrics=metrics, measure=measure, **result)


def run_preference_trainer(ctx: StageContext, trainer_cls, config_cls, *, card_tags: list[str],
                           **config_fields: Any) -> StageResult:
    """The course for a trainer on chosen/rejected pairs (DPO, IPO, CPO, SimPO, ORPO): the starting policy, the
    stage's pairs in length-grouped order when asked, `config_cls` from the `train:` section plus `max_length`, `beta`
    and `config_fields` (the method's loss settings), and `preference_measures` on the held-out pairs."""
    cfg = ctx.config
    model, tokenizer, base = load_policy(ctx)
    loaded = load_stage_data(ctx, too_long=too_long_for(tokenizer, cfg.train.max_length))
    args = config_cls(**training.trainer_kwargs(ctx, cfg.train), max_length=cfg.train.max_length, beta=cfg.beta,
                      **config_fields)
    peft_config = models.lora_config(cfg.lora) if cfg.lora else None
    pairs = length_grouped(ctx, loaded.train, row_tokens(tokenizer))
    return run_trainer(
        ctx, tokenizer=tokenizer, model=model, loaded=loaded, metrics={"train_pairs": len(loaded.train)},
        measure=preference_measures(tokenizer, loaded.eval, cfg.beta) if loaded.eval is not None else None,
        make_trainer=lambda: trainer_cls(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                         peft_config=peft_config),
        base_model=base, tags=tags(ctx, *card_tags))
