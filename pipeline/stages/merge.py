"""`merge` stage: fold a LoRA adapter artifact into its base model and write full safetensors weights."""
from __future__ import annotations

from pipeline import models
from pipeline.errors import PipelineError
from pipeline.stage import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    path = ctx.resolve(cfg.model.path)
    if not models.is_adapter(path):
        raise PipelineError(f"{path} is not a LoRA adapter, nothing to merge", key=f"stages.{ctx.name}.model",
                            fix="point `model:` at a stage trained with `lora:`")
    base = models.base_model_of(path)
    if ctx.is_main:
        model = models.load_causal_lm(path, cfg.model, merge_adapter=True)
        tokenizer = models.load_tokenizer(path)
        models.save_model(model, tokenizer, ctx.output_dir)
    return StageResult(metrics={}, base_model=base, tags=["merged"])
