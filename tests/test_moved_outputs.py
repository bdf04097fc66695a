"""An output folder moved whole (to another disk or machine) still loads: a LoRA adapter names its base by absolute
path, and the stages after it find that base again beside it by the fingerprint its manifest records.

    .venv/bin/python -m pytest tests/test_moved_outputs.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from conftest import tiny_lora_chain_recipe

from pipeline import models
from pipeline import recipe as recipe_lib
from pipeline import runner


def run(spec: dict, folder: Path) -> None:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner.run_recipe(recipe_lib.load_recipe(path))


def merged_weights(adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in models.load_adapter(adapter, merge=True).state_dict().items()}


def test_a_moved_output_folder_skips_its_stages_and_later_stages_load_its_adapter(tmp_path):
    first, moved = tmp_path / "first" / "out", tmp_path / "moved" / "out"
    first.parent.mkdir()
    spec = tiny_lora_chain_recipe(first, "moved")
    run(spec, first.parent)
    expected = merged_weights(first / "sft")
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    recorded = models.recorded_base(moved / "sft")
    assert recorded == str(first / "base") and not Path(recorded).exists()
    assert models.base_model_of(moved / "sft") == str(moved / "base")

    manifests = {stage: (moved / stage / "manifest.json").read_text() for stage in spec["stages"]}
    spec = {**spec, "output_dir": str(moved),
            "stages": {**spec["stages"], "merged": {"kind": "merge", "model": "${sft}"}}}
    run(spec, moved.parent)
    assert {stage: (moved / stage / "manifest.json").read_text() for stage in manifests} == manifests  # skipped
    merged = json.loads((moved / "merged" / "manifest.json").read_text())
    assert merged["complete"] and merged["base_model"] == str(moved / "base")
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(moved / "merged").state_dict()
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_moved_base_is_found_only_by_its_fingerprint(tmp_path):
    spec = tiny_lora_chain_recipe(tmp_path / "out", "moved-fp")
    spec["stages"].pop("sft")
    run(spec, tmp_path)
    adapter = tmp_path / "elsewhere" / "sft"
    adapter.mkdir(parents=True)
    gone = str(tmp_path / "gone" / "base")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": gone}))
    fingerprint = json.loads((tmp_path / "out" / "base" / "manifest.json").read_text())["fingerprint"]
    shutil.copytree(tmp_path / "out" / "base", adapter.parent / "base")
    for recorded_fingerprint, found in ((fingerprint, str(adapter.parent / "base")), ("0" * 64, gone)):
        (adapter / "manifest.json").write_text(json.dumps(
            {"parents": [{"stage": "base", "fingerprint": recorded_fingerprint, "path": gone}]}))
        assert models.base_model_of(adapter) == found
    (adapter / "manifest.json").unlink()  # no manifest: the recorded path, for peft's own error to name
    assert models.base_model_of(adapter) == gone
