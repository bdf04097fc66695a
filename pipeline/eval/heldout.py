"""Held-out data and models for evaluation: which rows an artifact is measured on (its stage's eval file, or a file
given with `--data`), in which shape, and the artifact loaded as a policy or as a judge (reward model).

Used by the metric modules in `pipeline.eval.metrics` and by `pipeline.eval.evals`; nothing runs at import.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline import artifacts, models, schema
from pipeline import data as data_lib
from pipeline.errors import DataError, PipelineError
from pipeline.eval import answers


def artifact_kind(path: str | Path) -> str:
    """'reward-model' or 'causal-lm', from the manifest or else from config.json's architectures."""
    artifact = artifacts.open_artifact(path)
    if artifact is not None and artifact.manifest.get("produces"):
        return artifact.produces
    config = Path(path) / "config.json"
    if config.exists():
        archs = json.loads(config.read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return schema.REWARD_MODEL
    return schema.CAUSAL_LM


def policy_from(path: str):
    """(causal LM with any adapter merged, tokenizer) from an artifact folder."""
    return models.load_causal_lm(path, schema.ModelSection(path=path)), models.load_tokenizer(path)


def judge_from(path: str):
    """(reward model, tokenizer) from an artifact folder."""
    return models.load_reward_model(path), models.load_tokenizer(path)


def default_data(path: str | Path) -> schema.DataSection | None:
    """The held-out data the artifact's stage used: its `data` section's eval file (else its file), with its field
    mapping, format and `max_eval_rows`; None when the manifest names no data."""
    artifact = artifacts.open_artifact(path)
    data = (artifact.manifest.get("config") or {}).get("data") if artifact else None
    if not isinstance(data, dict) or not data.get("path"):
        return None
    section = schema.DataSection(**data)
    if data_lib.holding_out(section):  # rows held out of the stage's own file: the ones its seed drew
        held = artifact.manifest.get("held_out") or {}
        return section.seeded(int(held.get("seed", artifact.manifest.get("seed") or 0)))
    return schema.DataSection(path=data.get("eval_path") or data["path"], fields=data.get("fields") or {},
                              max_rows=data.get("max_eval_rows") if data.get("eval_path") else None,
                              on_bad_rows=section.on_bad_rows, format=section.format)


def read_eval_rows(section: schema.DataSection, shape: str, limit: int | None = None):
    """The held-out rows of `section` in `shape`, at most `limit`: its eval file or split, or the rows its
    `eval_rows`/`eval_fraction` hold out of `path` (drawn by `section.hold_out_seed`), else the rows of `path`."""
    if data_lib.holding_out(section):
        rows = data_lib.load_data(section.model_copy(update={"max_rows": None}), shape,
                                  seed=section.hold_out_seed).eval
        if rows is None:
            raise DataError("none of the held-out rows is usable", file=section.path, key="data.eval_rows",
                            fix="hold out more rows (`eval_rows`, `eval_fraction`)")
        count = min(len(rows), limit or section.max_eval_rows or len(rows))
        return rows.select(range(count))
    path = section.eval_path or section.path
    rows = limit or section.max_eval_rows or section.max_rows
    single = section.model_copy(update={"path": path, "eval_path": None, "eval_split": None, "eval_fraction": None,
                                        "eval_rows": None, "max_rows": rows,
                                        "split": section.eval_split or section.split})
    return data_lib.load_data(single, shape).train


def try_shapes(section: schema.DataSection, shapes: tuple[str, ...], limit: int | None):
    """(shape, rows) for the first shape the data fits."""
    for shape in shapes:
        try:
            return shape, read_eval_rows(section, shape, limit)
        except DataError:
            continue
    raise PipelineError(f"{section.path} fits none of the shapes {', '.join(shapes)}", key="data",
                        fix="use text, messages/prompt-completion, preference or prompt/answer rows")


def source_name(section: schema.DataSection) -> str:
    return section.eval_path or section.path


def conversations(section: schema.DataSection, limit: int | None = None, shapes=("sft", "preference")):
    """(prompts, reference completions) from chat rows, or from preference rows (the chosen answers)."""
    shape, rows = try_shapes(section, shapes, limit)
    if shape == "preference":
        return rows["prompt"], rows["chosen"]
    if shape == "sft":
        return rows["prompt"], rows["completion"]
    return rows, None


def answers_of(section: schema.DataSection, limit: int | None = None):
    """(prompts, answers) when the data has checkable answers (`answer` field, or a number ending each
    reference completion / chosen answer), else None."""
    prompts, completions = conversations(section, limit, ("sft", "preference", "prompts"))
    if completions is None:
        rows = prompts
        prompts, references = rows["prompt"], rows["answer"]
    else:
        references = answers.reference_answers(completions)
    if references is None or any(a is None for a in references):
        return None
    return prompts, references

