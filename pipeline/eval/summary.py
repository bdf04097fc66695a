"""A stage's measures read from its metrics: held-out `X_before` paired with `X_after` (or plain `X`, as the reward
stage names its after-values), and the other measured values. Shared by the console's summary line
(pipeline.runner) and the report's bar charts (pipeline.tools.report); nothing runs at import.
"""
from __future__ import annotations

from typing import Any

BEFORE = "_before"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def before_after(metrics: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(measure, before, after) for every `X_before` metric that has an `X_after` or `X` beside it, in order."""
    pairs = []
    for key, before in metrics.items():
        if not key.endswith(BEFORE) or not is_number(before):
            continue
        stem = key[: -len(BEFORE)]
        after = metrics.get(f"{stem}_after", metrics.get(stem))
        if is_number(after):
            pairs.append((stem, before, after))
    return pairs


def paired_keys(metrics: dict[str, Any]) -> set[str]:
    keys = set()
    for stem, _, _ in before_after(metrics):
        keys |= {f"{stem}{BEFORE}", f"{stem}_after" if f"{stem}_after" in metrics else stem}
    return keys


def single_values(metrics: dict[str, Any]) -> dict[str, float]:
    """Measured values outside the before/after pairs (floats: integer metrics are counts such as rows or steps)."""
    paired = paired_keys(metrics)
    return {k: v for k, v in metrics.items() if isinstance(v, float) and k not in paired}


def fmt(value: float) -> str:
    return f"{value:.4g}"


def summary(metrics: dict[str, Any]) -> str:
    """'eval_loss 5.70 -> 5.61, train_loss 5.65': the pairs first, then the other measured values."""
    parts = [f"{stem} {fmt(before)} -> {fmt(after)}" for stem, before, after in before_after(metrics)]
    parts += [f"{key} {fmt(value)}" for key, value in single_values(metrics).items()]
    return ", ".join(parts)
