"""The course every training stage follows, the same for a transformers/TRL trainer and for a loop of our own (PPO):

    resume from the stage's last checkpoint -> measure the starting model -> train (progress with the kind's
    figures, the attempt log at each checkpoint, the crash tests' kill hook) -> measure the trained model ->
    check that every rank ends with the same weights -> save -> the StageResult

A stage module wraps its trainer in a `Loop` (`pipeline.training.TrainerLoop` for the Trainer stages,
`pipeline.stages.ppo.PPOLoop` for ours) and calls `run_course(ctx, loop, ...)`; the loop calls back into the
`Hooks` the course gives it. Called by stage modules at run time; nothing runs at import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from pipeline import faults, models, parallel
from pipeline.console import Progress, figures
from pipeline.data import LoadedData
from pipeline.stage import StageContext, StageResult

Measure = Callable[[Any, str], dict[str, Any]]  # (model, "before" | "after") -> held-out metrics


class Loop(Protocol):
    """A training loop the course drives, in this order: `resume`, `starting_metrics`, `fit`, then `fit_metrics`,
    `trained_model`, `log_history` and `save`."""

    accelerator: Any

    def resume(self) -> int:
        """Restore the stage's last checkpoint, if there is one; the step training goes on from (0: from scratch)."""

    def starting_metrics(self, measure: Measure) -> dict[str, Any]:
        """`measure(model, "before")` of the starting model (a loop that keeps them in its checkpoint returns those
        after a resume: its model then holds the checkpoint's weights)."""

    def fit(self, hooks: "Hooks") -> None:
        """Train to the end, calling `hooks`."""

    def fit_metrics(self) -> dict[str, Any]:
        """What training itself measured, for the manifest (a Trainer's `train_loss`)."""

    def trained_model(self) -> Any:
        """The model as trained (wrapped as the loop holds it)."""

    def log_history(self) -> list[dict[str, Any]]:
        """The logged scalars, for the manifest and the report's curves."""

    def save(self, ctx: StageContext, tokenizer) -> str:
        """Write the trained model and `tokenizer` into `ctx.output_dir`; the card's library name."""


@dataclass
class Hooks:
    """What a loop calls while it trains: `progress` opens the stage's display, `figures` picks the kind's live
    figures out of a log entry, `checkpoint(step)` runs once every rank is past a saved checkpoint."""

    ctx: StageContext
    kill: Callable[[int], None] | None = None

    @classmethod
    def for_stage(cls, ctx: StageContext) -> "Hooks":
        return cls(ctx, faults.kill_after_checkpoint(ctx.name))

    def progress(self, total: int, done: int, episodes_per_step: int | None = None) -> Progress:
        """The stage's progress display from step `done` of `total`; episodes/s shown for kinds that sample
        episodes (`registry.StageKind.samples_episodes`)."""
        episodes = episodes_per_step if self.ctx.traits.samples_episodes else None
        return self.ctx.console.progress(total, self.ctx.name, done, episodes)

    def figures(self, logs: dict[str, Any]) -> dict[str, float]:
        return figures(self.ctx.traits.figures, logs)

    def checkpoint(self, step: int) -> None:
        """The attempt log records the checkpoint, then the crash tests' kill hook (PIPELINE_TEST_KILL_AT) may end
        the process: a killed attempt's time up to its last checkpoint counts."""
        if self.ctx.attempts is not None:
            self.ctx.attempts.progress(step)
        if self.kill is not None:
            self.kill(step)


def note_resume(ctx: StageContext, step: int) -> None:
    """Record where this attempt starts in the attempt log; tell the person when it resumes a killed run."""
    if ctx.attempts is not None:
        ctx.attempts.resumed_from(step)
    if step:
        ctx.console.say(f"{ctx.name}: resumed from its checkpoint at step {step}")


def check_weights_agree(ctx: StageContext, accelerator, model) -> None:
    """Under DDP every rank must end with identical weights; FSDP, ZeRO-3 and TP shard them, so those are skipped."""
    if ctx.state.num_processes <= 1 or models.is_sharded(accelerator):
        return
    parallel.check_ranks_agree(ctx.state, f"the trained weights of stage '{ctx.name}'",
                               parallel.weights_digest(accelerator.unwrap_model(model)), key=f"stages.{ctx.name}")


def run_course(ctx: StageContext, loop: Loop, *, tokenizer, loaded: LoadedData, metrics: dict[str, Any],
               measure: Measure | None = None, **result: Any) -> StageResult:
    """Drive `loop` through the course and return the StageResult: `metrics` (the stage's counts) with the held-out
    measures before and after (`measure` None: no held-out rows) and the training loop's own (`loop.fit_metrics()`);
    the data's format as the manifest's `data_format`; `result`: the StageResult's other fields (base_model, tags,
    pipeline_tag...)."""
    note_resume(ctx, loop.resume())
    if measure is not None:
        metrics.update(loop.starting_metrics(measure))
    loop.fit(Hooks.for_stage(ctx))
    metrics.update(loop.fit_metrics())
    model = loop.trained_model()
    if measure is not None:
        metrics.update(measure(model, "after"))
    check_weights_agree(ctx, loop.accelerator, model)
    library = loop.save(ctx, tokenizer)
    result.setdefault("library_name", library)
    extra = {**({"data_format": loaded.format} if loaded.format else {}), **result.pop("extra", {})}
    return StageResult(metrics=metrics, datasets=loaded.sources, held_out=loaded.held_out,
                       log_history=loop.log_history(), extra=extra, **result)
