"""The procedural task generator (`python -m pipeline.tasks`): same seed, same rows; held-out items never trained on;
every answer correct, recomputed here from the prompt's own text.

Run: `.venv/bin/python -m pytest tests/test_tasks.py` (pure Python, well under a second).
"""
from __future__ import annotations

import json
import re

import pytest

from pipeline import tasks


def solve(prompt: str) -> str:
    """The answer of a generated prompt, worked out independently of the generator."""
    question = prompt.split("?")[0] + "?"
    if question.startswith("Solve for x"):
        a, op, b, c = re.match(r"Solve for x: (\d)x ([+-]) (\d) = (-?\d+)\.", question).groups()
        rhs = int(c) - int(b) if op == "+" else int(c) + int(b)
        assert rhs % int(a) == 0
        return str(rhs // int(a))
    if "taller than" in question:
        pairs = re.findall(r"(\w+) is taller than (\w+)\.", question)
        people = {p for pair in pairs for p in pair}
        shorter = {s for _, s in pairs}
        taller = {t for t, _ in pairs}
        return (people - shorter if "tallest" in question else people - taller).pop()
    expression = re.match(r"What is (.*)\?", question).group(1)
    assert re.fullmatch(r"\d( [-+*] \d)+", expression), expression
    return str(eval(expression))  # one-digit numbers and + - * only, checked just above


def test_every_answer_is_correct():
    train, held = tasks.generate(list(tasks.TASKS), n=400, eval_n=100, seed=3)
    for row in train + held:
        assert row["answer"] == solve(row["prompt"]), row
        assert row["prompt"].endswith(tasks.INSTRUCTION)
    assert {row["task"] for row in train} == set(tasks.TASKS)  # a mixture draws every task


def test_the_same_seed_writes_the_same_rows_and_another_seed_others():
    first = tasks.generate(["add", "chain", "order"], n=50, eval_n=20, seed=7)
    assert first == tasks.generate(["add", "chain", "order"], n=50, eval_n=20, seed=7)
    assert first != tasks.generate(["add", "chain", "order"], n=50, eval_n=20, seed=8)


def key_of(prompt: str) -> str:
    """A problem regardless of its wording: the order task's facts sorted (their order is shuffled per row)."""
    question = prompt.split("?")[0]
    if "taller than" in question:
        return " ".join(sorted(re.findall(r"\w+ is taller than \w+", question))) + question.rsplit(" ", 1)[1]
    return question


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_held_out_items_are_distinct_and_never_trained_on(task):
    train, held = tasks.generate([task], n=300, eval_n=40, seed=0)
    held_keys = [key_of(r["prompt"]) for r in held]
    assert len(set(held_keys)) == 40
    assert not set(held_keys) & {key_of(r["prompt"]) for r in train}


def test_a_space_too_small_to_hold_out_is_a_one_line_error():
    tasks.generate(["mul"], n=10, eval_n=99, seed=0)  # 100 products: 99 held out, one left to train on
    with pytest.raises(ValueError, match="lower --eval-n"):
        tasks.generate(["mul"], n=10, eval_n=101, seed=0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate(["division"], n=1, eval_n=1)


def test_the_command_writes_train_and_held_out_files(tmp_path, capsys):
    assert tasks.main(["--out", str(tmp_path / "d"), "--tasks", "add,linear", "--n", "30", "--eval-n", "10",
                       "--format", "plain"]) == 0
    train = [json.loads(line) for line in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "d" / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 30 and len(held) == 10
    assert set(train[0]) == {"prompt", "answer", "task"} and "<answer>" not in train[0]["prompt"]
    assert "train.jsonl (30 rows)" in capsys.readouterr().out
    assert tasks.main(["--out", str(tmp_path / "e"), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err
