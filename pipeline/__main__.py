"""Command line: `python -m pipeline {run,validate,show,eval,chat,push,export,report} ...`.

    python -m pipeline run recipes/quickstart.yaml [KEY=VALUE ...] [--force STAGE] [--only STAGE] [--wait] [-v]
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m pipeline run recipes/X.yaml
    python -m pipeline validate recipes/X.yaml        # check everything without training
    python -m pipeline show recipes/X.yaml            # stage graph, fingerprints, run/skip plan
    python -m pipeline eval OUTPUT/stage ...          # evaluate artifacts (see pipeline.eval)
    python -m pipeline chat OUTPUT/stage [--prompt]   # chat with a checkpoint
    python -m pipeline push OUTPUT/stage user/repo    # push an artifact to the Hub
    python -m pipeline export OUTPUT/stage --quant q8_0 --output DIR   # GGUF + Ollama Modelfile (`export` extra)
    python -m pipeline report OUTPUT                  # report.md/.html: graph, loss curves, metrics, lineage

Each command is a module of `pipeline/commands/` that owns its flags (`add_parser`) and its `main(args)`; a new
command is one such module and its name in `COMMANDS`. User errors print one line and exit 2; a stage that crashes
prints one line naming its train.log, which holds the traceback (exit 1; `run -v` shows library output and tracebacks
on the terminal). Nothing runs at import.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from pipeline.errors import PipelineError

# command -> its module in pipeline/commands/ (`add_parser(subparsers)`, `main(args) -> int`), in --help order
COMMANDS = {name: f"pipeline.commands.{name}"
            for name in ("run", "validate", "show", "eval", "chat", "push", "export", "report")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description="Chain training stages from one YAML recipe.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    late_overrides = [x for x in extra if "=" in x and not x.startswith("-")]  # KEY=VALUE after --force/--only
    if len(late_overrides) != len(extra) or (late_overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late_overrides:
        args.overrides = list(args.overrides) + late_overrides
    logging.basicConfig(level=os.environ.get("PIPELINE_LOG_LEVEL", "WARNING"), format="%(levelname)s %(message)s")
    try:
        return importlib.import_module(COMMANDS[args.command]).main(args)
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
