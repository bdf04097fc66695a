"""Security: remote code only when a recipe asks (with a warning), safetensors only (pickle-only folders refused
before any training), recipes cannot run code (see also tests/bad_recipes/python_tag.yaml), and nothing is written
outside the output folder.

Run: `pytest tests/test_security.py` (no training; a few seconds).
"""
from __future__ import annotations

import json
import warnings

import pytest

from pipeline import artifacts, models, schema
from pipeline.errors import RecipeError, SecurityError
from pipeline.recipe import parse_recipe
from resilience_common import ROOT, cli, write_recipe


def test_remote_code_off_unless_the_recipe_sets_it():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.remote_code_flag(schema.ModelSection(path="org/model")) is False
        assert models.remote_code_flag(None) is False
    with pytest.warns(UserWarning, match="trust_remote_code is on"):
        assert models.remote_code_flag(schema.ModelSection(path="org/model", trust_remote_code=True)) is True


def test_loading_always_asks_for_safetensors():
    kwargs = models._load_kwargs(schema.ModelSection(path="org/model"))
    assert kwargs["use_safetensors"] is True and kwargs["trust_remote_code"] is False


def _pickle_only(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return folder


def test_pickle_only_folder_refused(tmp_path):
    folder = _pickle_only(tmp_path / "legacy")
    with pytest.raises(SecurityError, match="only pickle weights"):
        models.check_safe_weights(folder)
    (folder / "model.safetensors").write_bytes(b"")
    models.check_safe_weights(folder)  # safetensors present: accepted


def test_pickle_only_folder_refused_by_cli_before_anything_is_written(tmp_path):
    folder = _pickle_only(tmp_path / "legacy")
    recipe = {"name": "legacy", "output_dir": str(tmp_path / "out"),
              "stages": {"sft": {"kind": "sft", "model": str(folder), "data": {"path": str(ROOT / "data/sft.jsonl")},
                                 "train": {"max_length": 32}}}}
    result = cli("run", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "only pickle weights" in lines[0] and "safetensors" in lines[0]
    assert "stages.sft.model.path" in lines[0] and "recipe.yaml" in lines[0]
    assert not (tmp_path / "out").exists()


def test_stage_names_that_escape_are_schema_errors(tmp_path):
    for name in ("../x", "a/b", "/abs", ".hidden"):
        with pytest.raises(RecipeError, match="letters, digits"):
            parse_recipe({"name": "r", "stages": {name: {"kind": "tokenizer", "data": {"path": "x.jsonl"}}}},
                         tmp_path / "r.yaml")


@pytest.mark.parametrize("stage", ["../x", "../../etc", "a/../../b", "", "."])
def test_artifact_writer_refuses_targets_outside_output_dir(tmp_path, stage):
    with pytest.raises(SecurityError, match="outside the output folder"):
        artifacts.ArtifactWriter(tmp_path / "out", stage, "f" * 64)
    assert not (tmp_path / "x").exists()


def test_artifact_writer_accepts_normal_names(tmp_path):
    writer = artifacts.ArtifactWriter(tmp_path / "out", "sft", "f" * 64)
    assert writer.final == tmp_path / "out" / "sft"


def test_symlinked_stage_folder_pointing_outside_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "sft").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SecurityError):
        artifacts.ArtifactWriter(tmp_path / "out", "sft", "f" * 64)
