"""A stage kind is one record (`pipeline.registry.StageKind`): a toy kind added in that one place is validated by
its data shape, run through the course, shown with its live figures and reported with RL curves; and the floor of
the package (the contract, schema, recipe, registry, data, models) imports nothing above it.

Run: `pytest tests/test_stage_kinds.py` (in-process runs of a one-stage recipe, seconds).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from pipeline import registry
from pipeline.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "pipeline"
# The floor: the stage contract and what it stands on. Each may import only the others (and no module above).
FLOOR = {"errors", "names", "chat_templates", "schema", "data", "models", "registry", "recipe", "console", "stage"}


@pytest.fixture
def toy_kind(monkeypatch):
    """The toy kind registered, as a new kind would be: one entry."""
    from toy_stage import ToyStage

    monkeypatch.setitem(registry.STAGES, "toy", registry.StageKind(
        ToyStage, "toy_stage", data_shape="prompts", figures=(("reward", "reward"), ("kl", "kl")),
        samples_episodes=True))


def _recipe(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "output_dir": str(tmp_path / "out"),
                                    "stages": {"toy": {"kind": "toy", "data": {"path": str(data)}}}}))
    return path


def test_a_toy_kind_is_validated_by_its_traits(toy_kind, tmp_path, capsys):
    wrong = tmp_path / "texts.jsonl"
    wrong.write_text('{"text": "no prompt here"}\n')
    assert main(["validate", "--deep", str(_recipe(tmp_path, wrong))]) == 2
    err = capsys.readouterr().err
    assert "a toy stage needs 'prompt'" in err and "stages.toy.data.fields" in err, err
    assert main(["validate", "--deep", str(_recipe(tmp_path, ROOT / "data" / "prompts.jsonl"))]) == 0
    bad_group = yaml.safe_load(_recipe(tmp_path, ROOT / "data" / "prompts.jsonl").read_text())
    bad_group["stages"]["toy"]["train"] = {"group_by_length": True}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad_group))
    assert main(["validate", str(tmp_path / "bad.yaml")]) == 2  # an unknown key here: toy has no train section


def test_a_toy_kind_runs_through_the_course_and_shows_its_figures(toy_kind, tmp_path, capsys):
    recipe = _recipe(tmp_path, ROOT / "data" / "prompts.jsonl")
    assert main(["run", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "[1/1] toy (toy): running" in out
    progress = [line for line in out.splitlines() if line.startswith("  toy ")]
    assert progress and progress[-1].split()[1] == "6/6", out
    assert "reward" in progress[-1] and "kl" in progress[-1] and "episodes/s" in progress[-1], progress
    manifest = json.loads((tmp_path / "out" / "toy" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["eval_value_before"] == 0.0 and metrics["eval_value_after"] > 0 and metrics["steps"] == 6
    assert [a["last_checkpoint_step"] for a in manifest["attempts"]] == [4]  # the course's checkpoint hook
    assert len(manifest["log_history"]) == 6
    assert json.loads((tmp_path / "out" / "toy" / "value.json").read_text())["value"] == metrics["eval_value_after"]


def test_a_toy_kind_gets_rl_curves_in_the_report_and_a_docs_section(toy_kind, tmp_path, capsys):
    from pipeline.tools import docs_gen, report

    assert main(["run", str(_recipe(tmp_path, ROOT / "data" / "prompts.jsonl"))]) == 0
    report.write_report(tmp_path / "out")
    assert (tmp_path / "out" / report.ASSETS / "rl_toy.png").exists()
    assert "### `toy`" in docs_gen.generate()


def test_an_unregistered_kind_in_an_old_manifest_gets_plain_traits():
    assert registry.traits("gone") == registry.OTHER and not registry.traits("gone").samples_episodes


def _imports(path: Path) -> set[str]:
    """The pipeline modules a file imports anywhere (functions included), as names under `pipeline.`; imports for
    type annotations only (under `if TYPE_CHECKING:`) are left out."""
    tree = ast.parse(path.read_text())
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            names = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return {name.removeprefix("pipeline.").split(".")[0] for name in found}


@pytest.mark.parametrize("module", sorted(FLOOR))
def test_the_floor_imports_nothing_above_it(module):
    above = _imports(PIPELINE / f"{module}.py") - FLOOR
    assert not above, f"pipeline/{module}.py imports {sorted(above)}, which sit above the floor"


def test_the_package_holds_no_bench_code():
    offenders = [str(p.relative_to(ROOT)) for p in PIPELINE.rglob("*.py") if "bench" in p.stem]
    offenders += [str(p.relative_to(ROOT)) for p in PIPELINE.rglob("*.py") if "import bench" in p.read_text()]
    assert not offenders, offenders


def test_each_registry_is_built_on_the_names_the_schema_checks():
    from pipeline import names
    from pipeline.eval import metrics
    from pipeline.rl import rewards, tools

    assert tuple(rewards.RULES) == names.REWARD_RULES
    assert tuple(tools.TOOLS) == names.TOOLS
    assert metrics.METRICS == names.METRICS and all(metrics.path(name).exists() for name in names.METRICS)
