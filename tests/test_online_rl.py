"""Tests for the `grpo`, `rloo` and `kto` stages: rule rewards and their TRL adapter by hand, then tiny end-to-end
runs through the runner on a tiny Llama policy and reward model built here (CPU, two steps each).

Run: `.venv/bin/python -m pytest tests/test_online_rl.py` (add `-m "not slow"` to skip the unpaired KTO run).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import schema
from pipeline.errors import PipelineError, RecipeError
from pipeline.rl.rewards import rule_rewards
from pipeline.stages import online_rl

DATA = Path(__file__).resolve().parents[1] / "data"
TRAIN = {"learning_rate": 1e-3, "max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 100}


def rules(*specs: dict) -> list[schema.RuleReward]:
    return [schema.RuleReward(**spec) for spec in specs]


# ------------------------------------------------------------------------------------------------ rule rewards


def test_rule_rewards_by_hand():
    rows = [{"answer": "7"}, {"answer": "12"}, {"answer": "5"}, {"answer": None}]
    completions = ["3 + 4 = 7", "it is 12 or 13", "5", "7"]
    assert rule_rewards(rules({"type": "exact_match"}), completions, rows) == [1.0, 0.0, 1.0, 0.0]
    assert rule_rewards(rules({"type": "contains_answer"}), completions, rows) == [1.0, 1.0, 1.0, 0.0]
    penalty = rules({"type": "length_penalty", "target_length": 5, "weight": 2.0})
    # lengths 9, 14, 1, 1 -> -(4/5)*2, -(9/5)*2, 0, 0
    assert rule_rewards(penalty, completions, rows) == pytest.approx([-1.6, -3.6, 0.0, 0.0])
    mixed = rules({"type": "exact_match", "weight": 0.5}, {"type": "contains_answer", "field": "other"})
    assert rule_rewards(mixed, ["8"], [{"answer": "8", "other": "x8"}]) == [0.5]
    assert rule_rewards([], ["a"], [{}]) == [0.0]


def test_trl_rule_reward_adapter_reads_columns_and_ignores_trainer_extras():
    completions = [[{"role": "assistant", "content": "3 + 4 = 7"}], [{"role": "assistant", "content": "3 + 4 = 8"}]]
    rewards = online_rl.rule_reward(prompts=[[], []], completions=completions, completion_ids=[[1], [2]],
                                    rules=rules({"type": "exact_match"}), answer=["7", "7"], trainer_state=object(),
                                    log_extra=print, log_metric=print)
    assert rewards == [1.0, 0.0]
    assert online_rl.rule_reward([], ["x 5"], rules=rules({"type": "contains_answer"}), answer=["5"]) == [1.0]


def test_reward_functions_pair_model_with_its_tokenizer():
    cfg = SimpleNamespace(rewards=rules({"type": "exact_match"}))
    model, tokenizer = object(), object()
    funcs, classes = online_rl.reward_functions(cfg, model, tokenizer)
    # the reward model is wrapped so TRL scores it as the reward stage trained it (measures.reward_text)
    assert funcs[0].func is online_rl.reward_model_score and funcs[0].keywords == {"model": model, "tokenizer": tokenizer}
    assert classes == [None, None]
    assert funcs[1](prompts=[[]], completions=["= 3"], answer=["3"]) == [1.0]
    funcs, classes = online_rl.reward_functions(SimpleNamespace(rewards=[]), None, None)
    assert funcs == [] and classes == []


def test_group_size_must_divide_the_generation_batch(tmp_path):
    from contexts import stage_ctx

    def ctx(**train):
        return stage_ctx(tmp_path, {"kind": "grpo", "model": "m", "rewards": [{"type": "exact_match"}],
                                    "num_generations": 2, "train": train}, name="grpo")

    with pytest.raises(PipelineError, match="num_generations"):
        online_rl.check_group_size(ctx(batch_size=3))
    online_rl.check_group_size(ctx(batch_size=1, grad_accum=2))


def test_schema_needs_a_reward_and_kto_a_batch_for_its_kl():
    data = {"path": "x.jsonl"}
    with pytest.raises(ValueError, match="reward_model"):
        schema.GrpoStage(kind="grpo", model="m", data=data)
    with pytest.raises(ValueError, match="batch_size"):
        schema.KtoStage(kind="kto", model="m", data=data, train={"batch_size": 1})
    assert schema.KtoStage(kind="kto", model="m", data=data, loss_type="apo_zero_unpaired", train={"batch_size": 1})


# ------------------------------------------------------------------------------------------- tiny end-to-end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny ChatML tokenizer, Llama policy and Llama reward model, saved as folders."""
    from tiny_models import save_tiny_chat_model

    root = tmp_path_factory.mktemp("tiny")
    texts = [row["prompt"] + " " + row["chosen"] for row in map(json.loads, open(DATA / "preferences.jsonl"))]
    save_tiny_chat_model(root / "policy", texts)
    save_tiny_chat_model(root / "rm", texts, reward=True, seed=None)  # drawn right after the policy's weights
    return root


def run_stage(tmp_path: Path, name: str, stage: dict):
    from pipeline.recipe import parse_recipe
    from pipeline.runner import run_recipe

    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": {name: stage}},
                          tmp_path / "recipe.yaml")
    return run_recipe(recipe)[name]


def changed(before: Path, after) -> bool:
    """Whether any weight of `after` (a model) differs from the same-named weight saved in `before`."""
    import torch
    from safetensors.torch import load_file

    old = load_file(before / "model.safetensors")
    new = after.state_dict()
    assert set(old) <= set(new)
    return any(not torch.equal(old[k], new[k]) for k in old)


def prompt_data(max_rows: int = 8) -> dict:
    return {"path": str(DATA / "prompts.jsonl"), "eval_path": str(DATA / "prompts_eval.jsonl"),
            "max_rows": max_rows, "max_eval_rows": 4}


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_online_rl_with_reward_model_and_rule(kind, tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    stage = {"kind": kind, "model": str(tiny / "policy"), "reward_model": str(tiny / "rm"),
             "rewards": [{"type": "exact_match"}], "data": prompt_data(), "train": TRAIN,
             "num_generations": 2, "max_new_tokens": 8}
    artifact = run_stage(tmp_path, kind, stage)
    model = AutoModelForCausalLM.from_pretrained(artifact.path)
    assert changed(tiny / "policy", model)
    metrics = artifact.manifest["metrics"]
    for when in ("before", "after"):
        assert metrics[f"eval_exact_match_{when}"] == pytest.approx(0.0)  # a random tiny model cannot add
        assert metrics[f"eval_rule_reward_{when}"] == pytest.approx(0.0)
        assert isinstance(metrics[f"eval_reward_{when}"], float)
    assert metrics["eval_prompts"] == 4 and metrics["train_prompts"] == 8
    logged = {key for entry in artifact.manifest["log_history"] for key in entry}
    assert {"rewards/reward_model_score/mean", "rewards/rule_reward/mean"} <= logged  # TRL used both reward functions
    assert artifact.manifest["kind"] == kind


@pytest.mark.slow
def test_rloo_lora_adapter_with_rules_only(tiny, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM

    rewards = [{"type": "contains_answer"}, {"type": "length_penalty", "target_length": 4}]  # lengths vary
    stage = {"kind": "rloo", "model": str(tiny / "policy"), "rewards": rewards,
             "data": prompt_data(), "train": TRAIN, "num_generations": 2, "max_new_tokens": 8,
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    artifact = run_stage(tmp_path, "rloo", stage)
    assert (artifact.path / "adapter_model.safetensors").exists()
    model = AutoPeftModelForCausalLM.from_pretrained(artifact.path)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) for p in lora_b)  # peft starts B at zero
    assert "eval_reward_before" not in artifact.manifest["metrics"]  # no reward model configured
    assert "eval_rule_reward_after" in artifact.manifest["metrics"]


def test_kto_on_paired_preferences(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    data = {"path": str(DATA / "preferences.jsonl"), "eval_path": str(DATA / "preferences_eval.jsonl"),
            "max_rows": 4, "max_eval_rows": 4}
    artifact = run_stage(tmp_path, "kto", {"kind": "kto", "model": str(tiny / "policy"), "data": data,
                                           "train": {**TRAIN, "max_steps": 1}})
    assert changed(tiny / "policy", AutoModelForCausalLM.from_pretrained(artifact.path))
    metrics = artifact.manifest["metrics"]
    assert metrics["train_rows"] == 8 and metrics["train_desirable"] == 4  # each pair -> one good, one bad row
    assert {"eval_margin_before", "eval_margin_after", "eval_preference_accuracy_after"} <= set(metrics)
    assert metrics["eval_margin_before"] != metrics["eval_margin_after"]


def write_unpaired(folder: Path) -> Path:
    rows = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b + (0 if good else 1)}",
             "label": good} for a in range(3) for b in range(2) for good in (True, False)]
    path = folder / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unpaired_kto_data_is_detected_and_validated(tmp_path):
    from pipeline import data
    from pipeline.errors import DataError

    path = write_unpaired(tmp_path)
    section = schema.DataSection(path=str(path), eval_fraction=0.25, max_rows=8)
    loaded = data.load_data(section, "kto", seed=0)
    assert len(loaded.train) == 8 and len(loaded.eval) == 3  # 3 of the file's 12 rows held out, max_rows cuts the rest
    assert loaded.held_out["held_out_rows"] == 3 and loaded.held_out["train_rows"] == 8
    assert set(loaded.train.column_names) == {"prompt", "completion", "label"}
    for row in list(loaded.train) + list(loaded.eval):  # labels stay with their own completions
        a, b, c = map(int, row["completion"][0]["content"].replace("+", "=").split("="))
        assert row["completion"][0]["role"] == "assistant" and row["label"] == (a + b == c)
    assert data.load_data(schema.DataSection(path=str(DATA / "preferences.jsonl"), max_rows=2), "kto").format \
        != "kto-unpaired"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n")
    with pytest.raises(DataError, match="label"):
        data.load_data(schema.DataSection(path=str(bad)), "kto", seed=0)


@pytest.mark.slow
def test_kto_on_unpaired_rows(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    data = {"path": str(write_unpaired(tmp_path)), "eval_fraction": 0.25}
    artifact = run_stage(tmp_path, "kto", {"kind": "kto", "model": str(tiny / "policy"), "data": data,
                                           "train": {**TRAIN, "max_steps": 1}})
    assert changed(tiny / "policy", AutoModelForCausalLM.from_pretrained(artifact.path))
    metrics = artifact.manifest["metrics"]
    assert metrics["train_rows"] == 9
    assert metrics["eval_label_margin_before"] != metrics["eval_label_margin_after"]


def chain(tiny: Path, reward_model: str) -> dict:
    prefs = {"path": str(DATA / "preferences.jsonl"), "max_rows": 8}
    return {"reward": {"kind": "reward", "model": str(tiny / "policy"), "data": prefs,
                       "train": {**TRAIN, "max_steps": 1}},
            "grpo": {"kind": "grpo", "model": str(tiny / "policy"), "reward_model": reward_model,
                     "data": prompt_data(4), "train": {**TRAIN, "max_steps": 1}, "num_generations": 2,
                     "max_new_tokens": 4}}


def test_reward_model_reference_must_name_a_reward_stage(tmp_path):
    from pipeline.recipe import parse_recipe

    folder = tmp_path / "m"
    (folder / "policy").mkdir(parents=True)
    stages = chain(folder, "${reward}")
    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": stages}, tmp_path / "r.yaml")
    assert recipe.parents["grpo"] == ["reward"]
    stages["grpo"]["reward_model"] = "${grpo_parent}"
    stages = {"grpo_parent": {**stages["grpo"], "reward_model": "${reward}"}, **stages}
    with pytest.raises(RecipeError, match="reward_model.*needs a reward-model"):
        parse_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": stages}, tmp_path / "r.yaml")


@pytest.mark.slow
def test_chain_reward_then_grpo_by_reference(tiny, tmp_path):
    from pipeline.recipe import parse_recipe
    from pipeline.runner import run_recipe

    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": chain(tiny, "${reward}")},
                          tmp_path / "recipe.yaml")
    done = run_recipe(recipe)
    manifest = done["grpo"].manifest
    assert manifest["resolved_references"]["reward"] == str(done["reward"].path.resolve())
    assert "eval_reward_after" in manifest["metrics"]
