"""A toy stage kind for tests/test_stage_kinds.py: everything a new kind needs, defined in one place (its config
class, its `run(ctx)` and, in the test, one `registry.StageKind` entry). Its loop of our own "learns" the mean
prompt length, reports reward and KL as an online RL stage would, checkpoints every `save_steps` and resumes.

Imported by the registry when a recipe runs a `toy` stage in that test; nothing runs at import.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline import schema
from pipeline.course import run_course
from pipeline.stage import StageContext, StageResult
from pipeline.stages.common import load_stage_data


class ToyStage(schema.StageBase):
    """A toy kind: a loop of its own over prompt rows."""

    produces: ClassVar[str] = schema.REPORT
    kind: Literal["toy"] = Field(description="`toy`")
    data: schema.DataSection = Field(description="prompt rows")
    steps: int = Field(6, gt=0, description="training steps")
    save_steps: int = Field(2, gt=0, description="checkpoint every this many steps")


class CountingLoop:
    """Moves `value` halfway to the mean prompt length each step (a `pipeline.course.Loop`)."""

    accelerator = None

    def __init__(self, ctx: StageContext, prompts: list[str]):
        self.ctx, self.target = ctx, sum(map(len, prompts)) / len(prompts)
        self.value, self.step, self.history = 0.0, 0, []
        self.checkpoint = ctx.work_dir / "toy-checkpoint.json"

    def resume(self) -> int:
        if self.checkpoint.exists():
            saved = json.loads(self.checkpoint.read_text())
            self.value, self.step, self.history = saved["value"], saved["step"], saved["history"]
        return self.step

    def starting_metrics(self, measure) -> dict[str, Any]:
        return measure(0.0, "before")

    def fit(self, hooks) -> None:
        cfg = self.ctx.config
        display = hooks.progress(cfg.steps, self.step, episodes_per_step=4)
        while self.step < cfg.steps:
            self.value += (self.target - self.value) / 2
            self.step += 1
            entry = {"step": self.step, "reward": -abs(self.target - self.value), "kl": self.value / 100}
            self.history.append(entry)
            display.update(self.step, hooks.figures(entry))
            if self.step % cfg.save_steps == 0 and self.step < cfg.steps:
                self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
                self.checkpoint.write_text(json.dumps({"value": self.value, "step": self.step,
                                                       "history": self.history}))
                hooks.checkpoint(self.step)
        display.close()

    def fit_metrics(self) -> dict[str, Any]:
        return {"steps": self.step}

    def trained_model(self) -> float:
        return self.value

    def log_history(self) -> list[dict[str, Any]]:
        return self.history

    def save(self, ctx: StageContext, tokenizer) -> str:
        (ctx.output_dir / "value.json").write_text(json.dumps({"value": self.value}))
        return "toy"


def run(ctx: StageContext) -> StageResult:
    loaded = load_stage_data(ctx)
    prompts = [row["prompt"][-1]["content"] for row in loaded.train]
    return run_course(ctx, CountingLoop(ctx, prompts), tokenizer=None, loaded=loaded,
                      metrics={"train_prompts": len(prompts)},
                      measure=lambda value, phase: {f"eval_value_{phase}": value}, pipeline_tag=None, tags=["toy"])
