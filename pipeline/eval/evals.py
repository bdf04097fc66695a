"""Run evaluations on an artifact and record them: the `evals:` of an `evaluate` stage, or the flags of
`python -m pipeline eval` (`pipeline.commands.eval`). Each metric is a module of `pipeline.eval.metrics`; the
lm-eval harness is `pipeline.eval.harness`. Results go into the artifact's manifest (`evaluation`) and its model
card's Hub `model-index`. Nothing runs at import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import artifacts, schema
from pipeline.errors import PipelineError
from pipeline.eval import harness, heldout, metrics


@dataclass
class Result:
    """One number: which evaluation produced it, on which data."""

    eval: str  # perplexity | exact_match | pairwise_accuracy | win_rate | lm_eval
    key: str  # name in the manifest's `evaluation` dict
    value: float
    dataset: str
    judge: dict[str, Any] | None = None  # win_rate: the judge's path and whether the policy was trained against it


# ---------------------------------------------------------------------------------------------------- running


def default_evals(path: str, data: str | None = None) -> list[schema.EvalSection]:
    """perplexity (+ exact_match when the data has answers) for a causal LM; pairwise_accuracy for a reward model."""
    section = schema.DataSection(path=data) if data else heldout.default_data(path)
    if section is None:
        raise PipelineError(f"no held-out data known for {path}", key="--data", fix="pass --data FILE")
    if heldout.artifact_kind(path) == schema.REWARD_MODEL:
        return [schema.EvalSection(metric="pairwise_accuracy", data=section)]
    evals = [schema.EvalSection(metric="perplexity", data=section)]
    try:
        if heldout.answers_of(section) is not None:
            evals.append(schema.EvalSection(metric="exact_match", data=section))
    except PipelineError:
        pass
    return evals


def _data_for(spec: schema.EvalSection, path: str) -> schema.DataSection:
    section = spec.data or heldout.default_data(path)
    if section is None:
        raise PipelineError(f"`{spec.metric}` needs data and none is known for {path}", key="data",
                            fix="set `data:` on the eval (or --data FILE)")
    return section


def check(spec: schema.EvalSection) -> None:
    """Refuse an evaluation that lacks what it needs, before any model is loaded."""
    if spec.metric == "win_rate" and (not (spec.judge or spec.reward_model) or not spec.reference):
        raise PipelineError("win_rate needs a reward model and a reference policy", key="judge",
                            fix="set `judge:` (or `reward_model:`) and `reference:` (--reward-model, --reference)")
    if spec.metric == "lm_eval" and not spec.tasks:
        raise PipelineError("lm_eval needs tasks", key="tasks", fix="e.g. --tasks addition_loglik")


def run_one(path: str, spec: schema.EvalSection, loaded: dict[str, Any], batch_size: int = 16) -> list[Result]:
    """Run one evaluation on the artifact at `path`; `loaded` caches (model, tokenizer) between evaluations."""
    check(spec)
    metric = None if spec.metric == "lm_eval" else metrics.module(spec.metric)
    role = metric.ROLE if metric is not None else "policy"
    if role not in loaded:
        loaded[role] = heldout.judge_from(path) if role == "judge" else heldout.policy_from(path)
    model, tokenizer = loaded[role]
    if metric is None:
        values = harness.run_tasks(model, tokenizer, spec.tasks, spec.include_path, spec.limit, batch_size)
        return [Result("lm_eval", k, v, "lm-eval:" + k.split("/")[0]) for k, v in values.items()]
    section = _data_for(spec, path)
    values = metric.measure(model, tokenizer, section, spec, batch_size)
    keys = metric.keys(spec) if hasattr(metric, "keys") else metric.KEYS
    judge = metric.judge_record(path, spec) if hasattr(metric, "judge_record") else None
    return [Result(spec.metric, key, float(values[name]), heldout.source_name(section), judge)
            for name, key in keys.items()]


def evaluate_artifact(path: str, evals: list[schema.EvalSection], batch_size: int = 16) -> list[Result]:
    """All evaluations of one artifact, loading its model once."""
    for spec in evals:
        check(spec)
    loaded: dict[str, Any] = {}
    results: list[Result] = []
    for spec in evals:
        results += run_one(path, spec, loaded, batch_size)
    return results


# ----------------------------------------------------------------------------------------------------- writing


def record(path: str | Path, results: list[Result]) -> dict[str, Any]:
    """Merge results into the artifact's manifest (`evaluation`, `evaluation_datasets`, `evaluation_kinds`, and
    `evaluation_judges` for win rates) and its card's model-index."""
    folder = Path(path)
    judges = judges_of(results)
    manifest = artifacts.update_manifest(folder, evaluation={r.key: r.value for r in results},
                                         evaluation_datasets={r.key: r.dataset for r in results},
                                         evaluation_kinds={r.key: r.eval for r in results},
                                         **({"evaluation_judges": judges} if judges else {}))
    write_model_index(folder, manifest)
    return manifest


def judges_of(results: list[Result]) -> dict[str, dict[str, Any]]:
    """Result key -> its judge (path, and whether the policy was trained against it), for the results that have one."""
    return {r.key: r.judge for r in results if r.judge is not None}


def task_of(kind: str) -> tuple[str, str]:
    """(Hub task type, task name) of an evaluation kind: a metric's `TASK`, the harness's for lm_eval results."""
    if kind in metrics.METRICS:
        return metrics.module(kind).TASK
    return harness.TASK if kind == "lm_eval" else ("text-generation", kind)


def model_index(name: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Hub model-index from a manifest's accumulated evaluation: one result per (evaluation kind, dataset)."""
    values = manifest.get("evaluation") or {}
    datasets = manifest.get("evaluation_datasets") or {}
    kinds = manifest.get("evaluation_kinds") or {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key, value in values.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        kind, dataset = kinds.get(key, "lm_eval"), datasets.get(key, "unknown")
        groups.setdefault((kind, dataset), []).append({"type": key, "value": float(value), "name": key})
    results = [{"task": dict(zip(("type", "name"), task_of(kind))),
                "dataset": {"name": Path(dataset).stem if not dataset.startswith("lm-eval:") else dataset,
                            "type": dataset},
                "metrics": metrics} for (kind, dataset), metrics in groups.items()]
    return [{"name": name, "results": results}]


def write_model_index(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite README.md's front matter with the model-index, keeping the rest of the card."""
    card = folder / "README.md"
    meta, body = artifacts.split_card(card.read_text() if card.exists() else "")
    name = f"{manifest.get('recipe', 'model')}/{manifest.get('stage', folder.name)}"
    meta["model-index"] = model_index(name, manifest)
    card.write_text("---\n" + yaml.safe_dump(artifacts.scrub(meta), sort_keys=False).strip() + "\n---\n\n" + body)
