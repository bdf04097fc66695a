"""The shipped quickstart recipe end to end, into a temporary output folder.

    pytest tests/test_quickstart.py              # fast variant: few steps, artifacts load (about a minute)
    pytest -m slow tests/test_quickstart.py      # the real recipe: asserts the measured effect of each stage

The slow test reads the effects from the manifests (held-out data: see data/make_data.py): pretraining lowers
held-out loss, SFT answers some held-out prompts, the reward model ranks held-out pairs (accuracy >= 0.7), DPO widens
the chosen-over-rejected margin, PPO raises both reward-model score and exact match over the SFT policy.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"
EARLY = ("tokenizer", "base", "sft", "reward", "dpo")
FEW_STEPS = ["stages.base.train.max_steps=20", "stages.sft.train.max_steps=4", "stages.reward.train.max_steps=4",
             "stages.dpo.train.max_steps=4"]


def run_quickstart(output: Path, overrides: list[str], only: set[str] | None = None) -> dict[str, dict]:
    """Run the quickstart from the repo root; return each stage's manifest."""
    import os

    from pipeline import runner
    from pipeline.recipe import load_recipe

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load_recipe(RECIPE, [f"output_dir={output}", *overrides])
        for name in [n for n in recipe.stages if only is not None and n not in only]:
            del recipe.stages[name]  # later stages (e.g. ppo) have their own tests
        runner.run_recipe(recipe)
    finally:
        os.chdir(cwd)
    return {name: json.loads((output / name / "manifest.json").read_text())
            for name in recipe.stages if (output / name / "manifest.json").exists()}


@pytest.fixture(scope="session")
def quickstart_fast(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart_fast") / "out"
    return output, run_quickstart(output, FEW_STEPS, only=set(EARLY))


@pytest.fixture(scope="session")
def quickstart_full(tmp_path_factory):
    output = tmp_path_factory.mktemp("quickstart_full") / "out"
    return output, run_quickstart(output, [])


def test_fast_quickstart_artifacts_load(quickstart_fast):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    output, manifests = quickstart_fast
    assert set(EARLY) <= set(manifests)
    AutoTokenizer.from_pretrained(output / "tokenizer")
    AutoModelForCausalLM.from_pretrained(output / "base")
    AutoPeftModelForCausalLM.from_pretrained(output / "sft")  # the recipe trains SFT with LoRA
    AutoModelForSequenceClassification.from_pretrained(output / "reward")
    AutoPeftModelForCausalLM.from_pretrained(output / "dpo")
    assert manifests["sft"]["parents"][0]["stage"] == "base"
    assert manifests["dpo"]["parents"][0]["fingerprint"] == manifests["sft"]["fingerprint"]


def test_fast_quickstart_reports_metrics(quickstart_fast):
    _, manifests = quickstart_fast
    assert {"eval_loss_before", "eval_loss_after"} <= set(manifests["base"]["metrics"])
    assert "eval_exact_match" in manifests["sft"]["metrics"]
    assert {"eval_accuracy_before", "eval_accuracy"} <= set(manifests["reward"]["metrics"])
    assert {"eval_margin_before", "eval_margin_after"} <= set(manifests["dpo"]["metrics"])


@pytest.mark.slow
def test_pretraining_lowers_held_out_loss(quickstart_full):
    metrics = quickstart_full[1]["base"]["metrics"]
    assert metrics["eval_loss_after"] < 0.5 * metrics["eval_loss_before"]


@pytest.mark.slow
def test_sft_answers_some_held_out_facts(quickstart_full):
    metrics = quickstart_full[1]["sft"]["metrics"]
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["eval_exact_match"] > 0.0


@pytest.mark.slow
def test_reward_model_ranks_held_out_pairs(quickstart_full):
    metrics = quickstart_full[1]["reward"]["metrics"]
    assert metrics["eval_accuracy"] >= 0.7  # 50 held-out pairs: chance is 0.5 +- 0.07
    assert metrics["eval_margin"] > metrics["eval_margin_before"]


@pytest.mark.slow
def test_dpo_widens_the_margin(quickstart_full):
    metrics = quickstart_full[1]["dpo"]["metrics"]
    assert metrics["eval_margin_after"] > metrics["eval_margin_before"]
    assert metrics["eval_preference_accuracy_after"] >= metrics["eval_preference_accuracy_before"]


@pytest.mark.slow
def test_ppo_beats_the_sft_policy(quickstart_full):
    metrics = quickstart_full[1]["ppo"]["metrics"]
    assert metrics["eval_reward_after"] > metrics["eval_reward_before"]
    assert metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"]
    assert metrics["kl"] < 1.0
