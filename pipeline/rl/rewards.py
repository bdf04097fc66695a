"""Rule-based rewards computed from the data row (no model), one function per rule type, registered in `RULES`:
exact match on a known answer, answer contained in the completion, a length penalty, and the verifiable rewards:
`math_verify` (the answer checked by the math-verify package, `pipeline.rl.math_check`), `format` (the completion
follows `<think>...</think><answer>...</answer>`) and `code_tests` (the completion's code passes the row's test
asserts in `pipeline.rl.sandbox`). Answers are checked by `pipeline.eval.answers`, as the exact-match metric checks
them. Shared by PPO (`pipeline.rl.rollout`), the GRPO/RLOO stages and their held-out measures.

The answer rules (exact_match, contains_answer, math_verify, code_tests) read the whole completion
(`extract: auto`, the default: exact_match then takes its last number, as before) or only the content of its last
`<answer>...</answer>` (`extract: tagged`, tag set by `tag:`; no tag scores 0).

Usage: `rule_rewards(config.rewards, completions, rows)` -> one float per completion (weighted sum of the rules).
A new rule: a function `(completion, row, rule) -> float` here, its name in `RULES` and in `pipeline.names.REWARD_RULES`
(the schema checks `type:` against those names). Safe to call from any thread. Nothing runs at import.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

from pipeline.eval import answers
from pipeline.rl import math_check, sandbox

FENCE = re.compile(r"^```[ \t]*([\w+-]*)[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)  # (language, body)
PYTHON_FENCES = ("", "python", "python3", "py")


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


def math_verify(completion: str, row: dict[str, Any], field: str = "answer", timeout: float = 5.0) -> float:
    """1.0 when math-verify finds the completion's answer (LaTeX, \\boxed{}, a plain number) equal to the row's
    `field`, decided within `timeout` seconds (else 0.0)."""
    target = _target(row, field)
    return float(target is not None and math_check.matches(target, completion, timeout))


def _block(tag: str) -> str:
    """A regex for `<tag>content</tag>` whose content holds no other `<tag>` or `</tag>`."""
    t = re.escape(tag)
    return rf"<{t}>((?:(?!</?{t}>).)*)</{t}>"


def format_reward(completion: str, tag: str = "answer", think_tag: str | None = "think") -> float:
    """1.0 when the completion is `<think>...</think>` then `<answer>...</answer>` and nothing else (whitespace
    around them aside), each tag once, the answer not empty; with `think_tag` None, the answer tag alone."""
    pattern = r"\s*" + (_block(think_tag) + r"\s*" if think_tag else "") + _block(tag) + r"\s*"
    found = re.fullmatch(pattern, completion, flags=re.DOTALL)
    return float(found is not None and found.group(found.lastindex).strip() != "")


def code_block(completion: str) -> str:
    """The last fenced code block (```python, ```py or bare ```), else the whole completion."""
    blocks = [body for language, body in FENCE.findall(completion) if language.lower() in PYTHON_FENCES]
    return blocks[-1] if blocks else completion


def code_tests(completion: str, row: dict[str, Any], field: str = "tests", timeout: float = 5.0,
               memory_mb: int = 512) -> float:
    """1.0 when the completion's code, then the row's `field` (Python asserts: a string or a list of them), run to
    their end in the sandbox within `timeout` seconds and `memory_mb`; 0.0 otherwise (or without tests)."""
    tests = row.get(field)
    if not tests:
        return 0.0
    tests = "\n".join(map(str, tests)) if isinstance(tests, (list, tuple)) else str(tests)
    return float(sandbox.run_tests(code_block(completion), tests, timeout=timeout, memory_mb=memory_mb).passed)


def answer_view(completion: str, rule) -> str | None:
    """What an answer rule reads: the whole completion (`extract: auto`) or the content of its last `<tag>...</tag>`
    (`extract: tagged`; None when it has none)."""
    return answers.tagged(completion, rule.tag) if rule.extract == "tagged" else completion


def _on_view(check: Callable[[str, dict[str, Any], Any], float]) -> Callable[[str, dict[str, Any], Any], float]:
    """An answer rule scored on `answer_view` (0.0 when `extract: tagged` finds no tag)."""
    def rule_fn(completion: str, row: dict[str, Any], rule) -> float:
        view = answer_view(completion, rule)
        return 0.0 if view is None else check(view, row, rule)

    return rule_fn


RULES: dict[str, Callable[[str, dict[str, Any], Any], float]] = {  # rule type -> (completion, row, rule) -> reward
    "exact_match": _on_view(lambda text, row, rule: exact_match(text, row, rule.field)),
    "contains_answer": _on_view(lambda text, row, rule: contains_answer(text, row, rule.field)),
    "length_penalty": lambda completion, row, rule: length_penalty(completion, rule.target_length),
    "math_verify": _on_view(lambda text, row, rule: math_verify(text, row, rule.field, rule.timeout)),
    "format": lambda completion, row, rule: format_reward(completion, rule.tag, rule.think_tag),
    "code_tests": _on_view(lambda text, row, rule: code_tests(text, row, rule.tests_field, rule.timeout,
                                                              rule.memory_mb)),
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
