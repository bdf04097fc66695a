"""GPU benchmark: MFU of our pretrain and SFT (full, LoRA) stages on a random ~1.1B Llama at sequence length 2048 in
bf16, and our PPO and GRPO stages (full and LoRA policy) on a random ~0.37B Llama with rollouts on transformers
(`rollout: {engine: hf}`) and on vLLM (`rollout: {engine: vllm}`, when the vLLM environment exists), in one job under a
deadline.

Launch: `bash bench/gpu.sh` (environment, `pytest -m gpu`, then this script), or from the repo root
    python bench/gpu.py [--only PART ...] [--deadline-s S] [--out DIR] [--quick] [--dry-run] [--tables-only]
It writes bench/results/gpu.json and gpu.md (bench/common.py's results writer; no README block).

- Parts, in run order: pretrain, sft_full, sft_lora (MFU), then ppo_hf, ppo_vllm, grpo_hf, grpo_vllm, ppo_lora_hf,
  ppo_lora_vllm, grpo_lora_hf, grpo_lora_vllm. Each runs through the real runner as the one stage of a recipe (built
  here as a dict, written as YAML), in its own process (`--worker stage`) with a timeout; once the global deadline
  (`--deadline-s`, 420) is near, the parts left are recorded as skipped, and a part still running at the deadline is
  killed and recorded as timed out. vLLM parts are skipped, with the reason, when `--vllm-python` (default
  .venv-vllm/bin/python) has no vllm (or no CUDA torch on a GPU run).
- MFU: a callback this bench adds to the stage's Trainer (in the worker process only) times every optimizer step,
  CUDA-synchronised; the first `--warmup` steps (3) are left out and the next `--steps` (10) are timed. Tokens come
  from TRL's `num_tokens` log (packed rows of 2048: no padding). Model FLOPs per token = 6 x the parameters that do
  matmuls (all but the input embedding) + 12 x layers x hidden x sequence (attention, PaLM appendix B), as in
  bench/run.py; MFU = achieved FLOP/s over the GPU's dense bf16 peak, looked up from torch.cuda.get_device_name()
  (H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, A100 312; `GPU_PEAK_TFLOPS` overrides; unknown: null).
  LoRA rows also give `mfu_executed`: a LoRA step computes no weight gradient for the frozen weights, so it executes
  about 4 x instead of 6 x the parameters per token.
- RL: rollout 64 prompts (GRPO: 64 completions, groups of 8) x 64 new tokens, 4 steps, the first one left out as
  warm-up. PPO's per-step `time/generation`, `time/scoring`, `time/update` and `time/weight_sync` are read from the
  stage's manifest (its timing log); its step wall time from a timer on `PPOTrainer.step`. GRPO (TRL) logs no split,
  so the bench times `GRPOTrainer._generate` (the vLLM engine's weight sync inside it, timed on its own) within each
  Trainer step. Generation share = generation seconds / step seconds; episodes/s over the timed steps; peak GPU
  memory = torch.cuda.max_memory_allocated() of the trainer's process (a vLLM server's memory is its own: it may take
  `rollout.gpu_memory_utilization`, 0.3, of the device). A LoRA PPO row trains the critic as LoRA too (`value_lora`).
- Models are random-init from config; the tokenizer is trained here on data/corpus.jsonl (the `tokenizer` stage's
  byte-level BPE with the ChatML template, as the quickstart does), then filled with added tokens to the configs'
  32,000 vocabulary; PPO/GRPO prompts are data/prompts.jsonl. Nothing is downloaded.
- `--quick`: every part for real at tiny sizes (a CPU will do) into --out only: proves the code paths, writes nothing
  under bench/results. `--dry-run`: parses the flags, builds every recipe it would run (written to --out/recipes and
  validated against the schema), and writes gpu.json and gpu.md for a fake measurement set into --out, without a GPU.
Nothing runs at import.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import common
from common import ROOT

SCRIPT = Path(__file__).resolve()
NAME = "gpu"
MFU_PARTS = ("pretrain", "sft_full", "sft_lora")
RL_PARTS = ("ppo_hf", "ppo_vllm", "grpo_hf", "grpo_vllm", "ppo_lora_hf", "ppo_lora_vllm", "grpo_lora_hf",
            "grpo_lora_vllm")
PARTS = MFU_PARTS + RL_PARTS
DEFAULT_OUT = ROOT / "bench" / "out" / "gpu"
DEFAULT_VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
PROMPTS = ROOT / "data" / "prompts.jsonl"
CORPUS = ROOT / "data" / "corpus.jsonl"

# ~1.1B (1,104,218,112 parameters): the MFU model
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)
# the "~0.5B" class of config (Qwen-0.5B-like widths) with a 32k vocabulary: 373,867,520 parameters
LLAMA_05B = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

# dense bf16 peak TFLOP/s by device name; the first match wins (so the PCIe and NVL H100s before the SXM one)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


@dataclass(frozen=True)
class Sizes:
    """What one run trains: the MFU model and its batches, the RL model and its rollouts."""

    mfu_config: dict
    rl_config: dict
    seq: int  # MFU sequence length (train.max_length, packed)
    batch: int
    warmup: int  # MFU optimizer steps left out of the timing
    steps: int  # MFU optimizer steps timed
    rollout: int  # PPO prompts per step; GRPO completions per step (train.batch_size)
    mini_batch: int
    forward_batch: int
    new_tokens: int
    num_generations: int
    rl_steps: int  # RL steps (the first one is left out of the timing)
    rl_max_length: int
    trained_vocab: int  # BPE merges trained on the corpus before the filler tokens
    precision: str  # train.mixed_precision


FULL = Sizes(mfu_config=LLAMA_1B, rl_config=LLAMA_05B, seq=2048, batch=4, warmup=3, steps=10, rollout=64,
             mini_batch=16, forward_batch=32, new_tokens=64, num_generations=8, rl_steps=4, rl_max_length=256,
             trained_vocab=2000, precision="bf16")
QUICK = Sizes(mfu_config=TINY, rl_config={**TINY, "num_key_value_heads": 2}, seq=128, batch=2, warmup=1, steps=2,
              rollout=8, mini_batch=4, forward_batch=8, new_tokens=8, num_generations=4, rl_steps=2, rl_max_length=64,
              trained_vocab=400, precision="auto")


def part_kind(part: str) -> tuple[str, bool, str | None]:
    """(stage kind, LoRA?, rollout engine or None) of a part name."""
    if part in MFU_PARTS:
        return ("pretrain" if part == "pretrain" else "sft"), part == "sft_lora", None
    words = part.split("_")
    return words[0], "lora" in words, words[-1]


# ------------------------------------------------------------------------------------------------ model arithmetic


def count_parameters(config: dict, reward: bool = False) -> int:
    """Parameters of the Llama `config` (a sequence classifier with one label under `reward`), built on the meta
    device (no memory, no init)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    with torch.device("meta"):
        cls = LlamaForSequenceClassification if reward else LlamaForCausalLM
        model = cls(LlamaConfig(**config, **({"num_labels": 1} if reward else {})))
    return sum(p.numel() for p in model.parameters())


def matmul_parameters(config: dict) -> int:
    """The parameters that take part in a matmul per token: all but the input embedding (a lookup), unless it is
    tied to the LM head (which multiplies)."""
    embedding = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * config["hidden_size"]
    return count_parameters(config) - embedding


def flops_per_token(config: dict, seq: int, weight_gradients: bool = True) -> float:
    """Training FLOPs per token: 6 x matmul parameters (forward 2, backward 4) + attention's 12 x layers x hidden x
    seq (PaLM appendix B). Without `weight_gradients` (LoRA: frozen weights) the backward pass computes only the
    activations' gradients: 4 x the parameters; attention's term is the same (it has no weights)."""
    per_parameter = 6 if weight_gradients else 4
    return per_parameter * matmul_parameters(config) + 12 * config["num_hidden_layers"] * config["hidden_size"] * seq


def peak_tflops(device_name: str | None) -> float | None:
    """The device's dense bf16 peak in TFLOP/s by its name (`GPU_PEAK_TFLOPS` overrides); None when unknown."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"])
    for key, tflops in PEAK_BF16_TFLOPS:
        if device_name and key.lower() in device_name.lower():
            return tflops
    return None


def mfu(tokens_per_s: float, per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    return None if not peak else tokens_per_s * per_token / (peak * 1e12)


# ------------------------------------------------------------------------------------------------ inputs and recipes


def paths(work: Path) -> dict[str, Path]:
    """Where the inputs every recipe names live under the work folder."""
    return {"tokenizer": work / "tokenizer", "mfu_model": work / "llama-1b", "policy": work / "policy",
            "reward": work / "reward", "text": work / "data" / "text.jsonl", "chats": work / "data" / "chats.jsonl",
            "prompts": PROMPTS}


def corpus_words() -> list[str]:
    words = sorted({w for line in CORPUS.read_text().splitlines() for w in json.loads(line)["text"].split()})
    return [w for w in words if w.isalpha()] or words


def write_data(sizes: Sizes, work: Path) -> None:
    """Random-word documents of `seq` words (packed pretraining fills every row) and chats whose answers run to
    about seq/4 words (packed SFT rows, none over the length limit), enough for every MFU step."""
    rng, vocabulary = random.Random(0), corpus_words()
    where = paths(work)
    where["text"].parent.mkdir(parents=True, exist_ok=True)
    sequences = (sizes.warmup + sizes.steps) * sizes.batch
    with open(where["text"], "w") as handle:
        for _ in range(sequences + 4):
            handle.write(json.dumps({"text": " ".join(rng.choice(vocabulary) for _ in range(sizes.seq))}) + "\n")
    with open(where["chats"], "w") as handle:
        for _ in range(4 * sequences + 8):
            answer = " ".join(f"{a} + {b} = {a + b}." for a, b in ((rng.randint(0, 9), rng.randint(0, 9))
                                                                   for _ in range(sizes.seq // 20)))
            handle.write(json.dumps({"messages": [{"role": "user", "content": "List some sums."},
                                                  {"role": "assistant", "content": answer}]}) + "\n")


def mfu_train(sizes: Sizes) -> dict:
    return {"learning_rate": 1.0e-4, "max_steps": sizes.warmup + sizes.steps, "batch_size": sizes.batch,
            "max_length": sizes.seq, "logging_steps": 1, "save_steps": 10**6, "warmup_ratio": 0.0,
            "lr_scheduler": "constant", "mixed_precision": sizes.precision, "packing": True}


def rl_train(sizes: Sizes, **extra: Any) -> dict:
    return {"learning_rate": 1.0e-5, "max_length": sizes.rl_max_length, "logging_steps": 1, "save_steps": 10**6,
            "mixed_precision": sizes.precision, **extra}


def rollout_section(engine: str, vllm_python: str) -> dict:
    return {"engine": "hf"} if engine == "hf" else {"engine": "vllm", "python": vllm_python}


def stage_for(part: str, sizes: Sizes, work: Path, vllm_python: str) -> dict:
    """The one stage of `part`'s recipe."""
    kind, lora, engine = part_kind(part)
    where = {k: str(v) for k, v in paths(work).items()}
    if kind == "pretrain":
        return {"kind": "pretrain", "tokenizer": where["tokenizer"],
                "model": {"architecture": "llama", "config": dict(sizes.mfu_config), "attn_implementation": "sdpa"},
                "data": {"path": where["text"]}, "train": mfu_train(sizes)}
    if kind == "sft":
        stage = {"kind": "sft", "model": {"path": where["mfu_model"], "attn_implementation": "sdpa"},
                 "data": {"path": where["chats"]}, "train": mfu_train(sizes)}
        return {**stage, "lora": dict(LORA)} if lora else stage
    common_fields = {"model": where["policy"], "reward_model": where["reward"], "data": {"path": where["prompts"]},
                     "max_new_tokens": sizes.new_tokens, "eval_prompts": 4, "eval_samples": 1,
                     "rollout": rollout_section(engine, vllm_python)}
    if kind == "ppo":
        stage = {"kind": "ppo", **common_fields, "train": rl_train(sizes),
                 "total_episodes": sizes.rollout * sizes.rl_steps, "rollout_batch_size": sizes.rollout,
                 "mini_batch_size": sizes.mini_batch, "ppo_epochs": 1, "forward_batch_size": sizes.forward_batch}
        return {**stage, "lora": dict(LORA), "value_lora": True} if lora else stage
    stage = {"kind": "grpo", **common_fields, "num_generations": sizes.num_generations,
             "train": rl_train(sizes, max_steps=sizes.rl_steps, batch_size=sizes.rollout)}
    return {**stage, "lora": dict(LORA)} if lora else stage


def recipe_for(part: str, sizes: Sizes, work: Path, vllm_python: str) -> dict:
    """`part`'s recipe as a dict: one stage, named after its kind, into WORK/PART/artifacts."""
    kind, _, _ = part_kind(part)
    return {"name": f"gpu-{part.replace('_', '-')}", "output_dir": str(work / part / "artifacts"), "seed": 0,
            "stages": {kind: stage_for(part, sizes, work, vllm_python)}}


def recipes(parts: list[str], sizes: Sizes, work: Path, vllm_python: str) -> dict[str, dict]:
    return {part: recipe_for(part, sizes, work, vllm_python) for part in parts}


def rollout_supported() -> bool:
    """Whether this tree's schema has the ppo/grpo `rollout:` section."""
    sys.path.insert(0, str(ROOT))
    from pipeline import schema

    return all("rollout" in getattr(schema, cls).model_fields for cls in ("PpoStage", "GrpoStage"))


def for_this_schema(recipe: dict) -> dict:
    """The recipe as this tree's schema takes it: without `rollout: {engine: hf}` (the default engine) where the
    schema has no `rollout` field yet. A vllm recipe is left as it is (the planner skips it)."""
    if rollout_supported():
        return recipe
    out = copy.deepcopy(recipe)
    for stage in out["stages"].values():
        if stage.get("rollout") == {"engine": "hf"}:
            del stage["rollout"]
    return out


def validate(recipe: dict, where: Path) -> None:
    """Parse `recipe` with the project's loader (schema, references, that the named files exist); raises
    RecipeError naming the key."""
    sys.path.insert(0, str(ROOT))
    from pipeline.recipe import parse_recipe

    parse_recipe(copy.deepcopy(recipe), where)


# ------------------------------------------------------------------------------------------------ workers (children)


def build_tokenizer(sizes: Sizes, folder: Path):
    """The `tokenizer` stage's byte-level BPE (ChatML) trained on the corpus, filled with added tokens to exactly
    the configs' vocabulary, so every id a random model samples decodes and re-encodes."""
    from tokenizers import AddedToken

    from pipeline.stages.tokenizer import build

    vocab = sizes.mfu_config["vocab_size"]
    assert vocab == sizes.rl_config["vocab_size"], "one tokenizer serves both models"
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines()]
    tokenizer = build(texts, sizes.trained_vocab, 2, "chatml", max(sizes.seq, sizes.rl_max_length))
    missing = vocab - len(tokenizer)
    if missing < 0:
        raise ValueError(f"the trained tokenizer has {len(tokenizer)} tokens, more than the vocabulary {vocab}")
    tokenizer.add_tokens([AddedToken(f"<|filler_{i}|>", normalized=False) for i in range(missing)])
    assert len(tokenizer) == vocab, (len(tokenizer), vocab)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_random_model(config: dict, tokenizer, folder: Path, reward: bool = False) -> int:
    """A random-init Llama of `config` (bf16 on a GPU, where it is built), with the tokenizer, as a from_pretrained
    folder; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cuda = torch.cuda.is_available()
    values = dict(config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, **({"num_labels": 1} if reward else {}))
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = (LlamaForSequenceClassification if reward else LlamaForCausalLM)(LlamaConfig(**values))
    model.to(torch.bfloat16 if cuda else torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    count = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()
    return count


def device_info() -> dict:
    import platform

    import torch

    cuda = torch.cuda.is_available()
    info = {"device": "cuda" if cuda else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "machine": platform.machine()}
    if cuda:
        info.update(device_name=torch.cuda.get_device_name(), capability=".".join(map(str,
                    torch.cuda.get_device_capability())), gpu_memory_gib=round(
                    torch.cuda.get_device_properties(0).total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(device_name=f"CPU ({platform.processor() or platform.machine()})", bf16=False)
    return info


def worker_setup(spec: dict) -> dict:
    """Worker: the tokenizer, the data files and the random model folders the selected parts need; the device."""
    sys.path.insert(0, str(ROOT))
    started = time.perf_counter()
    sizes, work = Sizes(**spec["sizes"]), Path(spec["work"])
    where = paths(work)
    tokenizer = build_tokenizer(sizes, where["tokenizer"])
    write_data(sizes, work)
    built = {}
    if spec.get("mfu_model"):
        built["mfu_model"] = save_random_model(sizes.mfu_config, tokenizer, where["mfu_model"])
    if spec.get("rl_models"):
        built["policy"] = save_random_model(sizes.rl_config, tokenizer, where["policy"])
        built["reward"] = save_random_model(sizes.rl_config, tokenizer, where["reward"], reward=True)
    return {**device_info(), "parameters": built, "vocab": len(tokenizer), "setup_s": time.perf_counter() - started}


class Timers:
    """Wall-clock spans recorded in the worker: `steps` (start, end) of each optimizer step, `events[name]`
    (start, seconds) of each timed call; CUDA is synchronised at each mark so the GPU's queued work is counted."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []
        self.events: dict[str, list[tuple[float, float]]] = {}
        self.last: float | None = None

    @staticmethod
    def now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, owner, attribute: str, name: str | None) -> None:
        """Time every call of `owner.attribute`: as a step (name None) or as an event `name`."""
        original = getattr(owner, attribute)
        timers = self

        def timed(*args, **kwargs):
            started = timers.now()
            try:
                return original(*args, **kwargs)
            finally:
                ended = timers.now()
                if name is None:
                    timers.steps.append((started, ended))
                else:
                    timers.events.setdefault(name, []).append((started, ended - started))

        setattr(owner, attribute, timed)

    def step_callback(self):
        """A TrainerCallback: step i spans from the end of step i-1 (the first: its own begin) to its end, so the
        loop's data loading and logging are part of the step."""
        from transformers import TrainerCallback

        timers = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if timers.last is None:
                    timers.last = timers.now()

            def on_step_end(self, args, state, control, **kwargs):
                ended = timers.now()
                timers.steps.append((timers.last, ended))
                timers.last = ended

        return StepTimer()


def install_timers(timers: Timers) -> None:
    """The bench's timers in this worker process: a step-timing callback on every Trainer a stage builds
    (pipeline.training.TrainerLoop), `PPOTrainer.step`, `GRPOTrainer._generate`, the vLLM engine's weight sync and
    the vLLM server's start. Only what exists in this tree is timed."""
    from pipeline import training
    from pipeline.rl import trainer as rl_trainer

    original_init = training.TrainerLoop.__init__

    def init(self, ctx, model, make_trainer, **kwargs):
        def make():
            trainer = make_trainer()
            trainer.add_callback(timers.step_callback())
            return trainer

        original_init(self, ctx, model, make, **kwargs)

    training.TrainerLoop.__init__ = init
    timers.wrap(rl_trainer.PPOTrainer, "step", None)
    try:
        from trl import GRPOTrainer

        timers.wrap(GRPOTrainer, "_generate", "generation")
    except (ImportError, AttributeError):
        pass
    try:
        from pipeline.rl import engines, vllm_server

        timers.wrap(engines.VLLMEngine, "sync", "weight_sync")
        timers.wrap(vllm_server.VLLMServer, "start", "server_start")
    except (ImportError, AttributeError):
        pass


def worker_stage(spec: dict) -> dict:
    """Worker: `spec["recipe"]` (one stage) through the real runner in `spec["folder"]`, timed: the step spans,
    timed events, the manifest's timing log and token counts, peak memory. The artifact is removed afterwards
    (unless `keep`); its manifest is kept beside the recipe."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    timers = Timers()
    install_timers(timers)
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    recipe_file = folder / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(spec["recipe"], sort_keys=False))
    started = time.perf_counter()
    artifact = run_recipe(load_recipe(recipe_file), report=False)[spec["stage"]]
    wall = time.perf_counter() - started
    manifest = artifact.manifest
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    if not spec.get("keep"):
        shutil.rmtree(spec["recipe"]["output_dir"], ignore_errors=True)
    memory = common.peak_memory()
    try:
        import torch

        if torch.cuda.is_available():
            memory["peak_cuda_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    except ImportError:
        pass
    return {"wall_s": wall, "stage_duration_s": manifest.get("duration_s"), "steps": timers.steps,
            "events": timers.events, "timing": manifest.get("timing", {}).get("log_history", []),
            "tokens": [[e["step"], e["num_tokens"]] for e in manifest.get("log_history", [])
                       if "num_tokens" in e and "step" in e],
            "metrics": {k: v for k, v in manifest.get("metrics", {}).items() if isinstance(v, (int, float))},
            **memory}


WORKERS = {"setup": worker_setup, "stage": worker_stage}


# ------------------------------------------------------------------------------------------------ summaries


def timed_window(steps: list, warmup: int) -> int:
    """Index of the first timed step: after `warmup` steps, but always at least one step timed."""
    return min(warmup, max(len(steps) - 1, 0))


def mfu_summary(part: str, raw: dict, sizes: Sizes, peak: float | None) -> dict:
    """Throughput and MFU of an MFU part from its worker's raw measurements."""
    steps = raw["steps"]
    if not steps:
        return {"status": "error", "error": "no optimizer step was timed"}
    first = timed_window(steps, sizes.warmup)
    seconds = sum(end - start for start, end in steps[first:])
    cumulative = {0: 0, **{int(step): tokens for step, tokens in raw.get("tokens", [])}}
    if len(steps) in cumulative and first in cumulative:
        tokens, source = cumulative[len(steps)] - cumulative[first], "num_tokens"
    else:
        tokens, source = (len(steps) - first) * sizes.batch * sizes.seq, "batch x seq"
    _, lora, _ = part_kind(part)
    per_token = flops_per_token(sizes.mfu_config, sizes.seq)
    tokens_per_s = tokens / seconds
    out = {"status": "ok", "steps": len(steps), "steps_timed": len(steps) - first, "timed_s": seconds,
           "tokens_timed": tokens, "tokens_from": source, "tokens_per_s": tokens_per_s,
           "seconds_per_step": seconds / (len(steps) - first), "flops_per_token": per_token,
           "tflops": tokens_per_s * per_token / 1e12, "mfu": mfu(tokens_per_s, per_token, peak)}
    if lora:
        executed = flops_per_token(sizes.mfu_config, sizes.seq, weight_gradients=False)
        out.update(flops_per_token_executed=executed, mfu_executed=mfu(tokens_per_s, executed, peak))
    return {**out, **common_fields(raw)}


def common_fields(raw: dict) -> dict:
    keys = ("wall_s", "stage_duration_s", "peak_cuda_mib", "peak_cuda_reserved_mib", "peak_rss_mib")
    return {k: raw[k] for k in keys if raw.get(k) is not None}


def events_within(raw: dict, name: str, start: float, end: float) -> float:
    return sum(seconds for began, seconds in raw.get("events", {}).get(name, []) if start <= began < end)


def rl_summary(part: str, raw: dict, sizes: Sizes) -> dict:
    """Episodes/s, generation share and the per-step split of an RL part from its worker's raw measurements."""
    kind, _, engine = part_kind(part)
    steps = raw["steps"]
    if not steps:
        return {"status": "error", "error": "no RL step was timed"}
    first = timed_window(steps, 1)
    timed = steps[first:]
    seconds = sum(end - start for start, end in timed)
    split: dict[str, float] = {}
    if kind == "ppo":  # the trainer's own split, per step, from the manifest's timing log
        by_step = {int(e["step"]): e for e in raw.get("timing", []) if e.get("step") is not None}
        for index in range(first, len(steps)):
            entry = by_step.get(index + 1, {})
            for key in ("generation", "scoring", "update", "weight_sync"):
                split[key] = split.get(key, 0.0) + entry.get(f"time/{key}", 0.0)
    else:  # GRPO: the bench's own timers inside each Trainer step
        split = {"generation": 0.0, "scoring_and_update": 0.0, "weight_sync": 0.0}
        for start, end in timed:
            sync = events_within(raw, "weight_sync", start, end)
            generation = events_within(raw, "generation", start, end) - sync  # the sync runs inside _generate
            split["generation"] += generation
            split["weight_sync"] += sync
            split["scoring_and_update"] += (end - start) - generation - sync
    per_step = {k: v / len(timed) for k, v in split.items()}
    out = {"status": "ok", "engine": engine, "steps": len(steps), "steps_timed": len(timed), "timed_s": seconds,
           "episodes_per_step": sizes.rollout, "episodes_per_s": sizes.rollout * len(timed) / seconds,
           "seconds_per_step": seconds / len(timed), "split_s_per_step": per_step,
           "generation_share": split.get("generation", 0.0) / seconds if seconds else None,
           "weight_sync_share": split.get("weight_sync", 0.0) / seconds if seconds else None}
    starts = raw.get("events", {}).get("server_start", [])
    if starts:
        out["server_start_s"] = sum(s for _, s in starts)
    return {**out, **common_fields(raw)}


def summarise(part: str, raw: dict, sizes: Sizes, peak: float | None) -> dict:
    if "error" in raw or "status" in raw:
        return raw
    try:
        return mfu_summary(part, raw, sizes, peak) if part in MFU_PARTS else rl_summary(part, raw, sizes)
    except (KeyError, TypeError, ZeroDivisionError, ValueError) as exc:
        return {"status": "error", "error": f"summary failed: {type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------------------ the driver


@dataclass
class Backend:
    """How the driver runs things: `worker(kind, spec, timeout, log)` returns a worker's result dict (or {"error"}/
    {"status": "timeout"}), `vllm_problem(python, cuda)` says why vLLM parts cannot run (None: they can),
    `clock()` is a monotonic clock in seconds."""

    worker: Callable[[str, dict, float, Path], dict]
    vllm_problem: Callable[[str, bool], str | None]
    clock: Callable[[], float] = time.monotonic


def process_worker(kind: str, spec: dict, timeout: float, log_path: Path) -> dict:
    """`python bench/gpu.py --worker KIND --spec FILE` in its own process group, its output into `log_path`;
    killed (the whole group) after `timeout` seconds. Its RESULT line as a dict, or an error/timeout row."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec_file = log_path.with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec))
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(SCRIPT), "--worker", kind, "--spec", str(spec_file)],
                                   cwd=ROOT, env=common.child_env(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            stop_group(process)
            return {"status": "timeout", "error": f"still running at the deadline ({timeout:.0f} s left when it "
                                                  f"started): killed; its output: {log_path}"}
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(common.RESULT)]
    if process.returncode or not lines:
        tail = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["failed"]
        return {"status": "error", "error": f"exit {process.returncode}: {tail[0][:400]} (log: {log_path})"}
    return json.loads(lines[-1][len(common.RESULT):])


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the worker's process group (it started it), SIGKILL after 15 s. A vLLM server the stage started
    gets SIGTERM when its parent dies (it asks the kernel for that)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def probe_vllm(python: str, cuda: bool) -> str | None:
    """Why the vLLM interpreter cannot serve this run's rollouts, or None."""
    if not Path(python).exists():
        return f"no vLLM environment at {python} (GPU_BENCH_VLLM=1 bash bench/gpu.sh creates it)"
    check = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('vllm') else 3)"
    if cuda:
        check += "\nimport torch; sys.exit(0 if torch.cuda.is_available() else 4)"
    try:
        done = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return f"{python}: checking for vllm took over 180 s"
    if done.returncode == 3:
        return f"{python} has no vllm (GPU_BENCH_VLLM=1 bash bench/gpu.sh installs it)"
    if done.returncode == 4:
        return f"{python}'s torch sees no CUDA device (a CPU build of vLLM?)"
    if done.returncode:
        return f"{python} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


REAL = Backend(worker=process_worker, vllm_problem=probe_vllm)


def plan_setup(parts: list[str]) -> dict:
    return {"mfu_model": any(p in ("sft_full", "sft_lora") for p in parts), "rl_models": any(p in RL_PARTS
                                                                                           for p in parts)}


def run_parts(parts: list[str], sizes: Sizes, work: Path, *, deadline_s: float, vllm_python: str,
              backend: Backend = REAL, min_part_s: float = 20.0, keep: bool = False,
              say: Callable[[str], None] = print) -> dict:
    """Setup, then each part in order under the global deadline; the results dict (parts keyed by name)."""
    started = backend.clock()
    deadline = started + deadline_s
    left = lambda: deadline - backend.clock()  # noqa: E731
    results: dict[str, Any] = {"sizes": asdict(sizes), "deadline_s": deadline_s, "parts": {}}
    setup = backend.worker("setup", {"sizes": asdict(sizes), "work": str(work), **plan_setup(parts)}, left(),
                           work / "logs" / "setup.log")
    results["setup"] = setup
    if "error" in setup:
        for part in parts:
            results["parts"][part] = {"status": "skipped", "reason": f"setup failed: {setup['error']}"}
        results["elapsed_s"] = backend.clock() - started
        say(f"setup failed: {setup['error']}")
        return results
    say(f"setup: {setup.get('device_name')} in {setup.get('setup_s', 0):.0f} s")
    peak = peak_tflops(setup.get("device_name")) if setup.get("device") == "cuda" else None
    results["peak_bf16_tflops"] = peak
    vllm_reason = None
    if any(part_kind(p)[2] == "vllm" for p in parts):
        vllm_reason = (None if rollout_supported() else "this tree's schema has no `rollout` field") or \
            backend.vllm_problem(vllm_python, setup.get("device") == "cuda")
    for part in parts:
        remaining = left()
        if part_kind(part)[2] == "vllm" and vllm_reason:
            row = {"status": "skipped", "reason": vllm_reason}
        elif remaining < min_part_s:
            row = {"status": "skipped", "reason": f"deadline: {max(remaining, 0):.0f} s left of {deadline_s:.0f} s"}
        else:
            recipe = for_this_schema(recipe_for(part, sizes, work, vllm_python))
            spec = {"recipe": recipe, "stage": part_kind(part)[0], "folder": str(work / part), "keep": keep}
            began = backend.clock()
            raw = backend.worker("stage", spec, remaining, work / "logs" / f"{part}.log")
            row = summarise(part, raw, sizes, peak)
            row["part_s"] = backend.clock() - began
        results["parts"][part] = row
        say(f"{part}: {line(row)}")
    results["elapsed_s"] = backend.clock() - started
    return results


def line(row: dict) -> str:
    """A part's result in one line."""
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('reason') or row.get('error')}"
    if "tokens_per_s" in row:
        shown = f"{row['tokens_per_s']:,.0f} tokens/s, {_tflops(row['tflops'])} TFLOP/s"
        return shown + (f", MFU {row['mfu']:.3f}" if row.get("mfu") is not None else ", MFU n/a")
    return (f"{row['episodes_per_s']:.2f} episodes/s, generation share {row['generation_share']:.2f}, "
            f"{row['seconds_per_step']:.2f} s/step")


# ------------------------------------------------------------------------------------------------ dry run


def fake_worker(sizes: Sizes) -> Callable[[str, dict, float, Path], dict]:
    """A worker that returns made-up measurements in the real workers' format (deterministic), for --dry-run."""
    def worker(kind: str, spec: dict, timeout: float, log: Path) -> dict:
        if kind == "setup":
            return {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3 (fake)", "torch": "fake", "cuda": "fake",
                    "bf16": True, "parameters": {}, "vocab": sizes.mfu_config["vocab_size"], "setup_s": 30.0}
        stage = next(iter(spec["recipe"]["stages"].values()))
        part = Path(spec["folder"]).name
        clock, steps, events, timing = 1000.0, [], {}, []
        if part in MFU_PARTS:
            per_step = 0.09 if part == "sft_lora" else 0.12
            for index in range(sizes.warmup + sizes.steps):
                seconds = 2.0 if index == 0 else per_step
                steps.append((clock, clock + seconds))
                clock += seconds
            tokens = [[i + 1, (i + 1) * sizes.batch * sizes.seq] for i in range(len(steps))]
            return {"wall_s": 45.0, "stage_duration_s": 40.0, "steps": steps, "events": {}, "timing": [],
                    "tokens": tokens, "metrics": {}, "peak_cuda_mib": 30000.0 if part != "sft_lora" else 12000.0,
                    "peak_rss_mib": 9000.0}
        vllm = stage.get("rollout", {}).get("engine") == "vllm"
        generation, sync, rest = (0.4, 0.3, 0.8) if vllm else (2.4, 0.0, 0.8)
        for index in range(sizes.rl_steps):
            scale = 3.0 if index == 0 else 1.0
            start = clock
            if stage["kind"] == "grpo":
                events.setdefault("generation", []).append((clock, (generation + sync) * scale))
                if vllm:
                    events.setdefault("weight_sync", []).append((clock, sync * scale))
            total = (generation + sync + rest) * scale
            steps.append((start, start + total))
            timing.append({"step": index + 1, "time/generation": generation * scale, "time/scoring": rest / 2 * scale,
                           "time/update": rest / 2 * scale, **({"time/weight_sync": sync * scale} if vllm else {})})
            clock += total
        if vllm:
            events["server_start"] = [(900.0, 25.0)]
        return {"wall_s": 60.0, "stage_duration_s": 50.0, "steps": steps, "events": events, "timing": timing,
                "tokens": [], "metrics": {}, "peak_cuda_mib": 9000.0, "peak_rss_mib": 6000.0}

    return worker


def fake_clock(step: float = 7.0) -> Callable[[], float]:
    """A clock that moves `step` seconds each time it is read (the dry run's parts take time but no time)."""
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]

    return clock


def stub_inputs(work: Path) -> None:
    """Placeholders for the tokenizer and model folders the dry run's recipes name (the real run builds them), so
    the recipes validate with the loader's file checks."""
    for key in ("tokenizer", "mfu_model", "policy", "reward"):
        folder = paths(work)[key]
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.iterdir()):
            (folder / "DRY-RUN-PLACEHOLDER").write_text("built by a real run of bench/gpu.py\n")


def dry_run(parts: list[str], sizes: Sizes, out: Path, vllm_python: str, deadline_s: float,
            say: Callable[[str], None] = print) -> dict:
    """Every recipe built, written to OUT/recipes and validated; the driver run on fake measurements; gpu.json and
    gpu.md written into OUT."""
    import yaml

    built = recipes(parts, sizes, out, vllm_python)
    write_data(sizes, out)
    stub_inputs(out)
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    validation = {}
    supported = rollout_supported()
    for part, recipe in built.items():
        (out / "recipes" / f"{part}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if part_kind(part)[2] == "vllm" and not supported:
            validation[part] = "not validated: this tree's schema has no `rollout` field"
            continue
        try:
            validate(for_this_schema(recipe), out / "recipes" / f"{part}.yaml")
            validation[part] = "ok"
        except Exception as exc:  # noqa: BLE001 (reported, not raised: the dry run lists every recipe's state)
            validation[part] = f"invalid: {exc}"
    backend = Backend(worker=fake_worker(sizes), vllm_problem=lambda python, cuda: None, clock=fake_clock())
    results = run_parts(parts, sizes, out / "work", deadline_s=deadline_s, vllm_python=vllm_python,
                        backend=backend, say=say)
    results.update(fake=True, recipes_validated=validation)
    return results


# ------------------------------------------------------------------------------------------------ tables


def _n(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def _gib(row: dict) -> str:
    return f"{row['peak_cuda_mib'] / 1024:.1f}" if row.get("peak_cuda_mib") is not None else "-"


def markdown(results: dict) -> str:
    """gpu.md from gpu.json."""
    setup, sizes, parts = results.get("setup", {}), results.get("sizes", {}), results.get("parts", {})
    peak = results.get("peak_bf16_tflops")
    lines = ["# GPU benchmark", ""]
    if results.get("fake"):
        lines += ["**Dry run: fake measurements** (`python bench/gpu.py --dry-run`): the numbers below are made up; "
                  "they only show the tables' shape.", ""]
    if results.get("quick"):
        lines += ["**Quick run** (`--quick`): tiny models, every code path; the numbers say nothing about speed.", ""]
    lines += [f"Device: {setup.get('device_name', 'unknown')}; torch {setup.get('torch', '?')}, CUDA "
              f"{setup.get('cuda', '-')}; dense bf16 peak "
              f"{f'{peak:.0f} TFLOP/s' if peak else 'unknown (MFU not computed; GPU_PEAK_TFLOPS sets it)'}. "
              f"Deadline {results.get('deadline_s', 0):.0f} s, used {results.get('elapsed_s', 0):.0f} s "
              f"(setup {setup.get('setup_s', 0):.0f} s)." + (f" `pytest -m gpu`: {results['pytest']}."
                                                            if results.get("pytest") else ""), ""]
    mfu_config, rl_config = sizes.get("mfu_config", {}), sizes.get("rl_config", {})
    params = results.get("parameters", {})
    if any(p in parts for p in MFU_PARTS):
        lines += [f"## MFU: random Llama, {_n(params.get('mfu_model'))} parameters (hidden "
                  f"{mfu_config.get('hidden_size')}, {mfu_config.get('num_hidden_layers')} layers), sequence "
                  f"{sizes.get('seq')}, {sizes.get('precision')}", "",
                  f"Batch {sizes.get('batch')} x {sizes.get('seq')} packed tokens, {sizes.get('steps')} optimizer "
                  f"steps timed after {sizes.get('warmup')} warm-up step(s). Model FLOPs per token = 6 x matmul "
                  "parameters + 12 x layers x hidden x sequence; MFU against the peak above. `MFU executed`: LoRA "
                  "counts 4 x the parameters (no weight gradients for frozen weights).", "",
                  "| part | steps timed | tokens/s | s/step | TFLOP/s | MFU | MFU executed | peak GPU GiB | wall s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for part in MFU_PARTS:
            if part in parts:
                lines.append(mfu_row(part, parts[part]))
        lines.append("")
    if any(p in parts for p in RL_PARTS):
        lines += [f"## PPO and GRPO: random Llama, {_n(params.get('rl_policy'))} parameters (hidden "
                  f"{rl_config.get('hidden_size')}, {rl_config.get('num_hidden_layers')} layers)", "",
                  f"{sizes.get('rollout')} episodes per step (PPO: prompts; GRPO: completions, groups of "
                  f"{sizes.get('num_generations')}), {sizes.get('new_tokens')} new tokens, {sizes.get('rl_steps')} "
                  "steps, the first left out. Split per step in seconds: PPO from its timing log (generation / "
                  "scoring / update / weight sync), GRPO from the bench's timers (generation / scoring and update / "
                  "weight sync). Peak GPU memory: the trainer's process (a vLLM server's is its own).", "",
                  "| part | policy | engine | episodes/s | generation share | s/step | split s/step | "
                  "server start s | peak GPU GiB | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for part in RL_PARTS:
            if part in parts:
                lines.append(rl_row(part, parts[part]))
        lines.append("")
    return "\n".join(lines)


def status_cells(row: dict, cells: int) -> str | None:
    if row.get("status") == "ok":
        return None
    return f"{row.get('status')}: {row.get('reason') or row.get('error')}" + " |" * (cells - 1)


def mfu_row(part: str, row: dict) -> str:
    other = status_cells(row, 8)
    if other:
        return f"| {part} | {other}"
    return (f"| {part} | {row['steps_timed']} | {_n(row['tokens_per_s'])} | {row['seconds_per_step']:.3f} | "
            f"{_tflops(row['tflops'])} | {_n(row.get('mfu'), 3)} | {_n(row.get('mfu_executed', row.get('mfu')), 3)} | "
            f"{_gib(row)} | {_n(row.get('part_s'), 0)} |")


def rl_row(part: str, row: dict) -> str:
    kind, lora, engine = part_kind(part)
    head = f"| {kind} | {'LoRA' if lora else 'full'} | {engine} |"
    other = status_cells(row, 7)
    if other:
        return f"{head} {other}"
    split = " / ".join(f"{v:.2f}" for v in row["split_s_per_step"].values())
    return (f"{head} {row['episodes_per_s']:.2f} | {_n(row.get('generation_share'))} | "
            f"{row['seconds_per_step']:.2f} | {split} | {_n(row.get('server_start_s'), 0)} | {_gib(row)} | "
            f"{_n(row.get('part_s'), 0)} |")


def write_tables(results: dict, folder: Path = common.RESULTS) -> None:
    common.write_tables(NAME, markdown(results), folder=folder)


# ------------------------------------------------------------------------------------------------ main


def arguments():
    parser = common.bench_parser(__doc__, WORKERS, PARTS)
    common.add_out(parser, DEFAULT_OUT, note="; with --dry-run, gpu.json and gpu.md go there too")
    parser.add_argument("--deadline-s", type=float, default=float(os.environ.get("GPU_BENCH_DEADLINE_S", 420)),
                        help="global deadline in seconds, setup included (default 420, GPU_BENCH_DEADLINE_S): the "
                             "parts left then are recorded as skipped")
    parser.add_argument("--min-part-s", type=float, default=20.0,
                        help="do not start a part with less than this many seconds left (default 20)")
    parser.add_argument("--steps", type=int, help="MFU optimizer steps timed (default 10)")
    parser.add_argument("--warmup", type=int, help="MFU optimizer steps before the timed ones (default 3)")
    parser.add_argument("--rl-steps", type=int, help="PPO/GRPO steps, the first one untimed (default 4)")
    parser.add_argument("--vllm-python", default=os.environ.get("GPU_BENCH_VLLM_PYTHON", str(DEFAULT_VLLM_PYTHON)),
                        help="the vLLM environment's interpreter (default .venv-vllm/bin/python)")
    parser.add_argument("--pytest", help="the `pytest -m gpu` summary line to record with the results (bench/gpu.sh)")
    parser.add_argument("--keep", action="store_true", help="keep each part's artifact in --out")
    parser.add_argument("--quick", action="store_true",
                        help="every part for real at tiny sizes (CPU is fine), results into --out only")
    parser.add_argument("--dry-run", action="store_true",
                        help="no training: build and validate every recipe, write results for fake measurements "
                             "into --out")
    return parser


def sizes_from(args) -> Sizes:
    sizes = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup), ("rl_steps", args.rl_steps))
                 if v is not None}
    return replace(sizes, **overrides)


def parameters(sizes: Sizes) -> dict:
    return {"mfu_model": count_parameters(sizes.mfu_config), "rl_policy": count_parameters(sizes.rl_config),
            "rl_reward": count_parameters(sizes.rl_config, reward=True)}


def main(argv: list[str] | None = None) -> int:
    args = arguments().parse_args(argv)
    if args.worker:
        return common.serve_worker(WORKERS, args)
    if args.tables_only:
        write_tables(common.load_results(NAME))
        return 0
    sizes, parts = sizes_from(args), common.selected(args, PARTS)
    out = args.out.resolve()
    vllm_python = str(Path(args.vllm_python).resolve()) if not Path(args.vllm_python).is_absolute() \
        else args.vllm_python
    if args.dry_run:
        results = dry_run(parts, sizes, out, vllm_python, args.deadline_s)
    else:
        results = run_parts(parts, sizes, out, deadline_s=args.deadline_s, vllm_python=vllm_python,
                            min_part_s=args.min_part_s, keep=args.keep)
    results.update(quick=args.quick, pytest=args.pytest, parameters=parameters(sizes))
    folder = out if (args.dry_run or args.quick) else common.RESULTS
    if args.only and folder == common.RESULTS:  # the stored results keep the parts not measured now
        stored = common.load_results(NAME)
        results["parts"] = {**{p: v for p, v in stored.get("parts", {}).items() if p not in parts},
                            **results["parts"]}
        results["parts"] = {p: results["parts"][p] for p in PARTS if p in results["parts"]}
    common.write_results(NAME, results, markdown(results), folder=folder)
    print(f"results: {folder / (NAME + '.json')}, {folder / (NAME + '.md')}")
    failed = [p for p, row in results["parts"].items() if row.get("status") == "error"]
    if failed:
        print(f"failed parts: {', '.join(failed)}")
    return 1 if failed or "error" in results.get("setup", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
