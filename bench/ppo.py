"""Benchmark: our PPO (pipeline.rl) against the old-TRL PPOTrainer anchor at the same settings, in one job.

Launch: `.venv/bin/python bench/ppo.py` (from the repo root; writes bench/results/ppo.json and bench/results/ppo.md).
Settings (as in ../shared/anchors/old_trl_ppo.py): random-init tiny Llama with a local BPE tokenizer, hidden
128 / 2 layers and 512 / 4 layers, 128 episodes, batch 8, response length 32, one PPO epoch, separate value and
reward models, CPU. Each run is its own subprocess so its peak RSS is its own. On a GPU it also runs a ~0.5B config
with and without LoRA. The anchor needs its venv (see ../shared/anchors/README.md):
  python3 -m venv /work/oldtrl-venv && /work/oldtrl-venv/bin/pip install torch==2.13.0 'transformers<5' \
      'trl==0.23.*' 'peft<0.18' datasets accelerate
Nothing runs at import.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = Path(os.environ.get("PIPELINE_ANCHORS", ROOT.parent / "shared" / "anchors")) / "old_trl_ppo.py"
ANCHOR_PY = Path(os.environ.get("OLDTRL_PYTHON", "/work/oldtrl-venv/bin/python"))
SIZES = [(128, 2), (512, 4)]
EPISODES, BATCH, RESPONSE = 128, 8, 32
WORDS = "the cat dog sat on mat ran fast slow big small red blue happy sad tree house river sun moon star".split()


# ---------------------------------------------------------------------------------------------- our PPO (child)


def tokenizer_like_anchor():
    """The anchor's tokenizer (same words, same BPE settings) with a plain-concatenation chat template."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    random.seed(0)
    texts = [" ".join(random.choice(WORDS) for _ in range(random.randint(8, 40))) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return hf


def build_models(hidden: int, layers: int, lora: bool, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline.rl import trainer as tr

    tok = tokenizer_like_anchor()
    torch.manual_seed(0)
    heads = 4 if hidden <= 512 else 14
    cfg = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden if hidden <= 512 else 4864,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
               max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    policy = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    value = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg)).to(dtype)
    reward = LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg)).to(dtype)
    reference = None
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                   task_type="CAUSAL_LM"))
    else:
        reference = tr.reference_copy(policy)
    return tr.Models(policy=policy, critic=tr.Critic(value), reward=reward, tokenizer=tok, reference=reference), tok


def ours(hidden: int, layers: int, lora: bool = False) -> dict:
    """Train our PPO at the anchor's settings; return timings, curves and peak RSS."""
    import random
    import resource

    import torch

    from pipeline import schema
    from pipeline.rl import trainer as tr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, tok = build_models(hidden, layers, lora, device)
    random.seed(0)
    rows = [{"prompt": [{"role": "user", "content": " ".join(random.choices(WORDS, k=6))}]} for _ in range(256)]
    cfg = schema.PpoStage(kind="ppo", model="unused", reward_model="unused", data={"path": "unused"},
                          train={"learning_rate": 3e-6, "save_steps": 10**6}, total_episodes=EPISODES,
                          rollout_batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1, max_new_tokens=RESPONSE,
                          missing_eos_penalty=1.0, kl_coef=0.05, reward_normalization=False)
    trainer = tr.PPOTrainer(cfg, m, rows, work_dir=None, seed=0)
    started = time.perf_counter()
    history = trainer.train(progress=False)
    seconds = time.perf_counter() - started
    split = {k: sum(h[k] for h in history) for k in ("time/generation", "time/scoring", "time/update")}
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    return {"seconds": seconds, "episodes_per_s": EPISODES / seconds, "steps": len(history),
            "step_time_split_s": {k: v / len(history) for k, v in split.items()},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mib": peak,
            "curves": curve_summary(history), "device": device, "lora": lora}


def curve_summary(history: list[dict]) -> dict:
    def mean(key, part):
        values = [h[key] for h in part]
        return sum(values) / len(values)

    quarter = max(1, len(history) // 4)
    return {"reward_first_quarter": mean("reward/mean", history[:quarter]),
            "reward_last_quarter": mean("reward/mean", history[-quarter:]),
            "kl_first_quarter": mean("kl", history[:quarter]), "kl_last_quarter": mean("kl", history[-quarter:]),
            "kl_max": max(h["kl"] for h in history)}


# -------------------------------------------------------------------------------------------- parent (driver)


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_XET="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_anchor(hidden: int, layers: int) -> dict:
    """The old-TRL script in its own venv; its peak RSS is read by a small wrapper around it."""
    if not ANCHOR_PY.exists():
        return {"error": f"{ANCHOR_PY} missing: create it as described in {ANCHOR.parent / 'README.md'}"}
    wrapper = ("import resource, runpy, sys; sys.argv = [sys.argv[1], sys.argv[2], sys.argv[3]]; "
               "runpy.run_path(sys.argv[0], run_name='__main__'); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([str(ANCHOR_PY), "-c", wrapper, str(ANCHOR), str(hidden), str(layers)],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    found = re.search(r"([\d.]+)s total, ([\d.]+) episodes/s", out.stdout)
    rss = re.search(r"MAXRSS (\d+)", out.stdout)
    seconds = float(found.group(1))
    return {"seconds": seconds, "episodes_per_s": EPISODES / seconds, "peak_rss_mib": int(rss.group(1)) / 1024}


def markdown(results: dict) -> str:
    lines = ["# PPO benchmark: ours vs old TRL PPOTrainer", "",
             f"{results['settings']}", "",
             "| model | ours ep/s | old TRL ep/s | ratio | ours step split gen/score/update (s) | "
             "ours peak RSS MiB | old TRL peak RSS MiB | reward first->last quarter | KL first->last (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        o, a = row["ours"], row["anchor"]
        s, c = o["step_time_split_s"], o["curves"]
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") else "n/a"
        anchor_eps = f"{a['episodes_per_s']:.1f}" if "episodes_per_s" in a else a.get("error", "n/a")
        anchor_rss = f"{a['peak_rss_mib']:.0f}" if "peak_rss_mib" in a else "n/a"
        lines.append(f"| {row['name']} | {o['episodes_per_s']:.1f} | {anchor_eps} | {ratio} | "
                     f"{s['time/generation']:.3f} / {s['time/scoring']:.3f} / {s['time/update']:.3f} | "
                     f"{o['peak_rss_mib']:.0f} | {anchor_rss} | {c['reward_first_quarter']:.3f} -> "
                     f"{c['reward_last_quarter']:.3f} | {c['kl_first_quarter']:.3f} -> {c['kl_last_quarter']:.3f} "
                     f"({c['kl_max']:.3f}) |")
    for row in results.get("gpu_runs", []):
        o = row["ours"]
        lines.append(f"| {row['name']} (GPU) | {o['episodes_per_s']:.1f} | - | - | "
                     f"{o['step_time_split_s']['time/generation']:.3f} / {o['step_time_split_s']['time/scoring']:.3f}"
                     f" / {o['step_time_split_s']['time/update']:.3f} | {o['peak_rss_mib']:.0f} | - | - | - |")
    lines += ["", f"Machine: {results['machine']}", ""]
    return "\n".join(lines)


def main() -> None:
    import platform

    import torch

    runs = []
    for hidden, layers in SIZES:
        mine, anchor = run_child([str(hidden), str(layers)]), run_anchor(hidden, layers)
        ratio = mine["episodes_per_s"] / anchor["episodes_per_s"] if "episodes_per_s" in anchor else None
        runs.append({"name": f"llama h{hidden}/L{layers}", "ours": mine, "anchor": anchor, "ratio": ratio})
        print(f"h{hidden}/L{layers}: ours {mine['episodes_per_s']:.1f} ep/s, anchor "
              f"{anchor.get('episodes_per_s', float('nan')):.1f} ep/s, ratio {ratio}", flush=True)
    results = {"settings": f"{EPISODES} episodes, batch {BATCH}, response length {RESPONSE}, 1 PPO epoch, separate "
                           "value and reward models, random-init Llama, local BPE tokenizer (vocab 512)",
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                          f"threads {torch.get_num_threads()}", "runs": runs}
    if torch.cuda.is_available():  # ~0.5B (Qwen2.5-0.5B-like sizes), full and LoRA
        results["gpu_runs"] = [{"name": f"llama h896/L24{' LoRA' if lora else ''}",
                                "ours": run_child(["896", "24"] + (["lora"] if lora else []))} for lora in (False, True)]
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppo.json").write_text(json.dumps(results, indent=2))
    (out / "ppo.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(ROOT))
        print(json.dumps(ours(int(sys.argv[2]), int(sys.argv[3]), lora="lora" in sys.argv[4:])))
    else:
        main()
