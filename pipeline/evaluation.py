"""Evaluate artifacts: held-out perplexity, task accuracy (exact match), reward-model pairwise accuracy, win rate
against a reference policy judged by a reward model, and lm-eval tasks (local YAML tasks included). Results go into
the artifact's manifest (`evaluation`) and its model card's Hub `model-index`.

Launched as `python -m pipeline eval OUTPUT/sft OUTPUT/reward [--metric ...] [--data FILE] [--reward-model DIR]
[--reference DIR] [--tasks a,b --include-path DIR] [--limit N]`, or by the `evaluate` stage
(`pipeline.stages.evaluate`). Scores are computed with the local `evaluate` modules in `pipeline.metrics`.
Nothing runs at import.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import artifacts, schema
from pipeline.errors import PipelineError

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_TYPES = {"perplexity": "text-generation", "exact_match": "text-generation", "win_rate": "text-generation",
              "lm_eval": "text-generation", "pairwise_accuracy": "text-classification"}
TASK_NAMES = {"perplexity": "Held-out perplexity", "exact_match": "Task accuracy (exact match)",
              "win_rate": "Win rate vs reference", "pairwise_accuracy": "Reward pairwise accuracy",
              "lm_eval": "lm-eval harness"}


@dataclass
class Result:
    """One number: which evaluation produced it, on which data."""

    eval: str  # perplexity | exact_match | pairwise_accuracy | win_rate | lm_eval
    key: str  # name in the manifest's `evaluation` dict
    value: float
    dataset: str


# ----------------------------------------------------------------------------------------------------- loading


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


def load_policy(path: str):
    """(causal LM with any adapter merged, tokenizer) from an artifact folder."""
    from pipeline import models

    return models.load_causal_lm(path, schema.ModelSection(path=path)), models.load_tokenizer(path)


def load_judge(path: str):
    """(reward model, tokenizer) from an artifact folder."""
    from pipeline import models

    return models.load_reward_model(path), models.load_tokenizer(path)


def default_data(path: str | Path) -> schema.DataSection | None:
    """The held-out data the artifact's stage used: its `data` section's eval file (else its file), with its field
    mapping and `max_eval_rows`; None when the manifest names no data."""
    artifact = artifacts.open_artifact(path)
    data = (artifact.manifest.get("config") or {}).get("data") if artifact else None
    if not isinstance(data, dict) or not data.get("path"):
        return None
    return schema.DataSection(path=data.get("eval_path") or data["path"], fields=data.get("fields") or {},
                              max_rows=data.get("max_eval_rows") if data.get("eval_path") else None)


def held_out(section: schema.DataSection, shape: str, limit: int | None = None):
    """The held-out rows of `section` (its eval file if it has one) in `shape`, at most `limit`."""
    from pipeline import data as data_lib

    path = section.eval_path or section.path
    rows = limit or section.max_eval_rows or section.max_rows
    single = section.model_copy(update={"path": path, "eval_path": None, "eval_split": None, "eval_fraction": None,
                                        "eval_rows": None, "max_rows": rows,
                                        "split": section.eval_split or section.split})
    return data_lib.load_data(single, shape).train


def _try_held_out(section: schema.DataSection, shapes: tuple[str, ...], limit: int | None):
    """(shape, rows) for the first shape the data fits."""
    from pipeline.errors import DataError

    for shape in shapes:
        try:
            return shape, held_out(section, shape, limit)
        except DataError:
            continue
    raise PipelineError(f"{section.path} fits none of the shapes {', '.join(shapes)}", key="data",
                        fix="use text, messages/prompt-completion, preference or prompt/answer rows")


def _name(section: schema.DataSection) -> str:
    return section.eval_path or section.path


# ----------------------------------------------------------------------------------------------------- metrics


def conversations(section: schema.DataSection, limit: int | None = None, shapes=("sft", "preference")):
    """(prompts, reference completions) from chat rows, or from preference rows (the chosen answers)."""
    shape, rows = _try_held_out(section, shapes, limit)
    if shape == "preference":
        return rows["prompt"], rows["chosen"]
    if shape == "sft":
        return rows["prompt"], rows["completion"]
    return rows, None


def perplexity(model, tokenizer, section: schema.DataSection, limit: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """Token-weighted perplexity of reference completions given their prompts (chat or preference data, chosen
    answers), or of plain text."""
    from pipeline import metrics, scoring

    prompts, completions = conversations(section, limit, ("sft", "preference", "text"))
    if completions is not None:
        logps = scoring.completion_logprobs(model, tokenizer, prompts, completions, batch_size)
        counts = [len(tokenizer(scoring.render(tokenizer, p, c)[1], add_special_tokens=False)["input_ids"])
                  for p, c in zip(prompts, completions)]
        nll = [-lp for lp in logps]
    else:
        texts = prompts["text"]
        counts = [max(len(tokenizer(t)["input_ids"]) - 1, 0) for t in texts]
        nll = [scoring.lm_loss(model, tokenizer, [t], 1) * n for t, n in zip(texts, counts)]
    return metrics.load("perplexity").compute(predictions=nll, references=counts)


def answers_of(section: schema.DataSection, limit: int | None = None):
    """(prompts, answers) when the data has checkable answers (`answer` field, or a number ending each
    reference completion / chosen answer), else None."""
    from pipeline import scoring

    prompts, completions = conversations(section, limit, ("sft", "preference", "prompts"))
    if completions is None:
        rows = prompts
        prompts, answers = rows["prompt"], rows["answer"]
    else:
        answers = [scoring.extract_answer(c[-1]["content"]) for c in completions]
        if not all(a and a.lstrip("-").isdigit() for a in answers):
            return None
    if any(a is None for a in answers):
        return None
    return prompts, answers


def exact_match(model, tokenizer, section: schema.DataSection, limit: int | None = None, batch_size: int = 16,
                max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy answers to held-out prompts, scored by exact match of the last number."""
    from pipeline import metrics, scoring

    found = answers_of(section, limit)
    if found is None:
        raise PipelineError(f"{_name(section)} has no checkable answers", key="data",
                            fix="use prompt/answer rows (e.g. data/prompts_eval.jsonl)")
    prompts, answers = found
    predictions = scoring.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return metrics.load("exact_match").compute(predictions=predictions, references=[str(a) for a in answers])


def pairwise_accuracy(model, tokenizer, section: schema.DataSection, limit: int | None = None,
                      batch_size: int = 16) -> dict[str, float]:
    """Share of held-out preference pairs the reward model orders correctly, and the mean margin."""
    from pipeline import metrics, scoring

    rows = held_out(section, "preference", limit)
    chosen = scoring.reward_scores(model, tokenizer, rows["prompt"], rows["chosen"], batch_size)
    rejected = scoring.reward_scores(model, tokenizer, rows["prompt"], rows["rejected"], batch_size)
    return metrics.load("pairwise_accuracy").compute(predictions=chosen, references=rejected)


def win_rate_from_scores(policy: list[float], reference: list[float], tolerance: float = 0.0) -> dict[str, float]:
    """Wins count 1, ties (within `tolerance`) 1/2, losses 0."""
    from pipeline import metrics

    return metrics.load("win_rate").compute(predictions=policy, references=reference, tolerance=tolerance)


def win_rate(model, tokenizer, reference_path: str, judge_path: str, section: schema.DataSection,
             limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 32) -> dict[str, float]:
    """Greedy answers of the policy and of the reference on held-out prompts, both scored by the reward model."""
    from pipeline import scoring

    prompts, completions = conversations(section, limit, ("sft", "preference", "prompts"))
    prompts = prompts["prompt"] if completions is None else prompts
    ours = scoring.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    ref_model, ref_tokenizer = load_policy(reference_path)
    theirs = scoring.generate(ref_model, ref_tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    del ref_model
    judge, judge_tokenizer = load_judge(judge_path)
    as_turn = lambda texts: [[{"role": "assistant", "content": t}] for t in texts]  # noqa: E731
    ours_scores = scoring.reward_scores(judge, judge_tokenizer, prompts, as_turn(ours), batch_size)
    theirs_scores = scoring.reward_scores(judge, judge_tokenizer, prompts, as_turn(theirs), batch_size)
    return win_rate_from_scores(ours_scores, theirs_scores)


def lm_eval_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                  batch_size: int = 8) -> dict[str, float]:
    """lm-eval harness tasks on the loaded model; `include_path` adds local task YAMLs (default: ours)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    folders = [TASKS_DIR] + ([Path(include_path)] if include_path else [])
    manager = TaskManager(include_path=[str(f) for f in folders])
    specs = [local_task(name, folders) or name for name in tasks]
    output = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=False,
                                     bootstrap_iters=0)
    return flatten_lm_eval(output["results"])


def local_task(name: str, folders: list[Path]) -> dict[str, Any] | None:
    """A local task's YAML config with relative `data_files` made absolute, when they do not exist from the working
    directory but do next to the YAML or under the repository root; None leaves the task to lm-eval's TaskManager."""
    for file in sorted(f for folder in folders for f in Path(folder).glob("*.yaml")):
        try:
            config = yaml.safe_load(file.read_text())
        except yaml.YAMLError:  # lm-eval tags such as !function: let lm-eval read it
            continue
        if not isinstance(config, dict) or config.get("task") != name:
            continue
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if not isinstance(files, dict):
            return None
        resolved = {split: _existing(value, file.parent) for split, value in files.items()}
        if resolved == files:
            return None
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
        return config
    return None


def _existing(value: Any, task_folder: Path) -> Any:
    """`value` if it exists from the working directory; else the first existing of task folder / repository root."""
    if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
        return value
    for base in (task_folder, TASKS_DIR.parents[1]):
        if (base / value).exists():
            return str((base / value).resolve())
    return value


def flatten_lm_eval(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{'addition': {'exact_match,last_number': 0.5, ...}} -> {'addition/exact_match': 0.5}; stderr dropped."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{key.split(',')[0]}"] = float(value)
    return flat


# ---------------------------------------------------------------------------------------------------- running


def default_evals(path: str, data: str | None = None) -> list[schema.EvalSection]:
    """perplexity (+ exact_match when the data has answers) for a causal LM; pairwise_accuracy for a reward model."""
    section = schema.DataSection(path=data) if data else default_data(path)
    if section is None:
        raise PipelineError(f"no held-out data known for {path}", key="--data", fix="pass --data FILE")
    if artifact_kind(path) == schema.REWARD_MODEL:
        return [schema.EvalSection(metric="pairwise_accuracy", data=section)]
    evals = [schema.EvalSection(metric="perplexity", data=section)]
    try:
        if answers_of(section) is not None:
            evals.append(schema.EvalSection(metric="exact_match", data=section))
    except PipelineError:
        pass
    return evals


def _data_for(spec: schema.EvalSection, path: str) -> schema.DataSection:
    section = spec.data or default_data(path)
    if section is None:
        raise PipelineError(f"`{spec.metric}` needs data and none is known for {path}", key="data",
                            fix="set `data:` on the eval (or --data FILE)")
    return section


def check(spec: schema.EvalSection) -> None:
    """Refuse an evaluation that lacks what it needs, before any model is loaded."""
    if spec.metric == "win_rate" and (not spec.reward_model or not spec.reference):
        raise PipelineError("win_rate needs a reward model and a reference policy", key="reward_model",
                            fix="set `reward_model:` and `reference:` (--reward-model, --reference)")
    if spec.metric == "lm_eval" and not spec.tasks:
        raise PipelineError("lm_eval needs tasks", key="tasks", fix="e.g. --tasks addition_loglik")


def run_one(path: str, spec: schema.EvalSection, loaded: dict[str, Any], batch_size: int = 16) -> list[Result]:
    """Run one evaluation on the artifact at `path`; `loaded` caches (model, tokenizer) between evaluations."""
    check(spec)
    role = "judge" if spec.metric == "pairwise_accuracy" else "policy"
    if role not in loaded:
        loaded[role] = load_judge(path) if role == "judge" else load_policy(path)
    model, tokenizer = loaded[role]
    if spec.metric == "lm_eval":
        values = lm_eval_tasks(model, tokenizer, spec.tasks, spec.include_path, spec.limit, batch_size)
        return [Result("lm_eval", k, v, "lm-eval:" + k.split("/")[0]) for k, v in values.items()]
    section = _data_for(spec, path)
    if spec.metric == "perplexity":
        values = perplexity(model, tokenizer, section, spec.limit, batch_size)
        keys = {"perplexity": "perplexity", "loss": "eval_loss"}
    elif spec.metric == "exact_match":
        values = exact_match(model, tokenizer, section, spec.limit, batch_size, spec.max_new_tokens)
        keys = {"exact_match": "exact_match"}
    elif spec.metric == "pairwise_accuracy":
        values = pairwise_accuracy(model, tokenizer, section, spec.limit, batch_size)
        keys = {"pairwise_accuracy": "pairwise_accuracy", "margin": "reward_margin"}
    else:
        values = win_rate(model, tokenizer, spec.reference, spec.reward_model, section, spec.limit, batch_size,
                          spec.max_new_tokens)
        keys = {"win_rate": "win_rate"}
    return [Result(spec.metric, key, float(values[name]), _name(section)) for name, key in keys.items()]


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
    """Merge results into the artifact's manifest (`evaluation`, `evaluation_datasets`) and its card's model-index."""
    folder = Path(path)
    manifest = artifacts.update_manifest(folder, evaluation={r.key: r.value for r in results},
                                         evaluation_datasets={r.key: r.dataset for r in results},
                                         evaluation_kinds={r.key: r.eval for r in results})
    write_model_index(folder, manifest)
    return manifest


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
    results = [{"task": {"type": TASK_TYPES.get(kind, "text-generation"), "name": TASK_NAMES.get(kind, kind)},
                "dataset": {"name": Path(dataset).stem if not dataset.startswith("lm-eval:") else dataset,
                            "type": dataset},
                "metrics": metrics} for (kind, dataset), metrics in groups.items()]
    return [{"name": name, "results": results}]


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """(YAML front matter, the rest) of a README.md."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return yaml.safe_load(text[4:end]) or {}, text[end + 4:].lstrip("\n")
    return {}, text


def write_model_index(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite README.md's front matter with the model-index, keeping the rest of the card."""
    card = folder / "README.md"
    meta, body = split_card(card.read_text() if card.exists() else "")
    name = f"{manifest.get('recipe', 'model')}/{manifest.get('stage', folder.name)}"
    meta["model-index"] = model_index(name, manifest)
    card.write_text("---\n" + yaml.safe_dump(artifacts.scrub(meta), sort_keys=False).strip() + "\n---\n\n" + body)


# --------------------------------------------------------------------------------------------------------- CLI


def evals_from_args(args, path: str) -> list[schema.EvalSection]:
    """EvalSections for one artifact from the CLI flags (defaults by artifact kind when --metric is absent)."""
    metrics_ = list(args.metric or [])
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks and "lm_eval" not in metrics_:
        metrics_.append("lm_eval")
    evals = [] if metrics_ else default_evals(path, args.data)
    data = schema.DataSection(path=args.data) if args.data else None
    for metric in metrics_:
        evals.append(schema.EvalSection(metric=metric, data=data, reward_model=args.reward_model,
                                        reference=args.reference, tasks=tasks, include_path=args.include_path,
                                        limit=args.limit))
    if args.limit:
        evals = [e.model_copy(update={"limit": args.limit}) for e in evals]
    return evals


def print_table(rows: list[tuple[str, Result]]) -> None:
    width = max([len(a) for a, _ in rows] + [8])
    key_width = max([len(r.key) for _, r in rows] + [6])
    print(f"{'artifact':<{width}}  {'metric':<{key_width}}  {'value':>10}  data")
    for artifact, result in rows:
        print(f"{artifact:<{width}}  {result.key:<{key_width}}  {result.value:>10.4f}  {result.dataset}")


def main(args) -> int:
    """`python -m pipeline eval ARTIFACT...`: evaluate, print a table, record results in each artifact."""
    rows: list[tuple[str, Result]] = []
    for path in args.artifacts:
        if not Path(path).is_dir():
            raise PipelineError(f"{path} is not a folder", key="artifacts", fix="pass OUTPUT/<stage> folders")
        results = evaluate_artifact(path, evals_from_args(args, path))
        if artifacts.open_artifact(path) is not None:
            record(path, results)
        rows += [(path, r) for r in results]
    print_table(rows)
    return 0
