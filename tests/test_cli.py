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
