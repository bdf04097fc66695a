"""Checks run on the whole recipe before any training, so a run does not fail an hour in.

Called by `pipeline run` (and `pipeline validate --deep`). Raises `PipelineError` (exit 2, one line) on the first
problem. Issue #6 extends this with deeper checks (columns, chat templates, LoRA targets, tokenizer agreement).
"""
from __future__ import annotations

from pipeline.recipe import Recipe


def check(recipe: Recipe) -> None:
    """Recipe-wide checks that need no model weights."""
    for name, config in recipe.stages.items():
        if config.kind in NOT_AVAILABLE:
            from pipeline.errors import RecipeError

            raise RecipeError(NOT_AVAILABLE[config.kind], file=str(recipe.path), key=f"stages.{name}.kind",
                              fix="remove this stage for now")


NOT_AVAILABLE: dict[str, str] = {}
