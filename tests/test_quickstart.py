"""The shipped quickstart recipe end to end, and the effect each stage claims, on several seeds.

    pytest tests/test_quickstart.py              # seed 0: every artifact loads, every goal holds (about 2 minutes)
    pytest -m slow tests/test_quickstart.py      # seeds 1 and 2 as well

The goals are `bench/quickstart.py`'s GOALS (the same list writes the README's table): each is read from the
manifests of a full `recipes/quickstart.yaml` run with `seed=N` (held-out data: see data/make_data.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quickstart.yaml"


def _bench():
    if str(ROOT / "bench") not in sys.path:  # the bench scripts import their library, bench/common.py, as `common`
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_quickstart", ROOT / "bench" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


GOALS = _bench().GOALS


def run_quickstart(output: Path, overrides: list[str]) -> dict[str, dict]:
    """Run the quickstart from the repo root; return each stage's manifest."""
    from pipeline import runner
    from pipeline.recipe import load_recipe

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        recipe = load_recipe(RECIPE, [f"output_dir={output}", *overrides])
        runner.run_recipe(recipe)
    finally:
        os.chdir(cwd)
    return {name: json.loads((output / name / "manifest.json").read_text()) for name in recipe.stages}


@pytest.fixture(scope="session", params=[0, pytest.param(1, marks=pytest.mark.slow),
                                         pytest.param(2, marks=pytest.mark.slow)], ids=lambda s: f"seed{s}")
def quickstart(request, tmp_path_factory):
    output = tmp_path_factory.mktemp(f"quickstart_seed{request.param}") / "out"
    return output, run_quickstart(output, [f"seed={request.param}"])


@pytest.mark.parametrize("goal", [pytest.param(goal, id=f"{goal.stage}: {goal.text}") for goal in GOALS])
def test_stage_effect_holds(quickstart, goal):
    metrics = quickstart[1][goal.stage]["metrics"]
    assert goal.holds(metrics), f"{goal.stage}: {goal.text} does not hold: {metrics}"


def test_quickstart_artifacts_load(quickstart):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    output, manifests = quickstart
    assert set(manifests) == {"tokenizer", "base", "sft", "reward", "dpo", "ppo", "grpo"}
    AutoTokenizer.from_pretrained(output / "tokenizer")
    AutoModelForCausalLM.from_pretrained(output / "base")
    AutoModelForSequenceClassification.from_pretrained(output / "reward")
    for name in ("sft", "dpo", "ppo", "grpo"):  # LoRA stages
        AutoPeftModelForCausalLM.from_pretrained(output / name)
    assert manifests["sft"]["parents"][0]["stage"] == "base"
    assert manifests["dpo"]["parents"][0]["fingerprint"] == manifests["sft"]["fingerprint"]
    assert {p["stage"] for p in manifests["ppo"]["parents"]} == {"sft", "reward"}


def test_quickstart_ppo_uses_the_learned_reward_alone(quickstart):
    """The PPO gain must be RLHF's: no rule reward in the quickstart's PPO stage."""
    config = quickstart[1]["ppo"]["config"]
    assert not config.get("rewards")
    assert config["reward_model"]
