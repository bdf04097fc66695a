"""The one answer check of the project's tasks: a completion's checkable answer is its last integer (else its
stripped text), and it matches a reference when the two are equal as strings. The `exact_match` metric, the
stages' held-out exact match and the `exact_match` / `contains_answer` rule rewards all read answers here; the
rules' `extract: tagged` first narrows a completion to its last `<answer>...</answer>` (`tagged`).

Pure Python; nothing runs at import.
"""
from __future__ import annotations

import re
from typing import Any

NUMBER = re.compile(r"-?\d+")


def extract_answer(text: str) -> str | None:
    """The last number in a completion (the checkable answer of the project's tasks), else the stripped text."""
    found = NUMBER.findall(text)
    return found[-1] if found else (text.strip() or None)


def tagged(text: str, tag: str = "answer") -> str | None:
    """The stripped content of the last `<tag>...</tag>` in the text, or None when there is none."""
    found = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


def is_integer(answer: str | None) -> bool:
    """True for an answer such as '7' or '-12': one a greedy completion can be checked against."""
    return bool(answer) and answer.lstrip("-").isdigit()


def reference_answers(completions: list[list[dict]]) -> list[str] | None:
    """The answer ending each reference completion (chat messages), when every one is an integer; else None."""
    answers = [extract_answer(c[-1]["content"]) for c in completions]
    return answers if all(is_integer(a) for a in answers) else None


def matches(prediction: str, answer: Any) -> bool:
    """The prediction's extracted answer equals the reference answer (stripped)."""
    return extract_answer(prediction) == str(answer).strip()


def exact_match(predictions: list[str], answers: list[Any]) -> float:
    """The share of predictions whose extracted answer equals its reference."""
    hits = [matches(p, a) for p, a in zip(predictions, answers)]
    return sum(hits) / max(len(hits), 1)
