"""The procedural task generator (`python -m pipeline.tasks`): same seed, same rows; held-out items never trained on;
every answer correct, recomputed here from the prompt's own text.

Run: `.venv/bin/python -m pytest tests/test_tasks.py` (pure Python, well under a second).
"""
from __future__ import annotations

import json
from pathlib import Path
import re

import pytest

from pipeline import tasks
from pipeline.rl import tools


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
    assert re.fullmatch(r"\d{1,3}( [-+*] \d{1,3})+", expression), expression
    return str(eval(expression))  # numbers and + - * only, checked just above


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


def test_tool_style_rows_and_worked_transcripts(tmp_path):
    assert tasks.main(["--out", str(tmp_path), "--tasks", "arith", "--format", "tools", "--n", "40",
                       "--eval-n", "20", "--sft", "30"]) == 0
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    worked = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(worked) == 30
    for row in train + held:
        assert row["prompt"].endswith(tasks.INSTRUCTIONS["tools"]) and row["answer"] == solve(row["prompt"])
    held_prompts = {row["prompt"] for row in held}
    for conversation in worked:
        user, call, result, answer = conversation["messages"]
        assert user["content"] not in held_prompts  # the warm-up never shows a held-out item
        arguments = json.loads(call["tool_calls"][0]["function"]["arguments"])
        assert result["role"] == "tool" and result["content"] == solve(user["content"])
        assert tools.calculator(arguments["expression"]) == result["content"]  # the call computes the answer
        assert answer["content"] == f"<answer>{result['content']}</answer>"


def test_tagged_transcripts_show_their_working():
    _, held = tasks.generate(["add", "chain"], n=0, eval_n=5, seed=0)
    for conversation in tasks.transcripts(["add", "chain"], 10, held, seed=0, style="tagged"):
        user, said = conversation["messages"]
        value = solve(user["content"])
        assert said["content"].endswith(f"= {value}</think> <answer>{value}</answer>")


@pytest.mark.parametrize("folder, arguments", [
    ("rlvr", ["--tasks", "add,mul,chain", "--n", "1000", "--eval-n", "100", "--seed", "0", "--sft", "300"]),
    ("tools", ["--tasks", "arith", "--format", "tools", "--n", "500", "--eval-n", "100", "--seed", "0", "--sft", "300"]),
    ("arith", ["--tasks", "arith", "--format", "tagged", "--n", "100", "--eval-n", "100", "--seed", "0"])])
def test_the_committed_task_data_is_what_its_command_writes(folder, arguments, tmp_path):
    """data/rlvr, data/tools and data/arith (read by recipes/real/smollm2-rlvr.yaml and smollm2-tools.yaml) are
    regenerated byte for byte by the commands in those recipes' headers."""
    committed = Path(__file__).resolve().parents[1] / "data" / folder
    assert tasks.main(["--out", str(tmp_path), *arguments]) == 0
    assert sorted(p.name for p in committed.iterdir()) == sorted(p.name for p in tmp_path.iterdir())
    for path in tmp_path.iterdir():
        assert path.read_bytes() == (committed / path.name).read_bytes(), path.name
