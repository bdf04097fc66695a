"""Benchmarks for hf-pipeline, all in one job, each comparison run side by side (alternating, fresh processes):

    python bench/run.py                    # all of them -> bench/results/run.json, run.md, docs/benchmarks.md table
    python bench/run.py --only mfu         # one (or a few); the stored results keep the others
    python bench/run.py --quick            # 8 steps, one round: proves every side runs, writes nothing
    python bench/run.py --tables-only      # rewrite run.md and the docs table from run.json

Writes bench/results/run.json and bench/results/run.md (benchmark | measured | baseline | ratio | goal), and the
table between the `bench-table` markers of docs/benchmarks.md.
  1. overhead: our `sft` stage through the runner vs a plain TRL SFTTrainer script, identical settings.
  2. packing: real (non-pad) tokens/s of our `sft` stage with packing on vs off, on mixed-length data.
  3. dpo: pair-tokens/s and peak memory of our `dpo` stage, default vs precompute_ref_log_probs.
  4. gpu mfu: our pretrain and sft stages on a random ~1B Llama at seq 2048 in bf16, vs 989 TFLOP/s, vs a bf16
     matmul measured in the same job and vs a plain PyTorch loop on the same model (GPU only; `bench_mfu(work,
     smoke=True)` runs the same code on CPU with a tiny model, as tests/test_bench.py does).
  5. quickstart: peak resident memory of `python -m pipeline run recipes/quickstart.yaml` (goal < 3 GiB on CPU).
Every trial is a fresh `python bench/run.py --worker KIND --spec FILE` process (bench/common.py's trial protocol), so
each side pays the same imports; throughput comes from the Trainer's own train_runtime (the training loop only: model
load, tokenisation and saving excluded). Benchmarks report; they never assert. Nothing runs at import.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from common import ROOT, loop_stats, peak_memory

SCRIPT = Path(__file__).resolve()
NAME = "run"
BLOCK = common.Block(ROOT / "docs" / "benchmarks.md", "<!-- bench-table -->", "<!-- /bench-table -->")
BENCHMARKS = ("overhead", "packing", "dpo", "mfu", "quickstart")
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)


# ------------------------------------------------------------------------------------------------ shared setup


def build_base(folder: Path) -> Path:
    """A randomly initialised Llama (hidden 256, 4 layers) with our BPE tokenizer, saved as a Hub-format folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.stages.tokenizer import build

    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "corpus.jsonl").read_text().splitlines()]
    tokenizer = build(texts, vocab_size=1024, min_frequency=2, chat_template="chatml", model_max_length=512)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def mixed_length_sft(path: Path, rows: int = 400) -> Path:
    """Chat rows whose answers repeat 1..24 addition facts: lengths spread over ~10x, as real SFT data does."""
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for _ in range(rows):
            facts = [f"{a} + {b} = {a + b}" for a, b in ((rng.randint(0, 9), rng.randint(0, 9))
                                                          for _ in range(rng.choice([1, 2, 3, 6, 12, 24])))]
            handle.write(json.dumps({"messages": [{"role": "user", "content": "List some sums."},
                                                  {"role": "assistant", "content": " ".join(facts)}]}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------ workers


def worker_plain(spec: dict) -> dict:
    """The same SFT as `worker_ours`, written as a plain TRL script (what a user would write by hand). SFTConfig
    turns gradient checkpointing on by default; it is set off here, as in our stage, unless the spec asks for TRL's
    default (`trl_gradient_checkpointing`)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    stage, train = spec["stage"], spec["stage"]["train"]
    tokenizer = AutoTokenizer.from_pretrained(stage["model"])
    model = AutoModelForCausalLM.from_pretrained(stage["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=stage["data"]["path"], split="train").map(
        lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}, remove_columns=["messages"])
    args = SFTConfig(output_dir=str(Path(spec["out"]) / "checkpoints"), learning_rate=train["learning_rate"],
                     max_steps=train["max_steps"], per_device_train_batch_size=train["batch_size"],
                     max_length=train["max_length"], packing=bool(train.get("packing")), logging_steps=
                     train["logging_steps"], save_steps=train["save_steps"], seed=0, data_seed=0, report_to=[],
                     use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), warmup_steps=0.0,
                     gradient_checkpointing=spec.get("trl_gradient_checkpointing", False),
                     eos_token=tokenizer.eos_token, completion_only_loss=True, disable_tqdm=True,
                     optim="adamw_torch", logging_first_step=True, lr_scheduler_type="linear", weight_decay=0.0)
    started = time.time()
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(spec["out"]) / "model"))
    return {**loop_stats(trainer.state.log_history), "stage_wall_s": round(time.time() - started, 3),
            **peak_memory()}


MFU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=2048)  # ~1B parameters with a 32k vocabulary
MFU_SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256)
H100_BF16_TFLOPS = 989.0


def worker_mfu(spec: dict) -> dict:
    """The plain-PyTorch baseline for the MFU rows: forward + backward + fused AdamW of the same Llama the stages
    train (`spec`: config, vocab, seq, batch, steps), bf16 weights on GPU; plus a bf16 matmul's TFLOP/s (GPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = LlamaConfig(vocab_size=spec["vocab"], **spec["config"])
    model = LlamaForCausalLM(config).to(device, dtype)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, config.vocab_size, (spec["batch"], spec["seq"]), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    # warmup=0: like the stages' train_runtime, the first (slowest) step is part of the time
    seconds = _time(lambda: _train_step(model, optimizer, ids), spec["steps"], cuda, warmup=0)
    out = {"tokens_per_s": spec["batch"] * spec["seq"] / seconds, **peak_memory()}
    if cuda:
        out["matmul_tflops"] = _matmul_tflops()
    return out


def flops_per_token(config: dict, vocab: int, seq: int) -> float:
    """Training FLOPs per token: 6 x the parameters that do matmuls (all but the input embedding lookup) plus
    attention's 12 x layers x hidden x sequence length (the PaLM appendix B convention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **config))
    matmul_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6 * matmul_params + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq


def _train_step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _time(step, steps: int, cuda: bool = True, warmup: int = 3) -> float:
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


def _matmul_tflops(n: int = 8192) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _time(lambda: a @ b, 20) / 1e12


WORKERS = {"ours": common.stage_through_runner, "plain": worker_plain, "mfu": worker_mfu}


def run_worker(kind: str, spec: dict) -> dict:
    """One trial of this script's `kind` worker in a fresh process: its result."""
    return common.run_worker(SCRIPT, kind, spec)


# --------------------------------------------------------------------------------------------------- benchmarks


def sft_stage(base: Path, data: Path, steps: int, packing: bool, max_length: int, batch: int = 16) -> dict:
    return {"kind": "sft", "model": str(base), "data": {"path": str(data)},
            "train": {"learning_rate": 1e-3, "max_steps": steps, "batch_size": batch, "max_length": max_length,
                      "packing": packing, "logging_steps": steps, "save_steps": 10 * steps, "warmup_ratio": 0.0}}


def alternate(trials: dict[str, tuple[str, dict]], repeats: int, work: Path) -> dict[str, list[dict]]:
    """Run the named trials in turn, `repeats` rounds (A B A B ...), so background load hits both sides alike."""
    runs: dict[str, list[dict]] = {name: [] for name in trials}
    for round_ in range(repeats):
        for name, (kind, spec) in trials.items():
            result = run_worker(kind, {**spec, "out": str(work / f"{name}-{round_}")})
            runs[name].append(result)
            print(f"  {name} #{round_}: {_brief(result)}", flush=True)
    return runs


def _brief(result: dict) -> str:
    if "error" in result:
        return "ERROR " + result["error"][-300:]
    keys = ("tokens_per_s", "samples_per_s", "stage_wall_s", "peak_rss_mib")
    return ", ".join(f"{k}={result[k]:.1f}" for k in keys if k in result)


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def bench_overhead(base: Path, work: Path, steps: int, repeats: int) -> dict:
    stage = sft_stage(base, ROOT / "data" / "sft.jsonl", steps, packing=False, max_length=64)
    stage["completion_only_loss"] = True
    runs = alternate({"ours": ("ours", {"stage": stage}), "plain": ("plain", {"stage": stage}),
                      "plain_trl_defaults": ("plain", {"stage": stage, "trl_gradient_checkpointing": True})},
                     repeats, work)
    return {"runs": runs, **{f"{side}_{key}": median(runs[side], key) for side in runs
                             for key in ("tokens_per_s", "peak_rss_mib", "peak_cuda_mib", "stage_wall_s")}}


def bench_packing(base: Path, work: Path, steps: int, repeats: int) -> dict:
    data = mixed_length_sft(work / "mixed.jsonl")
    trials = {name: ("ours", {"stage": sft_stage(base, data, steps, packing=packing, max_length=256, batch=8)})
              for name, packing in (("packed", True), ("padded", False))}
    runs = alternate(trials, repeats, work)
    return {"runs": runs, **{f"{side}_tokens_per_s": median(runs[side], "tokens_per_s") for side in runs}}


def bench_dpo(base: Path, work: Path, steps: int, repeats: int) -> dict:
    """Two epochs over `8 * steps` pairs (the quickstart's DPO runs 2 epochs): precomputing runs the reference once
    per pair before training, the default once per pair per epoch. Fewer steps than one epoch would charge the
    precomputed side for pairs it never trains on."""
    def stage(precompute: bool) -> dict:
        return {"kind": "dpo", "model": str(base),
                "data": {"path": str(ROOT / "data" / "preferences.jsonl"), "max_rows": 8 * steps},
                "precompute_ref_log_probs": precompute,
                "train": {"learning_rate": 1e-4, "epochs": 2, "batch_size": 16, "max_length": 64,
                          "logging_steps": steps, "save_steps": 10 * steps}}

    runs = alternate({"default": ("ours", {"stage": stage(False)}), "precompute": ("ours", {"stage": stage(True)})},
                     repeats, work)
    tokens = pair_tokens(base)
    for side in runs.values():
        for run in side:
            if "samples" in run:  # stage wall time includes the reference pass wherever TRL runs it
                run["pair_tokens_per_s"] = run["samples"] * tokens / run["stage_wall_s"]
    return {"runs": runs, "mean_tokens_per_pair": tokens,
            **{f"{side}_{key}": median(runs[side], key) for side in runs
               for key in ("pair_tokens_per_s", "peak_rss_mib", "peak_cuda_mib")}}


def pair_tokens(base: Path) -> float:
    """Mean tokens in prompt + chosen + rejected of the preference data (chat-formatted prompt)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = [json.loads(line) for line in (ROOT / "data" / "preferences.jsonl").read_text().splitlines()]
    counts = [len(tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False))
              + len(tokenizer(r["chosen"])["input_ids"]) + len(tokenizer(r["rejected"])["input_ids"]) for r in rows]
    return statistics.mean(counts)


def long_texts(path: Path, rows: int, words: int, seed: int = 0) -> Path:
    """Random-word documents of about `words` words each: packed pretraining fills every row of the batch."""
    rng = random.Random(seed)
    vocabulary = [json.loads(line)["text"].split()[0] for line in (ROOT / "data" / "corpus.jsonl").read_text()
                  .splitlines()[:200]]
    with open(path, "w") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(words))}) + "\n")
    return path


def long_chats(path: Path, rows: int, words: int, seed: int = 1) -> Path:
    """Chats whose answers run to about `words` words, so SFT rows come near the sequence length unpadded."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            answer = " ".join(f"{a} + {b} = {a + b}" for a, b in ((rng.randint(0, 9), rng.randint(0, 9))
                                                                  for _ in range(words // 5)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "List some sums."},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def bench_mfu(work: Path, smoke: bool = False) -> dict:
    """MFU of our `pretrain` and `sft` stages (through the runner) on a random ~1B Llama at sequence length 2048
    in bf16, against 989 TFLOP/s (H100 dense bf16), against a bf16 matmul measured in the same job, and against a
    plain PyTorch loop on the same model. GPU only; `smoke` runs the same code on CPU with a tiny model."""
    import torch

    if not torch.cuda.is_available() and not smoke:
        return {"skipped": "no CUDA device in this job"}
    from pipeline.stages.tokenizer import build

    work.mkdir(parents=True, exist_ok=True)
    config, seq, batch, steps = (MFU_SMOKE_MODEL, 128, 2, 3) if smoke else (MFU_MODEL, 2048, 4, 20)
    texts = [json.loads(line)["text"] for line in (ROOT / "data" / "corpus.jsonl").read_text().splitlines()]
    tokenizer = build(texts, vocab_size=1024, min_frequency=2, chat_template="chatml", model_max_length=seq)
    tokenizer.save_pretrained(work / "tokenizer")
    vocab = len(tokenizer)
    train = {"learning_rate": 1e-4, "max_steps": steps, "batch_size": batch, "max_length": seq,
             "logging_steps": steps, "save_steps": 10 * steps, "warmup_ratio": 0.0}
    pretrain = {"kind": "pretrain", "tokenizer": str(work / "tokenizer"), "train": train,
                "model": {"architecture": "llama", "config": config},
                "data": {"path": str(long_texts(work / "long.jsonl", rows=steps * batch * 2, words=seq))}}
    runs = {"pretrain": run_worker("ours", {"stage": pretrain, "out": str(work / "pretrain")})}
    sft = {"kind": "sft", "model": str(work / "pretrain" / "artifacts" / "stage"), "train": train,
           "data": {"path": str(long_chats(work / "chats.jsonl", rows=steps * batch * 2, words=seq // 2))}}
    runs["sft"] = run_worker("ours", {"stage": sft, "out": str(work / "sft")})
    runs["loop"] = run_worker("mfu", {"config": config, "vocab": vocab, "seq": seq, "batch": batch, "steps": steps})
    per_token = flops_per_token(config, vocab, seq)
    out: dict = {"smoke": smoke, "seq": seq, "batch": batch, "steps": steps, "vocab": vocab,
                 "flops_per_token": per_token, "matmul_tflops": runs["loop"].get("matmul_tflops"), "runs": runs}
    for name, run in runs.items():
        if "tokens_per_s" in run:
            out[f"{name}_tflops"] = run["tokens_per_s"] * per_token / 1e12
    return out


def bench_quickstart(work: Path, capped: bool) -> dict:
    """Peak RSS of the quickstart run in its own process; `capped` shortens every stage (peak memory is set by
    models and data, not steps)."""
    log = work / "quickstart.log"
    with open(log, "w") as handle:
        ran = common.run_pipeline(["run", ROOT / "recipes" / "quickstart.yaml", f"output_dir={work / 'quickstart'}",
                                   *(step_caps() if capped else [])], handle)
    return {"returncode": ran["exit"], "wall_s": round(ran["wall_s"], 1), "peak_rss_mib": round(ran["peak_rss_mib"], 1),
            "tail": log.read_text()[-1500:]}


def step_caps(steps: int = 10, episodes: int = 64) -> list[str]:
    """Overrides that cap each quickstart stage's length, for whichever stages the recipe has today."""
    import yaml

    stages = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())["stages"]
    caps = []
    for name, stage in stages.items():
        if "train" in stage and stage["kind"] not in ("ppo", "grpo", "rloo"):
            caps.append(f"stages.{name}.train.max_steps={3 * steps if stage['kind'] == 'pretrain' else steps}")
        if stage["kind"] == "ppo":
            caps.append(f"stages.{name}.total_episodes={episodes}")
    return caps


# ------------------------------------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows(results: dict) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, measured, baseline, ratio, goal) for the Markdown table."""
    o, p, d, q, m = (results[k] for k in ("overhead", "packing", "dpo", "quickstart", "mfu"))
    table = [
        ("sft overhead: tokens/s, ours vs plain TRL", _f(o.get("ours_tokens_per_s")), _f(o.get("plain_tokens_per_s")),
         _r(ratio(o.get("ours_tokens_per_s"), o.get("plain_tokens_per_s"))), ">= 0.97"),
        ("sft overhead: tokens/s, ours vs plain TRL with its defaults (gradient checkpointing on)",
         _f(o.get("ours_tokens_per_s")), _f(o.get("plain_trl_defaults_tokens_per_s")),
         _r(ratio(o.get("ours_tokens_per_s"), o.get("plain_trl_defaults_tokens_per_s"))), "report"),
        ("sft overhead: peak RSS MiB, ours vs plain TRL", _f(o.get("ours_peak_rss_mib")), _f(o.get("plain_peak_rss_mib")),
         _r(ratio(o.get("ours_peak_rss_mib"), o.get("plain_peak_rss_mib"))), "report"),
        ("sft packing: real tokens/s, packed vs padded", _f(p.get("packed_tokens_per_s")), _f(p.get("padded_tokens_per_s")),
         _r(ratio(p.get("packed_tokens_per_s"), p.get("padded_tokens_per_s"))), ">= 1.5"),
        ("dpo: pair-tokens/s, precompute_ref_log_probs vs default", _f(d.get("precompute_pair_tokens_per_s")),
         _f(d.get("default_pair_tokens_per_s")), _r(ratio(d.get("precompute_pair_tokens_per_s"),
                                                       d.get("default_pair_tokens_per_s"))), "report"),
        ("dpo: peak RSS MiB, precompute vs default", _f(d.get("precompute_peak_rss_mib")), _f(d.get("default_peak_rss_mib")),
         _r(ratio(d.get("precompute_peak_rss_mib"), d.get("default_peak_rss_mib"))), "report"),
        ("quickstart: peak RSS MiB (CPU)", _f(q.get("peak_rss_mib")), "3072", _r(ratio(q.get("peak_rss_mib"), 3072)),
         "< 1.0 (under 3 GiB)"),
    ]
    return table + mfu_rows(m)


def mfu_rows(m: dict) -> list[tuple[str, str, str, str, str]]:
    if "skipped" in m or "error" in m or "pretrain_tflops" not in m:
        why = m.get("skipped") or m.get("error") or "no result"
        return [("gpu mfu: ~1B Llama, seq 2048, bf16", "skipped", "989 TFLOP/s", "-", f"report ({why})")]
    rows = []
    for stage in ("pretrain", "sft"):
        achieved = m.get(f"{stage}_tflops")
        rows += [(f"gpu mfu: {stage} stage TFLOP/s vs 989 dense bf16", _f(achieved), _f(H100_BF16_TFLOPS),
                  _r(ratio(achieved, H100_BF16_TFLOPS)), ">= 0.45"),
                 (f"gpu: {stage} stage TFLOP/s vs plain PyTorch loop, same model", _f(achieved),
                  _f(m.get("loop_tflops")), _r(ratio(achieved, m.get("loop_tflops"))), "report")]
    if m.get("matmul_tflops"):
        rows.append(("gpu: pretrain stage TFLOP/s vs bf16 matmul measured in this job", _f(m["pretrain_tflops"]),
                     _f(m["matmul_tflops"]), _r(ratio(m["pretrain_tflops"], m["matmul_tflops"])), "report"))
    return rows


def _f(value) -> str:
    return "-" if value is None else (f"{value:.1f}" if isinstance(value, float) else str(value))


def _r(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: dict) -> list[str]:
    """The machine line and the results table: the head of run.md and the block in docs/benchmarks.md."""
    meta = results["meta"]
    lines = [f"Machine: {meta['machine']}; device: {meta['device']}; {meta['repeats']} alternating round(s), "
             "median reported.", "",
             "| benchmark | measured | baseline | ratio | goal |", "| --- | --- | --- | --- | --- |"]
    return lines + [f"| {' | '.join(row)} |" for row in rows(results)]


def block_body(results: dict) -> str:
    return "\n".join(table(results)) + "\n"


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"# hf-pipeline benchmarks ({'quick' if meta['quick'] else 'full'} run, {meta['date']})", ""]
    lines += table(results)
    lines += ["", "How it is measured:", "",
              f"- Model: random Llama {MODEL['hidden_size']} hidden, {MODEL['num_hidden_layers']} layers, our BPE "
              "tokenizer (1024 tokens), fp32 on CPU (bf16 on GPU).",
              "- Every trial is a fresh process and the two sides alternate (A B A B), so one-time startup (imports, "
              "process launch) is paid equally and excluded: tokens/s = the Trainer's non-pad `num_tokens` over its "
              "own `train_runtime` (the training loop only, no model load, tokenisation or saving).",
              "- Overhead: identical settings on both sides (same model folder, data/sft.jsonl, steps, batch 16, "
              "max_length 64, completion-only loss, no packing, no gradient checkpointing). Ours runs the full "
              "runner (fingerprints, atomic artifact, manifest, NaN guard, rank checks); peak RSS is each process's "
              "own maximum. TRL's SFTConfig turns gradient checkpointing on by default (our stage leaves it off "
              "unless `train.gradient_checkpointing` is set), so a plain script with TRL's defaults is also shown.",
              "- Packing: mixed-length chat data (answers of 1..24 sums), batch 8, max_length 256; padded = pad to "
              "the longest in the batch; only real tokens are counted. Without FlashAttention (CPU, SDPA) the sft "
              "stage packs by wrapping rows; with it, best-fit-decreasing padding-free packing.",
              "- DPO: 2 epochs over the same pairs; pair-tokens/s = pairs trained x mean tokens per pair "
              "(prompt+chosen+rejected) / stage wall time, which includes the reference log-prob pass wherever TRL "
              "runs it (once up front when precomputed, every epoch otherwise).",
              "- GPU MFU: tokens/s of our pretrain (packed) and sft stages through the runner, and of a plain "
              "PyTorch loop (forward, backward, fused AdamW, bf16 weights) on the same ~1B Llama, batch 4 x 2048; "
              "FLOPs per token = 6 x matmul parameters + 12 x layers x hidden x 2048; 20 steps, the first "
              "included on every side.",
              "- Quickstart: `python -m pipeline run recipes/quickstart.yaml` in a child process; peak RSS from "
              "os.wait4 on that process, every stage shortened by overrides (pretrain 30 steps, others 10, PPO 64 "
              "episodes): peak memory is set by the models and data, not by the number of steps.",
              "- On a shared machine absolute numbers are noisy; ratios of side-by-side runs much less so. "
              "Benchmarks never assert timings."]
    return "\n".join(lines) + "\n"


def arguments():
    parser = common.bench_parser(__doc__, WORKERS, BENCHMARKS)
    common.add_quick(parser, "8 steps and one round")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.worker:
        return common.serve_worker(WORKERS, args)
    if args.tables_only:
        results = common.load_results(NAME)
        common.write_tables(NAME, markdown(results), BLOCK, block_body(results))
        return 0
    return run_all(args.quick, common.selected(args, BENCHMARKS), keep=bool(args.only))


def run_all(quick: bool, names: list[str], keep: bool) -> int:
    """The benchmarks `names`, each saved as it finishes (not under `quick`); `keep`: the stored results keep the
    other benchmarks' entries."""
    os.environ.update(common.BENCH_ENV)
    steps, repeats = (8, 1) if quick else (20, 2)
    with tempfile.TemporaryDirectory(prefix="hfp-bench-") as tmp:
        work = Path(tmp)
        base = build_base(work / "base")
        results = {**(common.load_results(NAME) if keep else {}), "meta": meta(quick, steps, repeats)}
        benches = {"overhead": lambda: bench_overhead(base, work / "overhead", steps, repeats),
                   "packing": lambda: bench_packing(base, work / "packing", steps, repeats),
                   "dpo": lambda: bench_dpo(base, work / "dpo", steps, 1),
                   "mfu": lambda: bench_mfu(work / "mfu"),
                   "quickstart": lambda: bench_quickstart(work, capped=True)}
        for name in BENCHMARKS:
            if name not in names:
                continue
            print(f"[bench] {name}", flush=True)
            try:
                results[name] = benches[name]()
            except Exception as error:  # report what failed, keep the other benchmarks
                results[name] = {"error": repr(error)}
            if not quick:
                record(results)
    print(markdown(results) if all(k in results for k in BENCHMARKS) else json.dumps(results, indent=2, default=str))
    return 0


def meta(quick: bool, steps: int, repeats: int) -> dict:
    import torch

    return {"quick": quick, "steps": steps, "repeats": repeats, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s) visible",
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"}


def record(results: dict) -> None:
    """run.json always; run.md and the docs table once every benchmark has an entry."""
    if all(k in results for k in BENCHMARKS):
        common.write_results(NAME, results, markdown(results), BLOCK, block_body(results))
    else:
        common.save_results(NAME, results)


if __name__ == "__main__":
    sys.exit(main())
