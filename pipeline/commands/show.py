"""`python -m pipeline show RECIPE [KEY=VALUE ...]`: the stage graph, each stage's fingerprint and whether `run`
would run or skip it."""
from __future__ import annotations

import argparse

from pipeline.recipe import load_recipe
from pipeline.runner import plan


def add_parser(sub) -> argparse.ArgumentParser:
    cmd = sub.add_parser("show", help="print the stage plan")
    cmd.add_argument("recipe")
    cmd.add_argument("overrides", nargs="*")
    return cmd


def main(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"recipe {recipe.name} -> {recipe.output_dir}")
    for name, fp, action in plan(recipe):
        config = recipe.stages[name]
        parents = ", ".join(recipe.parents[name]) or "-"
        print(f"  {name:<16} {config.kind:<10} from {parents:<24} {fp[:12]}  {action}")
    return 0
