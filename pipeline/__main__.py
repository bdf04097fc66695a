"""Command line: `python -m pipeline {run,validate,show,eval,chat,push,export,report} ...`.

    python -m pipeline run recipes/quickstart.yaml [KEY=VALUE ...] [--force STAGE] [--only STAGE] [-v]
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipeline run recipes/X.yaml
    python -m pipeline validate recipes/X.yaml        # check everything without training
    python -m pipeline show recipes/X.yaml            # stage graph, fingerprints, run/skip plan
    python -m pipeline eval OUTPUT/stage ...          # evaluate artifacts (see pipeline.evaluation)
    python -m pipeline chat OUTPUT/stage [--prompt]   # chat with a checkpoint
    python -m pipeline push OUTPUT/stage user/repo    # push an artifact to the Hub
    python -m pipeline export OUTPUT/stage --quant q8_0 --output DIR   # GGUF + Ollama Modelfile (`export` extra)
    python -m pipeline report OUTPUT                  # report.md/.html: graph, loss curves, metrics, lineage

User errors print one line and exit 2; a stage that crashes prints one line naming its train.log, which holds the
traceback (exit 1; `run -v` shows library output and tracebacks on the terminal). Nothing runs at import.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Chain training stages from one YAML recipe.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (skips stages whose inputs did not change)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.sft.train.learning_rate=1e-4")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE (or 'all')")
    run.add_argument("--only", action="append", default=None, metavar="STAGE", help="run only these stages")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also show library output (trainer log dicts, warnings, load reports) on the terminal")

    for name, text in (("validate", "check a recipe without training"), ("show", "print the stage plan")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("recipe")
        cmd.add_argument("overrides", nargs="*")
        if name == "validate":
            cmd.add_argument("--deep", action="store_true",
                             help="also load tokenizers, model configs and data columns (slower)")

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

    chat = sub.add_parser("chat", help="chat with a checkpoint")
    chat.add_argument("artifact")
    chat.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", default=None)
    chat.add_argument("--context-tokens", type=int, default=None, help="window size (default: model's maximum)")

    push = sub.add_parser("push", help="push an artifact to the Hub")
    push.add_argument("artifact")
    push.add_argument("repo_id")
    push.add_argument("--private", action=argparse.BooleanOptionalAction, default=True)
    push.add_argument("--revision", default=None)
    push.add_argument("--merge", action="store_true", help="push a LoRA adapter merged into its base")
    export = sub.add_parser("export", help="write an artifact as GGUF for llama.cpp and Ollama (the `export` extra)")
    export.add_argument("artifact", help="a causal-lm artifact or model folder (a LoRA adapter is merged first)")
    export.add_argument("--format", choices=["gguf"], default="gguf")
    export.add_argument("--quant", choices=["f16", "q8_0", "q4_k_m"], default="q8_0")
    export.add_argument("--output", required=True, help="the artifact folder to write (its parent must be writable)")
    export.add_argument("--gguf-file", default=None, help="when ARTIFACT is a folder of .gguf files: which one")
    export.add_argument("--tokenizer-pre", default=None,
                        help="llama.cpp pre-tokenizer name for a tokenizer the converter does not recognise")
    report = sub.add_parser("report", help="write OUTPUT/report.md and report.html from the artifacts' manifests")
    report.add_argument("output_dir")
    return parser


def _run(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from pipeline import preflight

    preflight.check(recipe)
    from pipeline.parallel import close_process_group

    try:
        run_recipe(recipe, force=set(args.force), only=set(args.only) if args.only else None,
                   verbose=args.verbose)
    finally:
        close_process_group()
    return 0


def _validate(args) -> int:
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.deep:
        from pipeline import preflight

        preflight.check(recipe)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {' -> '.join(recipe.stages)})")
    return 0


def _show(args) -> int:
    from pipeline.recipe import load_recipe
    from pipeline.runner import plan

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"recipe {recipe.name} -> {recipe.output_dir}")
    for name, fp, action in plan(recipe):
        config = recipe.stages[name]
        parents = ", ".join(recipe.parents[name]) or "-"
        print(f"  {name:<16} {config.kind:<10} from {parents:<24} {fp[:12]}  {action}")
    return 0


def _eval(args) -> int:
    from pipeline import evaluation

    return evaluation.main(args)


def _chat(args) -> int:
    from pipeline import chat

    return chat.main(args)


def _push(args) -> int:
    from pipeline import hub

    return hub.main(args)


def _export(args) -> int:
    from pipeline.stages import export

    return export.main(args)


def _report(args) -> int:
    from pipeline import report

    return report.main(args)


COMMANDS = {"run": _run, "validate": _validate, "show": _show, "eval": _eval, "chat": _chat, "push": _push,
            "export": _export, "report": _report}


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import PipelineError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late_overrides = [x for x in extra if "=" in x and not x.startswith("-")]  # KEY=VALUE after --force/--only
    if len(late_overrides) != len(extra) or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late_overrides:
        args.overrides = list(args.overrides) + late_overrides
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except PipelineError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _crash(exc, args)
        print(f"error: {exc.filename or 'output folder'}: disk full while writing; completed artifacts are intact "
              "(fix: free space, then rerun the same command to resume)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - see _crash: re-raised unless a stage's log holds the traceback
        return _crash(exc, args)


def _crash(exc: Exception, args) -> int:
    """A stage that crashed: one line naming the train.log that holds its traceback (exit 1). Errors outside a
    stage, and any error under `run -v`, are raised with their traceback."""
    log_path = getattr(exc, "log_path", None)
    if log_path is None or getattr(args, "verbose", False):
        raise exc
    message = (str(exc).strip().splitlines() or [""])[0]
    print(f"error: {type(exc).__name__}: {message} (traceback in {log_path}; rerun with -v to see it here)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
