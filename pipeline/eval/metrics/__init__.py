"""The metrics of `pipeline eval` and the `evaluate` stage, one file each, registered in `METRICS`.

A metric file holds `measure(model, tokenizer, section, spec, batch_size) -> values`, `KEYS` (value -> key in the
manifest's `evaluation`), `ROLE` ('policy' or 'judge': how the artifact is loaded), `TASK` (its Hub model-index task)
and an `evaluate.Metric` with the formula, loaded by file path so it works offline:
`pipeline.eval.metrics.load("win_rate")` is `evaluate.load("<this folder>/win_rate.py")`.
A new metric: a file here and its name in `pipeline.names.METRICS` (the schema checks `metric:` against it).

Used by `pipeline.eval.evals`; nothing runs at import (evaluate is imported only when a metric is loaded).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from pipeline.names import METRICS  # the registry's names live in a leaf the schema can import
NAMES = METRICS  # the `evaluate` modules: every metric has one


def path(name: str) -> Path:
    """Absolute path of a metric module file."""
    if name not in METRICS:
        raise ValueError(f"unknown metric '{name}'; choose from {', '.join(METRICS)}")
    return Path(__file__).resolve().parent / f"{name}.py"


def load(name: str):
    """The `evaluate.Metric` for `name`, loaded from its local file (no Hub access)."""
    import evaluate

    return evaluate.load(str(path(name)))


def module(name: str) -> ModuleType:
    """The metric's module (its `measure`, `KEYS`, `ROLE`, `TASK`)."""
    path(name)  # an unknown name fails here, with the choices
    return importlib.import_module(f"{__name__}.{name}")
