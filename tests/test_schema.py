"""Recipe loading without training: references and ordering, typed references, cycles, overrides, defaults,
strict keys with did-you-mean and line numbers, and what changes a stage's fingerprint.

    pytest tests/test_schema.py
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline import runner
from pipeline.errors import RecipeError
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def chain(**extra_stages) -> dict:
    """A small valid recipe (tokenizer -> base -> sft/reward -> dpo), stages deliberately out of order."""
    model = {"architecture": "llama", "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                                 "num_attention_heads": 2, "num_key_value_heads": 1}}
    prefs = {"path": str(DATA / "preferences.jsonl")}
    stages = {
        "dpo": {"kind": "dpo", "model": "${sft}", "data": prefs},
        "sft": {"kind": "sft", "model": "${base}", "data": {"path": str(DATA / "sft.jsonl")},
                "train": {"learning_rate": 3e-4}},
        "base": {"kind": "pretrain", "tokenizer": "${tokenizer}", "model": model,
                 "data": {"path": str(DATA / "corpus.jsonl")}},
        "reward": {"kind": "reward", "model": "${base}", "data": prefs},
        "tokenizer": {"kind": "tokenizer", "data": {"path": str(DATA / "corpus.jsonl")}, "vocab_size": 300},
    }
    stages.update(extra_stages)
    return {"name": "schema-test", "output_dir": "out", "seed": 1, "defaults": {"train": {"batch_size": 4}},
            "stages": stages}


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_stages_run_after_what_they_reference(tmp_path):
    recipe = load_recipe(write(tmp_path, chain()))
    order = list(recipe.stages)
    assert order.index("tokenizer") < order.index("base") < order.index("sft") < order.index("dpo")
    assert order.index("base") < order.index("reward")
    assert recipe.parents["dpo"] == ["sft"] and recipe.parents["base"] == ["tokenizer"]


def test_cycle_is_rejected(tmp_path):
    data = chain()
    data["stages"]["sft"]["model"] = "${dpo}"
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(write(tmp_path, data))


def test_reference_to_unknown_stage_suggests_a_name(tmp_path):
    data = chain()
    data["stages"]["dpo"]["model"] = "${sf}"
    with pytest.raises(RecipeError, match="unknown stage") as err:
        load_recipe(write(tmp_path, data))
    assert "${sft}" in err.value.render()


def test_reference_must_produce_the_right_kind(tmp_path):
    data = chain()
    data["stages"]["dpo"]["model"] = "${reward}"  # a reward model is not a policy
    with pytest.raises(RecipeError, match="reward-model"):
        load_recipe(write(tmp_path, data))
    data = chain()
    data["stages"]["sft"]["model"] = "${tokenizer}"
    with pytest.raises(RecipeError, match="tokenizer artifact"):
        load_recipe(write(tmp_path, data))


def test_override_changes_a_value(tmp_path):
    path = write(tmp_path, chain())
    assert load_recipe(path).stages["sft"].train.learning_rate == pytest.approx(3e-4)
    recipe = load_recipe(path, ["stages.sft.train.learning_rate=1e-4", "output_dir=elsewhere"])
    assert recipe.stages["sft"].train.learning_rate == pytest.approx(1e-4)
    assert recipe.output_dir == Path("elsewhere")


@pytest.mark.parametrize("override, pattern", [
    ("stages.sft.train.learning_rate=-1", "greater than 0"),
    ("stages.sft.train.learnin_rate=1e-4", "learning_rate"),
    ("stages.sft.train.learning_rate", "KEY=VALUE"),
    ("stages.sft.kind.x=1", "not a section"),
])
def test_bad_override_errors(tmp_path, override, pattern):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, chain()), [override])
    assert pattern in err.value.render()


def test_defaults_merge_and_stage_values_win(tmp_path):
    data = chain()
    data["defaults"]["train"] = {"batch_size": 4, "learning_rate": 1e-3}
    recipe = load_recipe(write(tmp_path, data))
    assert recipe.stages["reward"].train.batch_size == 4
    assert recipe.stages["reward"].train.learning_rate == pytest.approx(1e-3)
    assert recipe.stages["sft"].train.learning_rate == pytest.approx(3e-4)  # the stage's own value wins


def test_unknown_key_did_you_mean_with_line(tmp_path):
    text = textwrap.dedent(f"""\
        name: typo
        stages:
          sft:
            kind: sft
            model: org/model
            data: {{path: {DATA / 'sft.jsonl'}}}
            train:
              learnig_rate: 1.0e-4
        """)
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    rendered = err.value.render()
    assert "learning_rate" in rendered and "unknown key" in rendered
    assert err.value.line == 8


def test_unknown_stage_kind_did_you_mean(tmp_path):
    data = chain()
    data["stages"]["reward"]["kind"] = "rewrd"
    with pytest.raises(RecipeError, match="unknown stage kind") as err:
        load_recipe(write(tmp_path, data))
    assert "'reward'" in err.value.render()


def fingerprints(path: Path, overrides: list[str] | None = None) -> dict[str, str]:
    return {name: fp for name, fp, _ in runner.plan(load_recipe(path, overrides))}


def test_fingerprint_changes_with_config_and_propagates(tmp_path):
    path = write(tmp_path, chain())
    before = fingerprints(path)
    after = fingerprints(path, ["stages.sft.train.learning_rate=1e-4"])
    assert after["sft"] != before["sft"] and after["dpo"] != before["dpo"]  # children change with their parent
    assert after["base"] == before["base"] and after["reward"] == before["reward"]


def test_fingerprint_ignores_description_and_logging(tmp_path):
    path = write(tmp_path, chain())
    before = fingerprints(path)
    after = fingerprints(path, ["stages.sft.description=hello", "stages.sft.train.logging_steps=3"])
    assert after == before


def test_fingerprint_changes_when_data_bytes_change(tmp_path):
    data_file = tmp_path / "sft.jsonl"
    data_file.write_bytes((DATA / "sft.jsonl").read_bytes())
    spec = chain()
    spec["stages"]["sft"]["data"]["path"] = str(data_file)
    path = write(tmp_path, spec)
    before = fingerprints(path)
    with open(data_file, "a") as handle:
        handle.write(
            '{"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "1 + 1 = 2"}]}\n')
    after = fingerprints(path)
    assert after["sft"] != before["sft"] and after["dpo"] != before["dpo"]
    assert after["base"] == before["base"]
