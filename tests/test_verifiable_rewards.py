"""The verifiable reward rules of `pipeline.rl.rewards`: `extract: tagged`, the `format` rule and `math_verify`
(by hand-computed cases), math-verify's wall-clock limit on a pathological expression and its use from other threads,
the one-line error without the package, and a tiny GRPO stage scored by `math_verify` on generated task rows, run
through `pipeline run`.

Run: `.venv/bin/python -m pytest tests/test_verifiable_rewards.py` (about 30 s: the math-verify worker starts in
~2 s and again after each timeout; the GRPO run trains two steps).
"""
from __future__ import annotations

import importlib.util
import json
import threading
import time

import pytest
import yaml

from pipeline import schema
from pipeline.errors import PipelineError
from pipeline.eval import answers
from pipeline.rl import math_check, rewards
from pipeline.rl.rewards import rule_rewards
from test_online_rl import TRAIN, tiny  # noqa: F401  (the tiny policy fixture)

SLOW = "\\boxed{9^{9^{9^{9}}}+1}"  # parsing evaluates the power: minutes in C, where math-verify's alarm cannot reach


def rules(*specs: dict) -> list[schema.RuleReward]:
    return [schema.RuleReward(**spec) for spec in specs]


def test_tagged_extraction():
    assert answers.tagged("<think>2+2</think><answer> 4 </answer>") == "4"
    assert answers.tagged("<answer>1</answer> no: <answer>2</answer>") == "2"  # the last one
    assert answers.tagged("<answer>\nmulti\nline\n</answer>") == "multi\nline"
    assert answers.tagged("4") is None and answers.tagged("<answer>4") is None
    assert answers.tagged("<final>9</final>", tag="final") == "9"


def test_exact_match_is_unchanged_by_default_and_reads_the_tag_when_asked():
    completions = ["<think>3+4</think><answer>7</answer>", "<answer>7</answer> wait, 8", "7",
                   "<answer>Alice</answer>", "So 3 + 4 = 7"]
    rows = [{"answer": a} for a in ("7", "7", "7", "Alice", "7")]
    assert rule_rewards(rules({"type": "exact_match"}), completions, rows) == [1.0, 0.0, 1.0, 0.0, 1.0]
    tagged = rules({"type": "exact_match", "extract": "tagged"})
    assert rule_rewards(tagged, completions, rows) == [1.0, 1.0, 0.0, 1.0, 0.0]
    contains = rules({"type": "contains_answer", "extract": "tagged"})
    assert rule_rewards(contains, ["<answer>so 12</answer> 5", "5 <answer>5</answer>"], [{"answer": "5"}] * 2) == [
        0.0, 1.0]


@pytest.mark.parametrize("completion, think_tag, reward", [
    ("<think>a</think><answer>7</answer>", "think", 1.0),
    ("  <think>\nstep 1\n</think>\n<answer> 7 </answer>\n", "think", 1.0),
    ("<answer>7</answer>", "think", 0.0),  # no reasoning
    ("<answer>7</answer>", None, 1.0),  # the answer tag alone
    ("<think>a</think><answer>7</answer>", None, 0.0),  # nothing before the answer when think_tag is null
    ("<think>a</think><answer>7</answer> and more", "think", 0.0),
    ("<think>a</think><answer> </answer>", "think", 0.0),  # an empty answer
    ("<think>a</think><answer>1</answer><answer>2</answer>", "think", 0.0),
    ("<think><think>a</think><answer>7</answer>", "think", 0.0),
    ("<think>a</think>", "think", 0.0),
    ("7", "think", 0.0),
])
def test_format_rule(completion, think_tag, reward):
    rule = rules({"type": "format", "think_tag": think_tag})
    assert rule_rewards(rule, [completion], [{}]) == [reward]


def test_format_rule_with_other_tags():
    rule = rules({"type": "format", "tag": "final", "think_tag": "reasoning", "weight": 0.5})
    assert rule_rewards(rule, ["<reasoning>x</reasoning><final>3</final>", "<think>x</think><answer>3</answer>"],
                        [{}, {}]) == [0.5, 0.0]


MATH_CASES = [  # (reference answer, completion, reward)
    ("\\frac{1}{2}", "so it is \\boxed{\\frac{2}{4}}", 1.0),
    ("0.5", "the answer is 1/2", 1.0),
    ("\\frac{3}{4}", "$0.75$", 1.0),
    ("\\sqrt{8}", "\\boxed{2\\sqrt{2}}", 1.0),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", 1.0),
    ("17", "I think 17", 1.0),
    ("-4", "x = -4", 1.0),
    ("17", "17 or 18", 0.0),  # the last expression is the answer
    ("12", "12.5", 0.0),
    ("3", "", 0.0),
    (None, "3", 0.0),  # no reference answer in the row
]


def test_math_verify_by_hand():
    completions = [c for _, c, _ in MATH_CASES]
    rows = [{"answer": a} for a, _, _ in MATH_CASES]
    assert rule_rewards(rules({"type": "math_verify"}), completions, rows) == [r for _, _, r in MATH_CASES]


def test_math_verify_reads_the_tag_when_asked():
    completions = ["<answer>7</answer> no wait \\boxed{8}", "\\boxed{7}"]
    rows = [{"answer": "7"}] * 2
    assert rule_rewards(rules({"type": "math_verify"}), completions, rows) == [0.0, 1.0]
    assert rule_rewards(rules({"type": "math_verify", "extract": "tagged"}), completions, rows) == [1.0, 0.0]


def test_a_pathological_expression_scores_zero_at_the_time_limit_and_the_next_check_works():
    assert math_check.matches("2", "\\boxed{2}")  # the worker is up: its start is not part of the limit
    start = time.monotonic()
    assert rule_rewards(rules({"type": "math_verify", "timeout": 1.0}), [SLOW], [{"answer": "2"}]) == [0.0]
    assert time.monotonic() - start < 3.0
    assert math_check.worker().process is None  # the stuck worker was killed
    assert math_check.matches("\\frac{1}{2}", "0.5")  # and a fresh one answers


def test_math_verify_from_other_threads_at_once():
    """TRL and Accelerate may call reward functions off the main thread, where math-verify's alarms cannot work;
    here three threads score the hand cases while a fourth gets the worker killed on a pathological expression."""
    cases = MATH_CASES[:8]
    results: dict[int, list[float]] = {}

    def score(i: int) -> None:
        if i == 3:
            results[i] = rule_rewards(rules({"type": "math_verify", "timeout": 1.0}), [SLOW], [{"answer": "2"}])
        else:
            results[i] = rule_rewards(rules({"type": "math_verify"}), [c for _, c, _ in cases],
                                      [{"answer": a} for a, _, _ in cases])

    threads = [threading.Thread(target=score, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == {0: [r for _, _, r in cases], 1: [r for _, _, r in cases], 2: [r for _, _, r in cases],
                       3: [0.0]}


def test_without_math_verify_the_rule_is_a_one_line_recipe_error(monkeypatch, tmp_path):
    from pipeline.recipe import parse_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    stage = {"kind": "grpo", "model": "m", "rewards": [{"type": "math_verify"}], "data": {"path": "x.jsonl"}}
    with pytest.raises(PipelineError) as err:
        parse_recipe({"name": "t", "output_dir": str(tmp_path), "stages": {"grpo": stage}}, tmp_path / "r.yaml")
    message = str(err.value)
    assert "\n" not in message and "hf-pipeline[rlvr]" in message and "stages.grpo.rewards" in message, message
    with pytest.raises(PipelineError, match=r"hf-pipeline\[rlvr\]"):
        math_check.matches("1", "1")
    assert schema.RuleReward(type="exact_match")  # the other rules do not need it


def test_rule_fields_have_defaults_that_keep_the_old_rules():
    rule = schema.RuleReward(type="exact_match")
    assert (rule.extract, rule.tag, rule.think_tag, rule.timeout) == ("auto", "answer", "think", 5.0)
    with pytest.raises(ValueError):
        schema.RuleReward(type="format", tag="an swer")
    with pytest.raises(ValueError):
        schema.RuleReward(type="math_verify", timeout=0)


def test_grpo_with_math_verify_on_generated_tasks_runs_through_pipeline_run(tiny, tmp_path, monkeypatch):  # noqa: F811
    from pipeline import tasks
    from pipeline.__main__ import main

    assert tasks.main(["--out", str(tmp_path / "data"), "--tasks", "add,chain", "--n", "8", "--eval-n", "4"]) == 0
    scored = []
    real = rewards.RULES["math_verify"]

    def spy(completion, row, rule):
        scored.append((row["answer"], real(completion, row, rule)))
        return scored[-1][1]

    monkeypatch.setitem(rewards.RULES, "math_verify", spy)
    files = tmp_path / "data"
    stage = {"kind": "grpo", "model": str(tiny / "policy"), "rewards": [{"type": "math_verify"}],
             "data": {"path": str(files / "train.jsonl"), "eval_path": str(files / "eval.jsonl"),
                      "max_rows": 4, "max_eval_rows": 2},
             "train": {**TRAIN, "max_length": 256}, "num_generations": 2, "max_new_tokens": 8, "eval_samples": 1}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "rlvr", "output_dir": str(tmp_path / "out"), "stages": {"grpo": stage}}))
    assert main(["run", str(recipe)]) == 0
    manifest = json.loads((tmp_path / "out" / "grpo" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert {"eval_rule_reward_before", "eval_rule_reward_after"} <= set(metrics)
    assert "rewards/rule_reward/mean" in {key for entry in manifest["log_history"] for key in entry}
    # 2 steps x 2 completions in training, and before/after: 2 greedy + 2 sampled held-out answers each
    assert len(scored) >= 4 + 2 * 4
    known = {json.loads(line)["answer"] for name in ("train.jsonl", "eval.jsonl") for line in (files / name).open()}
    assert {answer for answer, _ in scored} <= known  # the rule saw the generated rows' answers
    assert all(score in (0.0, 1.0) for _, score in scored)
