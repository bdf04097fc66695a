"""Glue shared by the stages that use a transformers/TRL trainer: arguments from the `train:` section, resuming
from the stage's last checkpoint, stopping on NaN/inf, and the loss history kept in the manifest.

Imported by stage modules at run time; nothing runs at import.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline import faults, models, parallel, schema, tracking
from pipeline.console import FIGURES, figures
from pipeline.errors import TrainingError


def precision_flags(section: schema.TrainSection) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags from `train.mixed_precision` ('auto' resolved by models.mixed_precision)."""
    mode = models.mixed_precision(section.mixed_precision)
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def trainer_kwargs(ctx, section: schema.TrainSection, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments shared by TrainingArguments and every TRL *Config, from the `train:` section."""
    import torch

    kwargs: dict[str, Any] = dict(
        output_dir=str(ctx.work_dir / "checkpoints"),
        learning_rate=section.learning_rate,
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.eval_batch_size or section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        warmup_steps=section.warmup_ratio,
        weight_decay=section.weight_decay,
        lr_scheduler_type=section.lr_scheduler,
        optim=section.optim,
        max_grad_norm=section.max_grad_norm,
        logging_steps=section.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=section.save_total_limit,
        eval_strategy="no",
        gradient_checkpointing=section.gradient_checkpointing,
        use_liger_kernel=section.use_liger_kernel,
        seed=ctx.seed,
        data_seed=ctx.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=section.num_workers,
        disable_tqdm=True,  # the stage's progress is pipeline.console's (console_progress); raw log dicts: train.log
        **precision_flags(section),
        **tracking.trainer_fields(ctx),
    )
    if section.group_by_length:  # the stage has put its rows in length-grouped batches: read them in that order
        kwargs["train_sampling_strategy"] = "sequential"  # (else each TRL config keeps its own default; KTO's is this)
    kwargs.update(_parallel_kwargs(ctx, section))
    kwargs.update(overrides)
    return kwargs


def _parallel_kwargs(ctx, section: schema.TrainSection) -> dict[str, Any]:
    """The recipe's `parallelism:` section as a ParallelismConfig, and a clear error for Liger without its package."""
    import importlib.util

    if section.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise TrainingError("train.use_liger_kernel is on but the liger-kernel package is not installed",
                            key="train.use_liger_kernel", fix="pip install liger-kernel, or set it to false")
    header = getattr(getattr(ctx, "recipe", None), "header", None)
    world_size = getattr(getattr(ctx, "state", None), "num_processes", 1)
    config = parallel.parallelism_config(getattr(header, "parallelism", None), world_size)
    return {"parallelism_config": config} if config is not None else {}


def last_checkpoint(ctx) -> str | None:
    """The newest complete Trainer checkpoint in the stage's work folder (resumes a killed run)."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(ctx.work_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = get_last_checkpoint(str(folder))
    if found and not (Path(found) / "trainer_state.json").exists():
        return None
    return found


def checkpoint_step(checkpoint: str | None) -> int:
    """The optimizer step a Trainer checkpoint was saved at; 0 without one (a fresh start)."""
    if checkpoint is None:
        return 0
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def attempt_progress(attempts):
    """A callback that records each saved checkpoint in the stage's attempt log (so a killed attempt's time up to
    its last checkpoint counts); None without a log."""
    if attempts is None:
        return None
    from transformers import TrainerCallback

    class AttemptProgress(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            attempts.progress(state.global_step)

    return AttemptProgress()


def token_count(trainer):
    """A callback that carries TRL's `num_tokens` counter across a resume. TRL keeps it in the trainer
    (`_total_train_tokens`), not in the TrainerState a checkpoint holds, so a resumed run would count from 0 again;
    this saves it in each checkpoint's trainer_state.json and sets it back when training starts from one."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    class TokenCount(TrainerCallback, ExportableState):
        def state(self) -> dict:
            return {"args": {}, "attributes": {"total_train_tokens": getattr(trainer, "_total_train_tokens", 0)}}

        def on_train_begin(self, args, state, control, **kwargs):
            saved = state.stateful_callbacks.setdefault(type(self).__name__, self.state())  # older checkpoints
            if hasattr(trainer, "_total_train_tokens"):
                trainer._total_train_tokens = saved["attributes"]["total_train_tokens"]

    return TokenCount()


def console_progress(ctx, kind: str):
    """A callback that shows the stage's progress on the console (`ctx.console`): the step and the live figures of
    its kind (pipeline.console.FIGURES), with episodes/s for the online RL stages; None without a console or off
    the main process."""
    console = getattr(ctx, "console", None)
    if console is None or not ctx.is_main:
        return None
    from transformers import TrainerCallback

    class ConsoleProgress(TrainerCallback):
        display = None

        def on_train_begin(self, args, state, control, **kwargs):
            episodes = (args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
                        if kind in FIGURES else None)
            self.display = console.progress(state.max_steps, ctx.name, state.global_step, episodes)

        def on_step_end(self, args, state, control, **kwargs):
            if self.display is not None:
                self.display.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.display is not None:
                self.display.update(state.global_step, figures(kind, logs or {}))

        def on_train_end(self, args, state, control, **kwargs):
            if self.display is not None:
                self.display.close()

    return ConsoleProgress()


def whole_run_loss(log_history: list[dict[str, Any]], resumed: int, attempt_loss: float, attempt_steps: int) -> float:
    """Mean training loss over every step of a stage, across attempts: the steps up to `resumed` from the logged
    losses (each entry averages the steps since the previous one), the `attempt_steps` after it from this attempt's
    own mean. Steps that no log entry covers (when logging_steps does not divide save_steps) are left out."""
    if resumed == 0:
        return attempt_loss
    total, covered, previous = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and previous < step <= resumed:
            total += entry["loss"] * (step - previous)
            covered, previous = covered + step - previous, step
    steps = covered + attempt_steps
    return (total + attempt_loss * attempt_steps) / steps if steps else attempt_loss


def nan_guard(stage: str | None = None):
    """A TrainerCallback that stops the stage when the logged loss or gradient norm is NaN/inf."""
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise TrainingError(
                        f"{key} became {value} at step {state.global_step}; training stopped and the last good "
                        f"checkpoint is kept", key=f"stages.{stage}.train.learning_rate" if stage else
                        "train.learning_rate",
                        fix="lower the learning rate, enable max_grad_norm, or check the data")

    return NanGuard()


def train(trainer, ctx) -> Any:
    """Run `trainer.train()`, resuming from the stage's last checkpoint if a previous run was killed. The returned
    TrainOutput's `training_loss`, like the `train_loss` of the trainer's last log entry (rewritten here), is the
    mean over every step of the stage, those of killed attempts included."""
    attempts = getattr(ctx, "attempts", None)
    # the attempt log first: the kill hook (crash tests) dies in on_save, after the checkpoint is recorded
    for hook in (attempt_progress(attempts), token_count(trainer), faults.nan_hook(ctx.name), nan_guard(ctx.name),
                 console_progress(ctx, getattr(getattr(ctx, "config", None), "kind", "")), faults.kill_hook(ctx.name)):
        if hook is not None:
            trainer.add_callback(hook)
    tracking.attach(trainer, ctx)
    checkpoint = last_checkpoint(ctx)
    resumed = checkpoint_step(checkpoint)
    if attempts is not None:
        attempts.resumed_from(resumed)
    if checkpoint is not None:
        say(ctx, f"{ctx.name}: resuming from {checkpoint}")
    output = trainer.train(resume_from_checkpoint=checkpoint)
    check_weights_agree(trainer, ctx)
    return whole_run_output(trainer, output, resumed)


def say(ctx, message: str) -> None:
    """A line for the person running the recipe (main process): on the console, not in train.log."""
    console = getattr(ctx, "console", None)
    if console is not None:
        console.say(message)
    elif ctx.is_main:
        print(message, flush=True)


def whole_run_output(trainer, output, resumed: int):
    """`output` with the training loss of the whole stage (see `whole_run_loss`) in place of this attempt's, also
    written into the trainer's summary log entry (the one holding `train_loss`)."""
    history = trainer.state.log_history
    loss = whole_run_loss(history, resumed, output.training_loss, output.global_step - resumed)
    if history and "train_loss" in history[-1]:
        history[-1]["train_loss"] = loss
    return output._replace(training_loss=loss, metrics={**output.metrics, "train_loss": loss})


def check_weights_agree(trainer, ctx) -> None:
    """Under DDP every rank must end with identical weights; FSDP, ZeRO-3 and TP shard them, so those are skipped."""
    if ctx.state.num_processes <= 1 or models.is_sharded(trainer.accelerator):
        return

    parallel.check_ranks_agree(ctx.state, f"the trained weights of stage '{ctx.name}'",
                               parallel.weights_digest(trainer.model), key=f"stages.{ctx.name}")


def log_history(trainer) -> list[dict[str, Any]]:
    """The trainer's logged scalars (loss, learning rate, grad norm...), for curves in the report."""
    keep = []
    for entry in trainer.state.log_history:
        keep.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()
                     if isinstance(v, (int, float))})
    return keep

