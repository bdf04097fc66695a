"""Rule-based rewards computed from the data row (no model), one function per rule type, registered in `RULES`:
exact match on a known answer, answer contained in the completion, and a length penalty. Answers are checked by
`pipeline.eval.answers`, as the exact-match metric checks them. Shared by PPO (`pipeline.rl.rollout`) and the
GRPO/RLOO stages.

Usage: `rule_rewards(config.rewards, completions, rows)` -> one float per completion (weighted sum of the rules).
A new rule: a function `(completion, row, rule) -> float` here, its name in `RULES` and in `pipeline.names.REWARD_RULES`
(the schema checks `type:` against those names).
Pure Python; nothing runs at import.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from pipeline.eval import answers


def _target(row: dict[str, Any], field: str) -> str | None:
    value = row.get(field)
    return None if value is None else str(value).strip()


def exact_match(completion: str, row: dict[str, Any], field: str = "answer") -> float:
    """1.0 when the completion's extracted answer (its last number) equals the row's `field`, else 0.0."""
    target = _target(row, field)
    return float(target is not None and answers.matches(completion, target))


def contains_answer(completion: str, row: dict[str, Any], field: str = "answer") -> float:
    """1.0 when the row's `field` appears anywhere in the completion, else 0.0."""
    target = _target(row, field)
    return float(bool(target) and target in completion)


def length_penalty(completion: str, target_length: int | None) -> float:
    """-(characters beyond `target_length`) / target_length, 0 when within it (or no target set)."""
    if not target_length:
        return 0.0
    return -max(len(completion) - target_length, 0) / target_length


RULES: dict[str, Callable[[str, dict[str, Any], Any], float]] = {  # rule type -> (completion, row, rule) -> reward
    "exact_match": lambda completion, row, rule: exact_match(completion, row, rule.field),
    "contains_answer": lambda completion, row, rule: contains_answer(completion, row, rule.field),
    "length_penalty": lambda completion, row, rule: length_penalty(completion, rule.target_length),
}


def score_rule(rule, completion: str, row: dict[str, Any]) -> float:
    """One rule's weighted reward for one completion. `rule` is a `schema.RuleReward`."""
    if rule.type not in RULES:
        raise ValueError(f"unknown reward rule {rule.type!r}")
    return rule.weight * RULES[rule.type](completion, row, rule)


def rule_rewards(rules: Sequence, completions: list[str], rows: list[dict[str, Any]]) -> list[float]:
    """Sum of every rule's weighted reward, per completion (zeros when there are no rules)."""
    if len(completions) != len(rows):
        raise ValueError(f"{len(completions)} completions but {len(rows)} rows")
    return [sum(score_rule(rule, c, row) for rule in rules) for c, row in zip(completions, rows)]
