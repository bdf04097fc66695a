"""`python -m pipeline run RECIPE [KEY=VALUE ...] [--force STAGE] [--only STAGE] [--wait] [-v]`: run a recipe's
stages, skipping those whose inputs did not change (`accelerate launch -m pipeline run ...` for several processes).
One run at a time per output folder (pipeline.runlock): another is refused, or waits with `--wait`."""
from __future__ import annotations

import argparse

from pipeline import preflight, runlock
from pipeline.parallel import close_process_group
from pipeline.recipe import load_recipe
from pipeline.runner import check_run, run_recipe


def add_parser(sub) -> argparse.ArgumentParser:
    run = sub.add_parser("run", help="run a recipe (skips stages whose inputs did not change)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.sft.train.learning_rate=1e-4")
    run.add_argument("--force", action="append", default=[], metavar="STAGE", help="rerun STAGE (or 'all')")
    run.add_argument("--only", action="append", default=None, metavar="STAGE", help="run only these stages")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="also show library output (trainer log dicts, warnings, load reports) on the terminal")
    run.add_argument("--wait", action="store_true",
                     help="if another run is using the output folder, wait for it to finish instead of exiting (2)")
    return run


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    preflight.check(recipe)
    force, only = set(args.force), set(args.only) if args.only else None
    check_run(recipe, force, only)
    with runlock.hold(recipe.output_dir, wait=args.wait):  # before anything is written; released however we exit
        try:
            run_recipe(recipe, force=force, only=only, verbose=args.verbose)
        finally:
            close_process_group()
    return 0
