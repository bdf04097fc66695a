"""`python -m pipeline validate RECIPE [KEY=VALUE ...] [--deep]`: check a recipe without training (`--deep` also
loads tokenizers, model configs and data columns)."""
from __future__ import annotations

import argparse

from pipeline import preflight
from pipeline.recipe import load_recipe


def add_parser(sub) -> argparse.ArgumentParser:
    cmd = sub.add_parser("validate", help="check a recipe without training")
    cmd.add_argument("recipe")
    cmd.add_argument("overrides", nargs="*")
    cmd.add_argument("--deep", action="store_true",
                     help="also load tokenizers, model configs and data columns (slower)")
    return cmd


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.deep:
        preflight.check(recipe)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {' -> '.join(recipe.stages)})")
    return 0
