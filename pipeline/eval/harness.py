"""The lm-eval harness on a loaded model (`metric: lm_eval` with `tasks:`), with this package's local task YAMLs
(`lm_eval_tasks/`) found by name and their data files found from the repository root. Needs the `eval` extra.

Used by `pipeline.eval.evals`; nothing runs at import (lm_eval is imported when a task runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK = ("text-generation", "lm-eval harness")  # the Hub model-index task of its results


def run_tasks(model, tokenizer, tasks: list[str], include_path: str | None = None, limit: int | None = None,
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
    for base in (task_folder, TASKS_DIR.parents[2]):
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

