"""A Hub token never reaches logs, manifests, model cards or any written file: HF_TOKEN is set to a realistic fake
(also pasted into the recipe's descriptions), a tiny recipe runs, and every written file and captured output is
searched for it.

Run: `pytest tests/test_secrets.py` (one tiny CLI run, ~15 s).
"""
from __future__ import annotations

from resilience_common import cli, tiny_recipe, write_recipe

FAKE = "hf_FAKEaBcDeFgHiJkLmNoPqRsTuVwXyZ0123456"


def test_token_never_written_or_logged(tmp_path):
    recipe = tiny_recipe(tmp_path, stages=("tokenizer", "base"), steps=2)
    recipe["description"] = f"trained with token {FAKE}"
    recipe["stages"]["base"]["description"] = f"token={FAKE}"
    path = write_recipe(tmp_path, recipe)
    result = cli("run", str(path), extra_env={"HF_TOKEN": FAKE, "HUGGING_FACE_HUB_TOKEN": FAKE,
                                              "PIPELINE_LOG_LEVEL": "DEBUG"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert FAKE not in result.stdout and FAKE not in result.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "manifest.json" for p in written) and any(p.name == "README.md" for p in written)
    leaked = [str(p) for p in written if FAKE.encode() in p.read_bytes()]
    assert leaked == [], f"token written to {leaked}"
    assert "***" in (tmp_path / "out/base/manifest.json").read_text(), "the description is kept, token masked"
