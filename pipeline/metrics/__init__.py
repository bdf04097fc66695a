"""Local `evaluate` metric modules (exact_match, pairwise_accuracy, win_rate, perplexity), loaded by file path so
they work offline: `pipeline.metrics.load("win_rate")` is `evaluate.load("<this folder>/win_rate.py")`.

Used by `pipeline.evaluation`; nothing runs at import (evaluate is imported only inside `load`).
"""
from __future__ import annotations

from pathlib import Path

NAMES = ("exact_match", "pairwise_accuracy", "win_rate", "perplexity")


def path(name: str) -> Path:
    """Absolute path of a metric module file."""
    if name not in NAMES:
        raise ValueError(f"unknown metric '{name}'; choose from {', '.join(NAMES)}")
    return Path(__file__).resolve().parent / f"{name}.py"


def load(name: str):
    """The `evaluate.Metric` for `name`, loaded from its local file (no Hub access)."""
    import evaluate

    return evaluate.load(str(path(name)))
