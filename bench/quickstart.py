"""The quickstart's effects on several seeds, read from the artifacts' manifests, with the goals beside them.

    python bench/quickstart.py                 # seeds 0 1 2 -> bench/results/quickstart.{json,md}, README table
    python bench/quickstart.py --seeds 0       # one seed (the table then says so)
    python bench/quickstart.py --jobs 2        # two seeds at a time, one core each (on a 2-core machine)
    python bench/quickstart.py --from-runs     # no training: the results again from the runs already in --out
    python bench/quickstart.py --tables-only   # quickstart.md and the README table again from quickstart.json
    python bench/quickstart.py --results quickstart-avx2   # bench/results/quickstart-avx2.*, README left alone

Each seed runs `python -m pipeline run recipes/quickstart.yaml seed=N` in a fresh process into
bench/out/quickstart/seed-N, `--jobs` of them at a time (the table says how many), each with the machine's cores
shared out as intra-op threads (all of them with one job: what the README's command uses; OMP_NUM_THREADS
overrides). The thread count does not change a digit of the results (every manifest metric is identical at one and
two threads); it changes only the wall time. Wall time and peak resident memory are that process's. The table gives,
per stage and measure, the mean, min and max over the seeds; a goal holds only if it holds on every seed. The same
GOALS are asserted by tests/test_quickstart.py. The README's quickstart table is copied from the results file
between its `<!-- quickstart-table -->` markers, never typed by hand.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import common
from common import LOCK, README, ROOT

NAME = "quickstart"
RECIPE = ROOT / "recipes" / "quickstart.yaml"
BLOCK = common.Block(README, "<!-- quickstart-table -->", "<!-- /quickstart-table -->")
SHOWN_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers")


@dataclass(frozen=True)
class Goal:
    """One effect a stage must have: `holds(metrics)` on that stage's manifest metrics."""

    stage: str
    text: str
    holds: Callable[[dict], bool]


def rises(before: str, after: str) -> Callable[[dict], bool]:
    return lambda m: m[after] > m[before]


def rises_or_full(before: str, after: str) -> Callable[[dict], bool]:
    """An accuracy that rises, or stays at 1.0 where it started there (nothing left to rise to)."""
    return lambda m: m[after] > m[before] or m[before] == m[after] == 1.0


# The PPO and GRPO goals read the policy's sampled answers (eval_samples per held-out prompt, at the stage's
# temperature 1.5, the same random numbers before and after): that is the distribution RL optimises. The SFT policy's
# greedy answers are already all right, so greedy measures have nothing left to rise to; they must not fall.
GOALS = (
    Goal("base", "held-out loss falls by >= 80%", lambda m: m["eval_loss_after"] <= 0.2 * m["eval_loss_before"]),
    Goal("sft", "held-out completion loss falls", lambda m: m["eval_loss_after"] < m["eval_loss_before"]),
    Goal("sft", "greedy exact match >= 0.9 on held-out prompts", lambda m: m["eval_exact_match"] >= 0.9),
    Goal("reward", "held-out pairwise accuracy >= 0.85 on >= 100 pairs",
         lambda m: m["eval_accuracy"] >= 0.85 and m["eval_pairs"] >= 100),
    Goal("dpo", "held-out preference accuracy rises (or stays at 1.0)",
         rises_or_full("eval_preference_accuracy_before", "eval_preference_accuracy_after")),
    Goal("dpo", "held-out chosen-over-rejected margin rises", rises("eval_margin_before", "eval_margin_after")),
    Goal("ppo", "reward-model score of sampled answers rises over the SFT policy",
         rises("eval_sampled_reward_before", "eval_sampled_reward_after")),
    Goal("ppo", "exact match of sampled answers rises over the SFT policy",
         rises("eval_sampled_accuracy_before", "eval_sampled_accuracy_after")),
    Goal("ppo", "greedy reward-model score and exact match do not fall",
         lambda m: m["eval_reward_after"] >= m["eval_reward_before"] - 1e-6
         and m["eval_accuracy_after"] >= m["eval_accuracy_before"]),
    Goal("ppo", "KL to the reference <= 1.0", lambda m: m["kl"] <= 1.0),
    Goal("grpo", "reward-model score of sampled answers rises over the SFT policy",
         rises("eval_sampled_reward_before", "eval_sampled_reward_after")),
    Goal("grpo", "exact match of sampled answers rises over the SFT policy",
         rises("eval_sampled_exact_match_before", "eval_sampled_exact_match_after")),
    Goal("grpo", "greedy reward-model score does not fall",
         lambda m: m["eval_reward_after"] >= m["eval_reward_before"] - 1e-6),
)

# (stage, label, metric keys shown as "before -> after" or a single value)
MEASURES = (
    ("base", "held-out loss (nats/token)", ("eval_loss_before", "eval_loss_after")),
    ("sft", "held-out completion loss", ("eval_loss_before", "eval_loss_after")),
    ("sft", "greedy exact match", ("eval_exact_match",)),
    ("reward", "pairwise accuracy", ("eval_accuracy_before", "eval_accuracy")),
    ("reward", "held-out pairs", ("eval_pairs",)),
    ("dpo", "preference accuracy", ("eval_preference_accuracy_before", "eval_preference_accuracy_after")),
    ("dpo", "log-prob margin", ("eval_margin_before", "eval_margin_after")),
    ("dpo", "implicit-reward accuracy", ("eval_reward_accuracy",)),
    ("ppo", "sampled (T=1.5): reward-model score", ("eval_sampled_reward_before", "eval_sampled_reward_after")),
    ("ppo", "sampled (T=1.5): exact match", ("eval_sampled_accuracy_before", "eval_sampled_accuracy_after")),
    ("ppo", "greedy: reward-model score", ("eval_reward_before", "eval_reward_after")),
    ("ppo", "greedy: exact match", ("eval_accuracy_before", "eval_accuracy_after")),
    ("ppo", "KL to the reference", ("kl",)),
    ("grpo", "sampled (T=1.5): reward-model score", ("eval_sampled_reward_before", "eval_sampled_reward_after")),
    ("grpo", "sampled (T=1.5): exact match", ("eval_sampled_exact_match_before", "eval_sampled_exact_match_after")),
    ("grpo", "greedy: reward-model score", ("eval_reward_before", "eval_reward_after")),
    ("grpo", "greedy: exact match", ("eval_exact_match_before", "eval_exact_match_after")),
)


def check_goals(manifests: dict[str, dict]) -> list[tuple[Goal, bool]]:
    """Each goal with whether it holds for one run's manifests (a missing stage or metric does not hold)."""
    results = []
    for goal in GOALS:
        try:
            results.append((goal, bool(goal.holds(manifests[goal.stage]["metrics"]))))
        except KeyError:
            results.append((goal, False))
    return results


def read_manifests(output: Path) -> dict[str, dict]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(output.glob("*/manifest.json"))}


def threads_per_run(jobs: int) -> int:
    """Intra-op threads for each of `jobs` runs side by side: OMP_NUM_THREADS if set, else the cores shared out."""
    return int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(1, jobs)))


def run_seed(seed: int, output: Path, threads: int) -> dict:
    """One quickstart run in a fresh process with `threads` intra-op threads: its manifests, wall time and peak RSS
    (that process tree's)."""
    output.mkdir(parents=True, exist_ok=True)
    log_path = output.parent / f"{output.name}.log"
    with open(log_path, "w") as log:
        ran = common.run_pipeline(["run", RECIPE, f"seed={seed}", f"output_dir={output}", "--force", "all"], log,
                                  {"OMP_NUM_THREADS": str(threads)})
    if ran["exit"]:
        raise SystemExit(f"seed {seed} failed (exit {ran['exit']}); see {log_path}:\n{log_path.read_text()[-3000:]}")
    return {"seed": seed, "wall_s": round(ran["wall_s"], 1), "peak_rss_mib": round(ran["peak_rss_mib"], 1),
            "manifests": read_manifests(output)}


def locked_versions() -> dict[str, str]:
    pins = dict(re.findall(r"^([A-Za-z0-9._-]+)==(\S+)$", LOCK.read_text(), flags=re.M))
    return {name: pins[name] for name in SHOWN_LIBRARIES if name in pins}


def measure_seeds(seeds: list[int], out: Path, jobs: int) -> list[dict]:
    """`measure_seed` for each seed, `jobs` processes at a time, in seed order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda seed: measure_seed(seed, out, threads_per_run(jobs)), seeds))


def summarise(runs: list[dict], jobs: int = 1) -> dict:
    """Per measure: mean/min/max over seeds; per goal: held on every seed?"""
    rows = []
    for stage, label, keys in MEASURES:
        values = [[run["manifests"].get(stage, {}).get("metrics", {}).get(k) for k in keys] for run in runs]
        if any(v is None for row in values for v in row):
            continue
        columns = list(zip(*values))
        rows.append({"stage": stage, "measure": label, "keys": list(keys),
                     "mean": [sum(c) / len(c) for c in columns], "min": [min(c) for c in columns],
                     "max": [max(c) for c in columns]})
    goals = []
    for index, goal in enumerate(GOALS):
        held = [check_goals(run["manifests"])[index][1] for run in runs]
        goals.append({"stage": goal.stage, "goal": goal.text, "held": held, "all": all(held)})
    durations = {stage: [run["manifests"][stage].get("duration_s") for run in runs]
                 for stage in runs[0]["manifests"]}
    return {"seeds": [run["seed"] for run in runs], "rows": rows, "goals": goals,
            "wall_s": [run["wall_s"] for run in runs], "peak_rss_mib": [run["peak_rss_mib"] for run in runs],
            "stage_duration_s": durations, "versions": locked_versions(), "jobs": jobs,
            "machine": f"{common.cpu_line()}, OMP_NUM_THREADS={threads_per_run(jobs)}"}


def _fmt(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() and abs(value) >= 10 else f"{value:.3g}"


def _cell(values: list[float]) -> str:
    return " -> ".join(_fmt(v) for v in values)


def markdown(summary: dict) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    jobs = summary.get("jobs", 1)
    together = f", {jobs} at a time" if jobs > 1 else ""
    named = f" --results {summary['results']}" if summary.get("results", NAME) != NAME else ""
    lines = [f"Quickstart on seeds {seeds} ({len(summary['seeds'])} runs of `recipes/quickstart.yaml`{together}, "
             f"`python bench/quickstart.py{named}`). Machine: {summary['machine']}.", "",
             "| stage | held-out measure (before -> after) | mean | min | max |", "| --- | --- | --- | --- | --- |"]
    for row in summary["rows"]:
        lines.append(f"| `{row['stage']}` | {row['measure']} | {_cell(row['mean'])} | {_cell(row['min'])} "
                     f"| {_cell(row['max'])} |")
    lines += ["", "| stage | goal | holds on every seed (per seed) |", "| --- | --- | --- |"]
    for goal in summary["goals"]:
        per_seed = ", ".join("yes" if h else "NO" for h in goal["held"])
        lines.append(f"| `{goal['stage']}` | {goal['goal']} | {'yes' if goal['all'] else 'NO'} ({per_seed}) |")
    lines += [""]
    wall = summary["wall_s"]
    rss = summary["peak_rss_mib"]
    stage_times = ", ".join(f"{stage} {sum(t) / len(t):.0f} s" for stage, t in summary["stage_duration_s"].items()
                            if all(isinstance(x, (int, float)) for x in t))
    lines += ["", f"Wall time per run: mean {sum(wall) / len(wall):.0f} s (min {min(wall):.0f}, max {max(wall):.0f}); "
                  f"peak RSS: max {max(rss):.0f} MiB. Mean stage durations: {stage_times}.",
              "Versions (requirements/cpu.lock): " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
              + "."]
    return "\n".join(lines) + "\n"


def block_body(summary: dict) -> str:
    """The README's quickstart table: the results table itself."""
    return markdown(summary)


def measure_seed(seed: int, out: Path, threads: int) -> dict:
    print(f"seed {seed}: running the quickstart ({threads} thread(s)) ...", flush=True)
    run = run_seed(seed, out / f"seed-{seed}", threads)
    print(f"seed {seed}: {run['wall_s']:.0f} s, peak {run['peak_rss_mib']} MiB", flush=True)
    return run


def load_runs(out: Path, seeds: list[int]) -> list[dict]:
    """Runs measured earlier: wall time and peak RSS from `out/runs.json`, manifests from the artifacts."""
    measured = {run["seed"]: run for run in json.loads((out / "runs.json").read_text())}
    return [{**measured[seed], "manifests": read_manifests(out / f"seed-{seed}")} for seed in seeds]


def arguments():
    parser = common.bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the quickstart's seeds to run")
    common.add_out(parser, ROOT / "bench" / "out" / "quickstart", note="; each seed in seed-N, runs.json beside them")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at a time (each in its own process)")
    parser.add_argument("--from-runs", action="store_true",
                        help="do not train: rebuild the results from the runs already in --out")
    parser.add_argument("--results", default=NAME, metavar="NAME",
                        help="write bench/results/NAME.{json,md}; any other name than the default leaves the README's "
                             "table alone (e.g. quickstart-avx2 on a CPU without AVX-512, whose digits differ)")
    return parser


def readme_block(results_name: str) -> common.Block | None:
    """The README's table is the default results' only: a results file under another name is kept beside it."""
    return BLOCK if results_name == NAME else None


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.tables_only:
        summary = common.load_results(args.results)
        common.write_tables(args.results, markdown(summary), readme_block(args.results), block_body(summary))
        return 0
    runs = load_runs(args.out, args.seeds) if args.from_runs else measure_seeds(args.seeds, args.out, args.jobs)
    summary = {**summarise(runs, args.jobs), **({"results": args.results} if args.results != NAME else {})}
    (args.out / "runs.json").write_text(json.dumps([{k: v for k, v in run.items() if k != "manifests"}
                                                     for run in runs]) + "\n")
    common.write_results(args.results, summary, markdown(summary), readme_block(args.results), block_body(summary))
    print(markdown(summary))
    return 0 if all(goal["all"] for goal in summary["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
