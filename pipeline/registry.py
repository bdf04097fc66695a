"""The one explicit registry: stage kind -> its `StageKind` record, everything the pipeline knows about that kind in
one place: its config class, the module whose `run(ctx)` trains it, and its traits, read by the recipe loader
(length grouping), preflight (data shape, chat template), the stages (data shape), the console (live figures) and
the run report (RL curves). A new kind is a config class in `pipeline.schema`, a module under `pipeline/stages/`
and one entry in `STAGES`.

Modules are imported only when a stage runs, so validating a recipe never imports torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pipeline import schema

Figures = tuple[tuple[str, str], ...]  # live figures of a stage's progress: (log key, label)
LOSS_FIGURES: Figures = (("loss", "loss"), ("learning_rate", "lr"))
TRL_RL_FIGURES: Figures = (("reward", "reward"), ("kl", "kl"), ("loss", "loss"), ("learning_rate", "lr"))


@dataclass(frozen=True)
class StageKind:
    """One stage kind. `data_shape` names the `pipeline.data.SHAPES` entry its `data:` rows are read into (None: it
    reads no training rows); `chat_template`: its tokenizer must carry one (checked before anything trains);
    `figures`: what its progress line shows; `samples_episodes`: an online RL stage (episodes/s in its progress,
    reward/KL/entropy/length curves in the report); `length_grouping`: `train.group_by_length` applies (its trainer
    pads each batch of rows to its longest); `qlora`: `lora.quantize` applies (its trainer fine-tunes an adapter on a
    causal LM loaded in 4 or 8 bits)."""

    config: type[schema.StageBase]
    module: str
    data_shape: str | None = None
    chat_template: bool = False
    figures: Figures = LOSS_FIGURES
    samples_episodes: bool = False
    length_grouping: bool = False
    qlora: bool = False


STAGES: dict[str, StageKind] = {
    "tokenizer": StageKind(schema.TokenizerStage, "pipeline.stages.tokenizer", data_shape="text"),
    "pretrain": StageKind(schema.PretrainStage, "pipeline.stages.pretrain", data_shape="text"),
    "sft": StageKind(schema.SftStage, "pipeline.stages.sft", data_shape="sft", chat_template=True,
                     length_grouping=True, qlora=True),
    "reward": StageKind(schema.RewardStage, "pipeline.stages.reward", data_shape="preference", chat_template=True,
                        length_grouping=True),
    "dpo": StageKind(schema.DpoStage, "pipeline.stages.dpo", data_shape="preference", chat_template=True,
                     length_grouping=True, qlora=True),
    "ipo": StageKind(schema.IpoStage, "pipeline.stages.dpo", data_shape="preference", chat_template=True,
                     length_grouping=True, qlora=True),
    "cpo": StageKind(schema.CpoStage, "pipeline.stages.cpo", data_shape="preference", chat_template=True,
                     length_grouping=True, qlora=True),
    "simpo": StageKind(schema.SimpoStage, "pipeline.stages.cpo", data_shape="preference", chat_template=True,
                       length_grouping=True, qlora=True),
    "orpo": StageKind(schema.OrpoStage, "pipeline.stages.orpo", data_shape="preference", chat_template=True,
                      length_grouping=True, qlora=True),
    "kto": StageKind(schema.KtoStage, "pipeline.stages.kto", data_shape="kto", chat_template=True,
                     qlora=True),
    "merge": StageKind(schema.MergeStage, "pipeline.stages.merge"),
    "ppo": StageKind(schema.PpoStage, "pipeline.stages.ppo", data_shape="prompts", chat_template=True,
                     figures=(("reward/mean", "reward"), ("kl", "kl")), samples_episodes=True),
    "grpo": StageKind(schema.GrpoStage, "pipeline.stages.grpo", data_shape="prompts", chat_template=True,
                      figures=TRL_RL_FIGURES, samples_episodes=True),
    "rloo": StageKind(schema.RlooStage, "pipeline.stages.rloo", data_shape="prompts", chat_template=True,
                      figures=TRL_RL_FIGURES, samples_episodes=True),
    "evaluate": StageKind(schema.EvaluateStage, "pipeline.stages.evaluate"),
    "export": StageKind(schema.ExportStage, "pipeline.stages.export"),
}
OTHER = StageKind(schema.StageBase, "")  # the traits of a kind no longer registered (an old manifest's)


def traits(name: str) -> StageKind:
    """The record of stage kind `name`; for a kind not registered (say, read from an old manifest), plain traits."""
    return STAGES.get(name, OTHER)


def config_class(name: str) -> type[schema.StageBase] | None:
    entry = STAGES.get(name)
    return entry.config if entry else None


def length_grouped_kinds() -> list[str]:
    """The kinds whose `train.group_by_length` applies, in registry order."""
    return [name for name, entry in STAGES.items() if entry.length_grouping]


def qlora_kinds() -> list[str]:
    """The kinds whose `lora.quantize` applies, in registry order."""
    return [name for name, entry in STAGES.items() if entry.qlora]


def stage_module(name: str) -> ModuleType:
    """Import the module that runs stages of kind `name`."""
    return importlib.import_module(STAGES[name].module)
