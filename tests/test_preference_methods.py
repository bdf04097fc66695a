"""The preference methods by name: `ipo` (TRL DPOTrainer, IPO loss), `cpo` and `simpo` (TRL's experimental
CPOTrainer) and `orpo` (TRL's experimental ORPOTrainer), each run through the runner on a tiny Llama policy built
here (CPU, two steps each), with its held-out before -> after measures in the manifest; and which TRL loss each
kind asks for.

Run: `.venv/bin/python -m pytest tests/test_preference_methods.py -q`
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import registry, schema

DATA = Path(__file__).resolve().parents[1] / "data"
TRAIN = {"learning_rate": 1e-2, "max_steps": 2, "batch_size": 2, "logging_steps": 1, "save_steps": 100,
         "max_length": 64}
PAIRS = {"path": str(DATA / "preferences.jsonl"), "eval_path": str(DATA / "preferences_eval.jsonl"),
         "max_rows": 8, "max_eval_rows": 4}
METHODS = ("ipo", "cpo", "simpo", "orpo")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """A tiny ChatML tokenizer and Llama policy, saved as one folder."""
    from tiny_models import save_tiny_chat_model

    texts = [row["prompt"] + " " + row["chosen"] for row in map(json.loads, open(DATA / "preferences.jsonl"))]
    return save_tiny_chat_model(tmp_path_factory.mktemp("policy"), texts)


def run_stage(tmp_path: Path, name: str, stage: dict):
    from pipeline.recipe import parse_recipe
    from pipeline.runner import run_recipe

    recipe = parse_recipe({"name": "t", "output_dir": str(tmp_path / "out"), "stages": {name: stage}},
                          tmp_path / "recipe.yaml")
    return run_recipe(recipe)[name]


def changed(before: Path, after) -> bool:
    import torch
    from safetensors.torch import load_file

    old, new = load_file(before / "model.safetensors"), after.state_dict()
    return any(not torch.equal(old[k], new[k]) for k in old)


def test_each_method_is_a_registered_pair_kind_with_its_loss():
    from pipeline.stages import cpo

    for kind in METHODS:
        entry = registry.STAGES[kind]
        assert entry.data_shape == "preference" and entry.chat_template and entry.length_grouping, kind
    assert registry.STAGES["ipo"].module == "pipeline.stages.dpo" and schema.IpoStage.loss_type == "ipo"
    simpo = schema.SimpoStage(kind="simpo", model="m", data={"path": "x.jsonl"})
    assert cpo.loss_settings(simpo) == {"loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 0.0}
    plain = schema.CpoStage(kind="cpo", model="m", data={"path": "x.jsonl"}, loss_type="hinge")
    assert cpo.loss_settings(plain) == {"loss_type": "hinge", "cpo_alpha": 1.0}
    with pytest.raises(ValueError, match="loss_type"):
        schema.CpoStage(kind="cpo", model="m", data={"path": "x.jsonl"}, loss_type="simpo")  # that is `simpo`


@pytest.mark.parametrize("kind", METHODS)
def test_method_trains_and_measures_held_out_pairs_before_and_after(kind, policy, tmp_path):
    from transformers import AutoModelForCausalLM

    artifact = run_stage(tmp_path, kind, {"kind": kind, "model": str(policy), "data": PAIRS, "train": TRAIN})
    assert artifact.manifest["kind"] == artifact.manifest["config"]["kind"] == kind
    assert changed(policy, AutoModelForCausalLM.from_pretrained(artifact.path))
    metrics = artifact.manifest["metrics"]
    assert metrics["train_pairs"] == 8
    for phase in ("before", "after"):
        assert 0.0 <= metrics[f"eval_preference_accuracy_{phase}"] <= 1.0
    assert metrics["eval_margin_before"] != metrics["eval_margin_after"]  # measured on the trained weights
    assert 0.0 <= metrics["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in metrics


def test_orpo_with_lora_saves_an_adapter(policy, tmp_path):
    from peft import AutoPeftModelForCausalLM

    stage = {"kind": "orpo", "model": str(policy), "data": PAIRS, "train": TRAIN,
             "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    artifact = run_stage(tmp_path, "orpo", stage)
    assert (artifact.path / "adapter_model.safetensors").exists()
    assert AutoPeftModelForCausalLM.from_pretrained(artifact.path) is not None
    assert artifact.manifest["metrics"]["eval_margin_before"] != artifact.manifest["metrics"]["eval_margin_after"]
