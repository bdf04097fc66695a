"""The one explicit registry: stage kind -> (its config class, the module whose `run(ctx)` trains it).

Modules are imported only when a stage runs, so validating a recipe never imports torch.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from pipeline import schema

STAGES: dict[str, tuple[type[schema.StageBase], str]] = {
    "tokenizer": (schema.TokenizerStage, "pipeline.stages.tokenizer"),
    "pretrain": (schema.PretrainStage, "pipeline.stages.pretrain"),
    "sft": (schema.SftStage, "pipeline.stages.sft"),
    "reward": (schema.RewardStage, "pipeline.stages.reward"),
    "dpo": (schema.DpoStage, "pipeline.stages.dpo"),
    "kto": (schema.KtoStage, "pipeline.stages.kto"),
    "merge": (schema.MergeStage, "pipeline.stages.merge"),
    "ppo": (schema.PpoStage, "pipeline.stages.ppo"),
    "grpo": (schema.GrpoStage, "pipeline.stages.grpo"),
    "rloo": (schema.RlooStage, "pipeline.stages.rloo"),
    "evaluate": (schema.EvaluateStage, "pipeline.stages.evaluate"),
    "export": (schema.ExportStage, "pipeline.stages.export"),
}


def config_class(kind: str) -> type[schema.StageBase] | None:
    entry = STAGES.get(kind)
    return entry[0] if entry else None


def stage_module(kind: str) -> ModuleType:
    """Import the module that runs stages of `kind`."""
    return importlib.import_module(STAGES[kind][1])
