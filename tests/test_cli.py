"""CLI argument handling: dotted overrides may come after --force/--only; stray arguments are usage errors (exit 2).

    pytest tests/test_cli.py
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "cli", "output_dir": str(tmp_path / "out"), "stages": {
        "tok": {"kind": "tokenizer", "vocab_size": 300,
                "data": {"path": str(ROOT / "data/corpus.jsonl"), "max_rows": 200}}}}))
    return path


def test_overrides_after_force_are_applied(tmp_path):
    recipe = tokenizer_recipe(tmp_path)
    assert main(["run", str(recipe), "--force", "tok", "stages.tok.vocab_size=310"]) == 0
    manifest = json.loads((tmp_path / "out/tok/manifest.json").read_text())
    assert manifest["config"]["vocab_size"] == 310


def test_stray_argument_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tokenizer_recipe(tmp_path)), "--only", "tok", "not-an-override"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def two_stage_recipe(tmp_path: Path) -> Path:
    """tok -> base (a tiny pretrain that needs tok)."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "cli", "output_dir": str(tmp_path / "out"), "stages": {
        "tok": {"kind": "tokenizer", "vocab_size": 300,
                "data": {"path": str(ROOT / "data/corpus.jsonl"), "max_rows": 200}},
        "base": {"kind": "pretrain", "tokenizer": "${tok}",
                 "model": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "max_position_embeddings": 64}},
                 "data": {"path": str(ROOT / "data/corpus.jsonl"), "max_rows": 16},
                 "train": {"max_steps": 1, "max_length": 64}}}}))
    return path


def test_only_an_early_stage_on_a_fresh_run_leaves_later_stages_for_later(tmp_path, capsys):
    """`--only tok` on a fresh output folder runs tok and leaves the stage after it unrun (exit 0)."""
    assert main(["run", str(two_stage_recipe(tmp_path)), "--only", "tok"]) == 0
    assert (tmp_path / "out/tok/manifest.json").exists() and not (tmp_path / "out/base").exists()
    assert "base (pretrain): not selected, not run" in capsys.readouterr().out


def test_only_a_stage_whose_parent_is_missing_fails_before_anything_runs(tmp_path, capsys):
    assert main(["run", str(two_stage_recipe(tmp_path)), "--only", "base"]) == 2
    err = capsys.readouterr().err.strip()
    assert "stage 'tok' has no complete artifact yet" in err and "--only tok" in err, err
    assert not (tmp_path / "out/tok").exists() and not (tmp_path / "out/base").exists()
