"""`kto` stage: Kahneman-Tversky optimisation with TRL's KTOTrainer, on unpaired data (prompt, completion, label:
desirable or not) or on paired preference data (prompt/chosen/rejected, split by TRL's `unpair_preference_dataset`
into one desirable and one undesirable row per pair). The reference model is the input model (or the base under
LoRA). Metrics: on held-out pairs the chosen-over-rejected log-prob margin and accuracy before and after (as in
`dpo`); on held-out unpaired rows the mean log-prob of desirable minus undesirable completions.

Launched by `python -m pipeline run recipe.yaml` when the recipe has a `kto` stage. Nothing runs at import.
"""
from __future__ import annotations

from typing import Callable

from pipeline import data as data_lib
from pipeline import models, training
from pipeline.eval import measures
from pipeline.errors import DataError
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_policy, preference_logprobs, run_trainer, tags


def is_unpaired(section, path: str, split: str) -> bool:
    """True when the file's first row has a `label` field (unpaired KTO data) rather than chosen/rejected."""
    rows = data_lib.read_rows(path, section, split, data_lib.BadRows())
    first = rows[0][1] if rows else {}
    return isinstance(first, dict) and section.fields.get("label", "label") in first


def unpaired_row(row, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    """(prompt, completion) messages and a bool label, or (None, reason)."""
    item, reason = data_lib.normalise_row(row, "sft", fields)
    if item is None:
        return None, reason
    label = row.get(fields.get("label", "label"))
    if not isinstance(label, bool):
        return None, "wrong type in 'label' (need true/false)"
    return {**item, "label": label}, None


def read_unpaired(section, path: str, split: str, limit: int | None, key: str,
                  keep: Callable[[int], bool] | None = None) -> list[dict]:
    """The usable unpaired rows of one file or split whose row numbers `keep` accepts (all by default)."""
    bad = data_lib.BadRows()
    out = []
    for number, row in data_lib.read_rows(path, section, split, bad):
        if keep is not None and not keep(number):
            continue
        item, reason = unpaired_row(row, section.fields)
        if item is None:
            bad.add(reason, number)
            continue
        out.append(item)
        if limit and len(out) >= limit:
            break
    if bad.count and section.on_bad_rows == "error":
        raise DataError(f"{bad.count} bad rows: {bad.summary()}", file=path, key=key,
                        fix="fix the rows, or set `on_bad_rows: skip` in the data section")
    if not out:
        raise DataError("no usable rows", file=path, key=key, fix="check the file and the `fields:` mapping")
    return out


def held_out_unpaired(section, seed: int) -> data_lib.LoadedData:
    """Unpaired rows of `path` split by `eval_rows`/`eval_fraction`: the same rows `data.load_data` holds out."""
    from datasets import Dataset

    rows = data_lib.read_rows(section.path, section, section.split, data_lib.BadRows())
    held = data_lib.held_out_rows(rows, section, seed)
    train = read_unpaired(section, section.path, section.split, section.max_rows, "data.path",
                          lambda number: number not in held)
    evalset = read_unpaired(section, section.path, section.split, section.max_eval_rows, "data.path",
                            held.__contains__)
    record = data_lib.held_out_record(section, seed, held, len(train), len(evalset))
    return data_lib.LoadedData(train=Dataset.from_list(train), eval=Dataset.from_list(evalset),
                               sources=[section.path], held_out=record)


def load_unpaired(section, seed: int) -> data_lib.LoadedData:
    """Unpaired (prompt, completion, label) rows, with the data section's eval split or held-out rows, limits and
    sources."""
    from datasets import Dataset

    if data_lib.holding_out(section):
        return held_out_unpaired(section, seed)
    train = Dataset.from_list(read_unpaired(section, section.path, section.split, section.max_rows, "data.path"))
    evalset, sources = None, [section.path]
    if section.eval_path or section.eval_split:
        path = section.eval_path or section.path
        evalset = Dataset.from_list(read_unpaired(section, path, section.eval_split or section.split,
                                                  section.max_eval_rows, "data.eval_path"))
        sources += [path] if path not in sources else []
    return data_lib.LoadedData(train=train, eval=evalset, sources=sources)


def load_kto_data(section, seed: int, paired_shape: str) -> data_lib.LoadedData:
    """Training rows unpaired for KTOTrainer; held-out rows kept as they are (pairs stay pairs for the margin).
    Paired rows are read in `paired_shape`, the kind's data shape."""
    from trl.data_utils import unpair_preference_dataset

    if is_unpaired(section, section.path, section.split):
        return load_unpaired(section, seed)
    loaded = data_lib.load_data(section, paired_shape, seed=seed)
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
    loaded = load_kto_data(cfg.data, ctx.seed, ctx.traits.data_shape)
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
