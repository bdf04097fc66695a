"""`python -m pipeline eval ARTIFACT... [--metric M] [--data FILE] [--reward-model DIR] [--reference DIR]
[--tasks a,b --include-path DIR] [--limit N]`: evaluate artifacts, print a table and record the results in each
artifact's manifest and model card (`pipeline.eval.evals`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import artifacts, schema
from pipeline.errors import PipelineError
from pipeline.eval.evals import default_evals, evaluate_artifact, record


def add_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser("eval", help="evaluate artifacts")
    ev.add_argument("artifacts", nargs="+")
    ev.add_argument("--metric", action="append", default=None,
                    help="perplexity, pairwise_accuracy, win_rate, exact_match, lm_eval (default: by artifact kind)")
    ev.add_argument("--data", default=None, help="held-out data file")
    ev.add_argument("--reward-model", default=None)
    ev.add_argument("--reference", default=None, help="reference policy for win rate")
    ev.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks")
    ev.add_argument("--include-path", default=None, help="folder of local lm-eval task YAMLs")
    ev.add_argument("--limit", type=int, default=None)
    return ev


def evals_from_args(args, path: str) -> list[schema.EvalSection]:
    """EvalSections for one artifact from the CLI flags (defaults by artifact kind when --metric is absent)."""
    metrics_ = list(args.metric or [])
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks and "lm_eval" not in metrics_:
        metrics_.append("lm_eval")
    evals = [] if metrics_ else default_evals(path, args.data)
    data = schema.DataSection(path=args.data) if args.data else None
    for metric in metrics_:
        evals.append(schema.EvalSection(metric=metric, data=data, reward_model=args.reward_model,
                                        reference=args.reference, tasks=tasks, include_path=args.include_path,
                                        limit=args.limit))
    if args.limit:
        evals = [e.model_copy(update={"limit": args.limit}) for e in evals]
    return evals


def print_table(rows: list) -> None:
    width = max([len(a) for a, _ in rows] + [8])
    key_width = max([len(r.key) for _, r in rows] + [6])
    print(f"{'artifact':<{width}}  {'metric':<{key_width}}  {'value':>10}  data")
    for artifact, result in rows:
        print(f"{artifact:<{width}}  {result.key:<{key_width}}  {result.value:>10.4f}  {result.dataset}")


def main(args) -> int:
    """Evaluate, print a table, record results in each artifact."""
    rows = []
    for path in args.artifacts:
        if not Path(path).is_dir():
            raise PipelineError(f"{path} is not a folder", key="artifacts", fix="pass OUTPUT/<stage> folders")
        results = evaluate_artifact(path, evals_from_args(args, path))
        if artifacts.open_artifact(path) is not None:
            record(path, results)
        rows += [(path, r) for r in results]
    print_table(rows)
    return 0
