"""`evaluate` stage: run `evals` (perplexity, exact_match, pairwise_accuracy, win_rate, lm_eval) on `model`
(usually a reference like ${ppo}). Its own artifact is a report folder holding results.json; the numbers also go
into the evaluated artifact's manifest (`evaluation`) and its model card's model-index. A win rate's judge (its
path, and whether the policy was trained against it) goes into both manifests (`judges`, `evaluation_judges`).

Runs inside `python -m pipeline run recipe.yaml` (`python -m pipeline eval` runs the same evaluations on any
artifact); nothing at import.
"""
from __future__ import annotations

from pathlib import Path

from pipeline import artifacts
from pipeline.eval import evals
from pipeline.artifacts import write_json_atomic
from pipeline.stage import StageContext, StageResult


def resolved_evals(ctx: StageContext):
    """The stage's evals with `${stage}` references (judge, reward_model, reference) turned into folders; rows an
    eval's `data` holds out (`eval_rows`) are drawn by the stage's seed, as the stages that trained on that file drew
    them."""
    return [spec.model_copy(update={"judge": ctx.resolve(spec.judge), "reward_model": ctx.resolve(spec.reward_model),
                                    "reference": ctx.resolve(spec.reference),
                                    "data": spec.data and spec.data.seeded(ctx.seed)}) for spec in ctx.config.evals]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    path = ctx.resolve(cfg.model.path)
    results = evals.evaluate_artifact(path, resolved_evals(ctx), cfg.batch_size)
    metrics = {r.key: r.value for r in results}
    if ctx.is_main:
        write_json_atomic(Path(ctx.output_dir) / "results.json",
                          {"model": path, "results": [r.__dict__ for r in results]})
        if artifacts.open_artifact(path) is not None:
            evals.record(path, results)
    datasets = sorted({r.dataset for r in results if not r.dataset.startswith("lm-eval:")})
    judges = evals.judges_of(results)  # win rates: which reward model judged, the policy's own or not
    return StageResult(metrics=metrics, base_model=path, datasets=datasets, library_name="hf-pipeline",
                       pipeline_tag=None, tags=["evaluation", "report"],
                       extra={"evaluated": path, **({"judges": judges} if judges else {})})
