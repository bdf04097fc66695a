"""Glue shared by the stages that use a transformers/TRL trainer: arguments from the `train:` section, and
`TrainerLoop`, the trainer as a `pipeline.course.Loop` (resuming from the stage's last checkpoint, the course's hooks
as callbacks, stopping on NaN/inf, the loss history kept in the manifest).

Imported by stage modules at run time; nothing runs at import.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline import faults, models, parallel, schema, tracking
from pipeline.errors import TrainingError
from pipeline.stage import StageContext


def precision_flags(section: schema.TrainSection) -> dict[str, bool]:
    """TrainingArguments' bf16/fp16 flags from `train.mixed_precision` ('auto' resolved by models.mixed_precision)."""
    mode = models.mixed_precision(section.mixed_precision)
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


def trainer_kwargs(ctx: StageContext, section: schema.TrainSection, **overrides: Any) -> dict[str, Any]:
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


def _parallel_kwargs(ctx: StageContext, section: schema.TrainSection) -> dict[str, Any]:
    """The recipe's `parallelism:` section as a ParallelismConfig, and a clear error for Liger without its package."""
    import importlib.util

    if section.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise TrainingError("train.use_liger_kernel is on but the liger-kernel package is not installed",
                            key="train.use_liger_kernel", fix="pip install liger-kernel, or set it to false")
    config = parallel.parallelism_config(ctx.recipe.header.parallelism, ctx.state.num_processes)
    return {"parallelism_config": config} if config is not None else {}


def last_checkpoint(ctx: StageContext) -> str | None:
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


def checkpoints(hooks):
    """A callback that hands each saved checkpoint to the course (`hooks.checkpoint`: the attempt log, then the
    crash tests' kill hook)."""
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            hooks.checkpoint(state.global_step)

    return Checkpoints()


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


def console_progress(hooks):
    """A callback that shows the stage's progress (`hooks.progress`): the step and the live figures of its kind,
    with episodes/s for the kinds that sample episodes."""
    from transformers import TrainerCallback

    class ConsoleProgress(TrainerCallback):
        display = None

        def on_train_begin(self, args, state, control, **kwargs):
            episodes = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
            self.display = hooks.progress(state.max_steps, state.global_step, episodes)

        def on_step_end(self, args, state, control, **kwargs):
            if self.display is not None:
                self.display.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.display is not None:
                self.display.update(state.global_step, hooks.figures(logs or {}))

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


def whole_run_output(trainer, output, resumed: int):
    """`output` with the training loss of the whole stage (see `whole_run_loss`) in place of this attempt's, also
    written into the trainer's summary log entry (the one holding `train_loss`)."""
    history = trainer.state.log_history
    loss = whole_run_loss(history, resumed, output.training_loss, output.global_step - resumed)
    if history and "train_loss" in history[-1]:
        history[-1]["train_loss"] = loss
    return output._replace(training_loss=loss, metrics={**output.metrics, "train_loss": loss})


class TrainerLoop:
    """A transformers/TRL trainer as a `pipeline.course.Loop`: the starting model is measured before
    `make_trainer()` builds the trainer, training resumes from the stage's last Trainer checkpoint, and the
    reported training loss is the mean over every step of the stage (killed attempts included). `before_save(trainer)`
    runs just before saving; `merge_lora` overrides the stage's `lora.merge`."""

    def __init__(self, ctx: StageContext, model, make_trainer, *, merge_lora: bool | None = None, before_save=None):
        self.ctx, self.model, self.make_trainer = ctx, model, make_trainer
        self.merge_lora, self.before_save = merge_lora, before_save
        self.trainer, self.checkpoint, self.resumed, self.output = None, None, 0, None

    @property
    def accelerator(self):
        return self.trainer.accelerator

    def resume(self) -> int:
        self.checkpoint = last_checkpoint(self.ctx)
        self.resumed = checkpoint_step(self.checkpoint)
        return self.resumed

    def starting_metrics(self, measure) -> dict[str, Any]:
        return measure(self.model, "before")

    def fit(self, hooks) -> None:
        """Build the trainer and run `trainer.train()` from the checkpoint `resume` found."""
        trainer = self.trainer = self.make_trainer()
        # the course's checkpoint hook first: the kill hook of the crash tests dies in on_save, after the attempt log
        for callback in (checkpoints(hooks), token_count(trainer), faults.nan_hook(self.ctx.name),
                         nan_guard(self.ctx.name), console_progress(hooks), faults.kill_hook(self.ctx.name)):
            if callback is not None:
                trainer.add_callback(callback)
        tracking.attach(trainer, self.ctx)
        self.output = whole_run_output(trainer, trainer.train(resume_from_checkpoint=self.checkpoint), self.resumed)

    def fit_metrics(self) -> dict[str, Any]:
        return {"train_loss": self.output.training_loss}

    def trained_model(self):
        return self.trainer.model

    def log_history(self) -> list[dict[str, Any]]:
        return log_history(self.trainer)

    def save(self, ctx: StageContext, tokenizer) -> str:
        if self.before_save is not None:
            self.before_save(self.trainer)
        return models.save_trained(ctx, self.trainer, tokenizer, merge_lora=self.merge_lora)


def log_history(trainer) -> list[dict[str, Any]]:
    """The trainer's logged scalars (loss, learning rate, grad norm...), for curves in the report."""
    keep = []
    for entry in trainer.state.log_history:
        keep.append({k: (round(v, 6) if isinstance(v, float) else v) for k, v in entry.items()
                     if isinstance(v, (int, float))})
    return keep

