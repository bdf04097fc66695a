"""Rule-based rewards computed from the data row (no model): exact match on a known answer, answer contained in
the completion, and a length penalty. Shared by PPO (`pipeline.rl.rollout`) and the GRPO/RLOO stages.

Usage: `rule_rewards(config.rewards, completions, rows)` -> one float per completion (weighted sum of the rules).
Pure Python; nothing runs at import.
"""
from __future__ import annotations

from typing import Any, Sequence

from pipeline import scoring


def _target(row: dict[str, Any], field: str) -> str | None:
    value = row.get(field)
    return None if value is None else str(value).strip()


def exact_match(completion: str, row: dict[str, Any], field: str = "answer") -> float:
    """1.0 when the completion's extracted answer (its last number) equals the row's `field`, else 0.0."""
    target = _target(row, field)
    return float(target is not None and scoring.extract_answer(completion) == target)


def contains_answer(completion: str, row: dict[str, Any], field: str = "answer") -> float:
    """1.0 when the row's `field` appears anywhere in the completion, else 0.0."""
    target = _target(row, field)
    return float(bool(target) and target in completion)


def length_penalty(completion: str, target_length: int | None) -> float:
    """-(characters beyond `target_length`) / target_length, 0 when within it (or no target set)."""
    if not target_length:
        return 0.0
    return -max(len(completion) - target_length, 0) / target_length


def rule_reward(rule, completion: str, row: dict[str, Any]) -> float:
    """One rule's weighted reward for one completion. `rule` is a `schema.RuleReward`."""
    if rule.type == "exact_match":
        value = exact_match(completion, row, rule.field)
    elif rule.type == "contains_answer":
        value = contains_answer(completion, row, rule.field)
    elif rule.type == "length_penalty":
        value = length_penalty(completion, rule.target_length)
    else:
        raise ValueError(f"unknown reward rule {rule.type!r}")
    return rule.weight * value


def rule_rewards(rules: Sequence, completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    """Sum of every rule's weighted reward, per completion (zeros when there are no rules)."""
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
    return [sum(rule_reward(rule, c, row) for rule in rules) for c, row in zip(completions, rows)]
