"""Stage contexts for tests that call a stage's parts directly: a real `StageContext`, built from recipe data by
`pipeline.stage.stage_context` as the runner builds one, with the world size faked for the world-size rules.

    from contexts import stage_ctx
    ctx = stage_ctx(tmp_path, {"kind": "sft", "model": "m"}, world=4, parallelism={"tp": 2})
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any


def stage_ctx(tmp_path: Path, stage: dict[str, Any], *, world: int = 1, name: str = "stage", **header: Any):
    """The context of stage `name` (recipe data `stage`; a `data.path` defaults to a one-row file in `tmp_path`)
    in a recipe with the `header` keys (e.g. parallelism=...), on a process of a `world`-process launch."""
    from pipeline.recipe import parse_recipe
    from pipeline.stage import stage_context

    rows = Path(tmp_path) / "rows.jsonl"
    rows.write_text('{"prompt": "1 + 1 =", "completion": " 2"}\n')
    stage = {"data": {"path": str(rows)}, **stage} if stage.get("kind") != "merge" else stage
    recipe = parse_recipe({"name": "test", "output_dir": str(Path(tmp_path) / "out"), **header,
                           "stages": {name: stage}}, Path(tmp_path) / "recipe.yaml")
    state = SimpleNamespace(num_processes=world, process_index=0, is_main_process=True)
    return stage_context(recipe, name, output_dir=Path(tmp_path) / "out" / name, work_dir=Path(tmp_path) / "work",
                         state=state)
