"""Experiment trackers (`report_to:`): which ones a stage uses, that their packages are installed, where they write,
and what they receive: the training curves on the stage's step axis, the run name `<recipe>/<stage>` and the stage's
resolved config.

Stages built on a transformers/TRL trainer pass the trackers to it (`trainer_fields`, then `attach` adds the recipe
config); our PPO logs through Accelerate's tracker API (`accelerate_trackers`). TensorBoard writes to
OUTPUT/.tracking/<stage>/, W&B (unless WANDB_DIR is set) under OUTPUT/.tracking/. Used by pipeline.runner,
pipeline.training and pipeline.stages.ppo; nothing runs at import. Reference: docs/tracking.md.
"""
from __future__ import annotations

import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import schema
from pipeline.errors import PipelineError
from pipeline.stage import StageContext

TRACKING_DIR = ".tracking"  # under the output folder; a stage name cannot start with "."
# tracker -> (the module it needs, the pyproject extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "trackio": ("trackio", "trackio"),
            "wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}


def normalize(value: Any) -> list[str]:
    """`report_to` as a list of tracker names, without "none" and repeats (None or "none": [])."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    return list(dict.fromkeys(n for n in names if n != "none"))


def stage_trackers(recipe, name: str) -> list[str]:
    """The stage's own `report_to`, or the recipe's when the stage sets none."""
    own = getattr(recipe.stages[name], "report_to", None)
    return normalize(own if own is not None else getattr(recipe.header, "report_to", None))


def ctx_trackers(ctx: StageContext) -> list[str]:
    """`stage_trackers` of the context's stage."""
    return stage_trackers(ctx.recipe, ctx.name)


def check_installed(recipe) -> None:
    """Every tracker a stage asks for must be importable: else one line naming the extra to install (exit 2)."""
    for name in recipe.stages:
        for tracker in stage_trackers(recipe, name):
            module, extra = PACKAGES[tracker]
            if importlib.util.find_spec(module) is None:
                own = getattr(recipe.stages[name], "report_to", None) is not None
                raise PipelineError(f"{tracker} needs the {module} package, which is not installed",
                                    file=str(recipe.path), key=f"stages.{name}.report_to" if own else "report_to",
                                    fix=f"pip install 'hf-pipeline[{extra}]', or set report_to: none")


def run_name(recipe, name: str) -> str:
    return f"{recipe.name}/{name}"


def tracking_root(recipe) -> Path:
    return Path(recipe.output_dir) / TRACKING_DIR


def log_dir(recipe, name: str) -> Path:
    """The stage's TensorBoard folder: `tensorboard --logdir OUTPUT/.tracking` shows every stage."""
    return tracking_root(recipe) / name


def resolved_config(ctx: StageContext) -> dict[str, Any]:
    """What the trackers are told about the stage: recipe, stage, kind, seed and its config with `${stage}`
    references turned into the artifact folders they name."""
    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, str) and schema.REF_PATTERN.match(value):
            return ctx.resolve(value)
        return value

    return {"recipe": ctx.recipe.name, "stage": ctx.name, "kind": ctx.config.kind, "seed": ctx.seed,
            "config": resolve(ctx.config.model_dump(mode="json"))}


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as {"a.b.c": scalar}: lists become JSON text and None "null" (TensorBoard's hparams and
    MLflow's params take scalars only)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, f"{dotted}."))
        elif isinstance(value, (list, tuple)):
            out[dotted] = json.dumps(value)
        else:
            out[dotted] = "null" if value is None else value
    return out


@contextmanager
def environment(recipe, name: str):
    """While a stage runs: W&B's project and folder and MLflow's experiment default to the recipe's (a variable the
    user set wins); afterwards the stage's tracker runs are ended (the trainers' W&B callback leaves its run open,
    and the next stage would log into it) and the previous environment comes back."""
    trackers = stage_trackers(recipe, name)
    wanted = {}
    if "wandb" in trackers:
        wanted.update(WANDB_PROJECT=recipe.name, WANDB_DIR=str(tracking_root(recipe)))
    if "mlflow" in trackers:
        wanted["MLFLOW_EXPERIMENT_NAME"] = recipe.name
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    if "WANDB_DIR" in added:
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    try:
        yield trackers
    finally:
        end_runs(trackers)
        for key in added:
            os.environ.pop(key, None)


def end_runs(trackers: list[str]) -> None:
    """End the W&B and MLflow runs still open in this process (one run per stage)."""
    import sys

    wandb, mlflow = sys.modules.get("wandb"), sys.modules.get("mlflow")
    if "wandb" in trackers and wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
    if "mlflow" in trackers and mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run()


# ------------------------------------------------------------------------------------- transformers / TRL trainers


def trainer_fields(ctx: StageContext) -> dict[str, Any]:
    """TrainingArguments fields: `report_to` (the stage's trackers), `run_name` and trackio's `project`."""
    trackers = ctx_trackers(ctx)
    if not trackers:
        return {"report_to": []}
    return {"report_to": trackers, "run_name": run_name(ctx.recipe, ctx.name), "project": ctx.recipe.name}


def attach(trainer, ctx: StageContext) -> None:
    """Point the trainer's TensorBoard callback at OUTPUT/.tracking/<stage>/ and add a callback that gives each
    tracker the stage's resolved config when training starts."""
    if not ctx_trackers(ctx):
        return
    from transformers import TrainerCallback

    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is None:
            callback.logging_dir = str(log_dir(ctx.recipe, ctx.name))
    config = resolved_config(ctx)

    class RecipeConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                store_config(trainer.callback_handler.callbacks, config)

    trainer.add_callback(RecipeConfig())


def store_config(callbacks, config: dict[str, Any]) -> None:
    """The resolved config into each tracker run the trainer's callbacks opened (TensorBoard text, W&B config,
    MLflow params and recipe.json)."""
    import sys

    text = json.dumps(config, indent=2, default=str)
    for callback in callbacks:
        writer = getattr(callback, "tb_writer", None) if type(callback).__name__ == "TensorBoardCallback" else None
        if writer is not None:
            writer.add_text("recipe", "    " + text.replace("\n", "\n    "))
            writer.flush()
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.config.update({"recipe": config}, allow_val_change=True)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        mlflow.log_dict(config, "recipe.json")
        mlflow.log_params({k: str(v)[:500] for k, v in flat(config, "recipe.").items()})


# ------------------------------------------------------------------------------------------------- our PPO loop


def accelerate_trackers(ctx: StageContext) -> list:
    """Accelerate tracker objects for the stage (for `Accelerator(log_with=...)`), named like the trainers' runs:
    TensorBoard in OUTPUT/.tracking/<stage>/, W&B, MLflow and trackio in a project/experiment named after the
    recipe with the run `<recipe>/<stage>`."""
    from accelerate import tracking as acc_tracking

    trackers, name = [], run_name(ctx.recipe, ctx.name)
    for tracker in ctx_trackers(ctx):
        if tracker == "tensorboard":
            trackers.append(acc_tracking.TensorBoardTracker(ctx.name, str(tracking_root(ctx.recipe))))
        elif tracker == "wandb":
            trackers.append(acc_tracking.WandBTracker(ctx.recipe.name, name=name))
        elif tracker == "mlflow":
            trackers.append(acc_tracking.MLflowTracker(experiment_name=ctx.recipe.name, run_name=name))
        elif tracker == "trackio":
            trackers.append(acc_tracking.TrackioTracker(ctx.recipe.name, name=name))
    return trackers
