"""Load tokenizers and models for a stage (safetensors only, remote code only when asked; a LoRA stage's base in 4 or
8 bits through bitsandbytes for QLoRA), apply LoRA, merge.

Called from stage modules inside a run; imports torch/transformers lazily so recipe validation stays light.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import schema
from pipeline.errors import PipelineError, SecurityError

if TYPE_CHECKING:  # for annotations only: the stage contract sits above this module
    from pipeline.stage import StageContext

log = logging.getLogger("pipeline")

ARCHITECTURES = {  # name -> (config class, causal LM class) in transformers
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.ckpt", "adapter_model.bin")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def check_safe_weights(path: str | Path, key: str = "model.path") -> None:
    """Refuse a local checkpoint that has only pickle weights: loading pickle can execute code."""
    folder = Path(path)
    if not folder.is_dir():
        return
    names = {p.name for p in folder.iterdir()}
    if names & set(PICKLE_WEIGHTS) and not names & set(SAFE_WEIGHTS) and not any(n.endswith(".gguf") for n in names):
        raise SecurityError(f"{folder} holds only pickle weights (.bin), which can run code when loaded", key=key,
                            fix="convert it to safetensors (model.save_pretrained(dir, safe_serialization=True))")


def remote_code_flag(section: schema.ModelSection | None) -> bool:
    if section is not None and section.trust_remote_code:
        warnings.warn("trust_remote_code is on: this recipe runs Python code from the model repository", stacklevel=2)
        return True
    return False


def bf16_supported() -> bool:
    """The one precision rule behind every 'auto': bfloat16 where a CUDA device supports it, else float32."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def mixed_precision(setting: str) -> str:
    """`train.mixed_precision` with 'auto' resolved by `bf16_supported` ('bf16' or 'no'). An explicit 'bf16' holds on
    CPU too (autocast); 'fp16' needs a CUDA GPU (see `check_precisions`)."""
    if setting == "fp16" and not _cuda():
        raise PipelineError("mixed precision fp16 needs a CUDA GPU and this machine has none",
                            key="train.mixed_precision", fix="use bf16 (autocast, on CPU too) or auto")
    if setting != "auto":
        return setting
    return "bf16" if bf16_supported() else "no"


def check_precisions(recipe) -> None:
    """Before any stage runs: refuse a stage whose `train.mixed_precision` this machine cannot run (fp16 without a
    CUDA GPU), naming the recipe file and the stage's key."""
    for name, config in recipe.stages.items():
        train = getattr(config, "train", None)
        try:
            train is None or mixed_precision(train.mixed_precision)
        except PipelineError as error:
            raise PipelineError(error.message, file=str(recipe.path), key=f"stages.{name}.train.mixed_precision",
                                fix=error.fix) from None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quantize_problem(lora: schema.LoraSection, model: schema.ModelSection | None) -> tuple[str, str] | None:
    """Why this machine cannot load a stage's base for `lora.quantize` (QLoRA): (message, fix), or None when it can.
    Imports torch only when `quantize` is set, so validating other recipes stays light."""
    import importlib.util

    if lora.quantize is None:
        return None
    if model is not None and model.gguf_file:
        return ("a base read from a GGUF file cannot be loaded quantized by bitsandbytes",
                "drop `lora.quantize`, or start from a safetensors checkpoint of the model")
    if not _cuda():
        return (f"`quantize: {lora.quantize}` (QLoRA) loads the base through bitsandbytes, which needs a CUDA GPU, "
                "and this machine has none", "remove `quantize` (plain LoRA runs on CPU) or run on a CUDA machine")
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"`quantize: {lora.quantize}` (QLoRA) needs the bitsandbytes package, which is not installed",
                "pip install bitsandbytes, or remove `quantize`")
    return None


def quantization_config(setting: str):
    """transformers' BitsAndBytesConfig for `lora.quantize`: '4bit' is QLoRA's NF4 with double quantisation and
    bfloat16 compute (float16 on a GPU without bfloat16); '8bit' is LLM.int8()."""
    import torch
    from transformers import BitsAndBytesConfig

    if setting == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported() else torch.float16)


def _quantized_kwargs(path: str, section: schema.ModelSection, setting: str) -> dict[str, Any]:
    """`from_pretrained` arguments that load the base quantized onto this process's GPU (a quantized model cannot
    be moved after loading). Refuses an adapter as the base: it would be merged into the quantized weights."""
    from accelerate import PartialState

    problem = quantize_problem(schema.LoraSection(quantize=setting), section)
    if problem is not None:
        raise PipelineError(problem[0], key="lora.quantize", fix=problem[1])
    if is_adapter(path):
        raise PipelineError(f"{path} is a LoRA adapter: a quantized stage would merge it into 4/8-bit weights",
                            key="model.path", fix="merge it first (a `merge` stage, or `lora.merge: true` on its "
                                                  "stage), or drop `lora.quantize`")
    return {"quantization_config": quantization_config(setting), "device_map": {"": PartialState().local_process_index}}


def prepare_quantized(model, gradient_checkpointing: bool):
    """peft's preparation of a quantized base for training an adapter on it (frozen weights, norms in float32, input
    gradients for checkpointing)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def torch_dtype(section: schema.ModelSection | None):
    """`model.dtype` as a torch dtype; 'auto' by `bf16_supported`."""
    import torch

    name = section.dtype if section else "auto"
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, *, trust_remote_code: bool = False, gguf_file: str | None = None):
    """A fast tokenizer with a pad token (falls back to EOS) and left padding off by default."""
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise PipelineError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}", key="tokenizer",
                            fix="point at a folder with tokenizer.json or a Hub id") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def _load_kwargs(section: schema.ModelSection) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dtype": torch_dtype(section), "trust_remote_code": remote_code_flag(section)}
    if section.gguf_file:
        kwargs["gguf_file"] = section.gguf_file
    else:
        kwargs["use_safetensors"] = True
    if section.revision:
        kwargs["revision"] = section.revision
    if section.attn_implementation:
        kwargs["attn_implementation"] = section.attn_implementation
    return kwargs


def build_from_config(section: schema.ModelSection, tokenizer):
    """A randomly initialised causal LM of `section.architecture` sized by `section.config`."""
    import transformers

    config_name, model_name = ARCHITECTURES[section.architecture]
    values = dict(section.config or {})
    values.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values.setdefault(name, getattr(tokenizer, name))
    try:
        config = getattr(transformers, config_name)(**values)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"invalid model config: {exc}", key="model.config",
                            fix=f"use {config_name} field names") from None
    if section.attn_implementation:
        config._attn_implementation = section.attn_implementation
    model = getattr(transformers, model_name)(config)
    return model.to(torch_dtype(section))


def load_causal_lm(path: str, section: schema.ModelSection, *, merge_adapter: bool = True, tp_size: int = 1,
                   quantize: str | None = None):
    """A causal LM from a folder or Hub id; an adapter folder is loaded on its base (merged by default). With
    `tp_size` > 1 the weights are split across that many ranks at load (transformers' `tp_plan="auto"`); with
    `quantize` ('4bit' or '8bit', a stage's `lora.quantize`) it is loaded through bitsandbytes on this process's GPU."""
    from transformers import AutoModelForCausalLM

    check_safe_weights(path)
    kwargs = _load_kwargs(section)
    if tp_size > 1:
        kwargs.update(tp_plan="auto", tp_size=tp_size)
    if quantize:
        kwargs.update(_quantized_kwargs(path, section, quantize))
    try:
        if is_adapter(path):
            gguf_file = adapter_base_gguf(path)
            if gguf_file:
                return _adapter_on_gguf_base(path, section, gguf_file, merge_adapter=merge_adapter, tp_size=tp_size)
            model = _adapter_on_base(path, kwargs)
            return model.merge_and_unload() if merge_adapter else model
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        return _dequantised(model) if section.gguf_file else model
    except OSError as exc:
        raise PipelineError(f"cannot load a model from {path}: {str(exc).splitlines()[0]}", key="model.path",
                            fix="point at a folder with config.json and model.safetensors, or a Hub id") from None


def adapter_base_gguf(path: str | Path) -> str | None:
    """The GGUF file inside an adapter's base folder, when the base is a folder holding a .gguf rather than a
    config.json (an adapter trained on `model: {path: FOLDER, gguf_file: FILE}`): named by the adapter artifact's
    manifest, else the folder's only .gguf. None for a base with config.json or a Hub id."""
    base = base_model_of(path)
    folder = Path(base) if base else None
    if folder is None or not folder.is_dir() or (folder / "config.json").exists():
        return None
    try:
        model = json.loads((Path(path) / "manifest.json").read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        model = {}
    named = model.get("gguf_file") if isinstance(model, dict) else None
    if named and (folder / named).is_file():
        return named
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if len(found) <= 1:
        return found[0] if found else None
    raise PipelineError(f"the base of adapter {path} is {folder}, which holds {len(found)} .gguf files and no "
                        "config.json", key="model.path",
                        fix="keep exactly one .gguf in that folder, or rerun the adapter's stage from this pipeline "
                            "(its manifest names the file)")


def _adapter_on_gguf_base(path: str, section: schema.ModelSection, gguf_file: str, *, merge_adapter: bool,
                          tp_size: int):
    """peft's AutoPeftModel cannot pass `gguf_file` to the base: load the base from its GGUF (dequantised), then
    the adapter on it."""
    from peft import PeftModel

    base_path = base_model_of(path)
    base_section = section.model_copy(update={"path": base_path, "gguf_file": gguf_file, "revision": None})
    base = load_causal_lm(base_path, base_section, tp_size=tp_size)
    model = PeftModel.from_pretrained(base, path)
    return model.merge_and_unload() if merge_adapter else model


def load_adapter(path: str | Path, *, merge: bool):
    """A saved LoRA causal-LM adapter on its base (merged into it when `merge`), as peft loads it; a base held as a
    .gguf file (see `adapter_base_gguf`) is loaded through its gguf_file, dequantised to float32."""
    if adapter_base_gguf(path):
        return load_causal_lm(str(path), schema.ModelSection(path=str(path), dtype="float32"), merge_adapter=merge)
    model = _adapter_on_base(str(path), {})
    return model.merge_and_unload() if merge else model


def _adapter_on_base(path: str, kwargs: dict[str, Any]):
    """A LoRA causal-LM adapter on its base, as peft's AutoPeftModel loads it; when the base is not where the
    adapter's config says (its output folder moved: see `base_model_of`), the base is loaded from where it is now
    and the adapter put on it."""
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    moved = moved_base(Path(path), recorded_base(path))
    if moved is None:
        return AutoPeftModelForCausalLM.from_pretrained(path, **kwargs)
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved, **kwargs), path)


def _dequantised(model):
    """A GGUF checkpoint is dequantised on load but still marked quantized, which the Trainer refuses: unmark it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def load_reward_model(path: str, section: schema.ModelSection | None = None, num_labels: int = 1):
    """A sequence-classification model (score head) from a folder, Hub id, or a causal LM to initialise one."""
    from transformers import AutoModelForSequenceClassification

    section = section or schema.ModelSection(path=path)
    check_safe_weights(path)
    kwargs = _load_kwargs(section)
    if is_adapter(path):
        raise PipelineError(f"{path} is a LoRA adapter; a reward model needs full weights", key="reward_model",
                            fix="set `lora.merge: true` on the reward stage, or add a `merge` stage")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    if section.gguf_file:
        model = _dequantised(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def lora_config(section: schema.LoraSection, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, task_type=task_type)


def check_lora_targets(model, section: schema.LoraSection) -> None:
    """LoRA target module names must exist in the model (before any training)."""
    if section.target_modules == "all-linear":
        return
    names = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [t for t in section.target_modules if t not in names]
    if missing:
        import torch

        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PipelineError(f"LoRA target modules not in the model: {', '.join(missing)}", key="lora.target_modules",
                            fix=f"use some of: {', '.join(linear)} (or 'all-linear')")


def base_model_of(path: str | Path) -> str | None:
    """The model an artifact was trained from: for an adapter, the base its config names, or that base found again
    beside it when the output folder has moved (`moved_base`); for full weights, the artifact itself."""
    folder = Path(path)
    if (folder / "adapter_config.json").exists():
        recorded = recorded_base(folder)
        return moved_base(folder, recorded) or recorded
    return str(path)


def recorded_base(adapter: str | Path) -> str | None:
    """The base an adapter's adapter_config.json names (an absolute path for a base trained in this pipeline); None
    when the file is unreadable (peft's own load then says why)."""
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None


def moved_base(adapter: Path, recorded: str | None) -> str | None:
    """Where the base of an adapter is now when its recorded absolute path is gone because the run's output folder
    moved (copied to another disk or machine): the adapter's manifest names its parent stage with the parent's
    fingerprint, and the sibling folder of that stage holding an artifact of that fingerprint is the base. None
    when the recorded path exists or no such sibling is found (peft's own error then names the recorded path)."""
    if not recorded or not Path(recorded).is_absolute() or Path(recorded).exists():
        return None
    try:
        parents = json.loads((adapter / "manifest.json").read_text()).get("parents") or []
    except (OSError, ValueError):
        return None
    for parent in parents:
        if not isinstance(parent, dict) or parent.get("path") != recorded or not parent.get("stage"):
            continue
        sibling = adapter.parent / parent["stage"]
        try:
            found = json.loads((sibling / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if found.get("fingerprint") == parent.get("fingerprint") and found.get("complete"):
            return str(sibling)
    return None


def save_model(model, tokenizer, folder: Path, *, merge_lora: bool = False) -> str:
    """Save weights as safetensors with the tokenizer; returns 'peft' for an adapter, else 'transformers'."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if isinstance(model, PeftModel):
        return "peft"
    if getattr(model, "generation_config", None) is not None and tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.save_pretrained(folder)
    return "transformers"


def save_policy(ctx: StageContext, model, tokenizer) -> str:
    """Save a trained policy into the stage's artifact folder on the main process: a LoRA adapter, or merged full
    weights when the stage's `lora.merge` is set. Returns the card's library name ('peft' or 'transformers').
    Only for a model that every rank holds whole (PPO); Trainer stages call `save_trained`."""
    merge = merge_requested(ctx)
    if not ctx.is_main:
        return library_of(ctx, merge)
    return save_model(model, tokenizer, ctx.output_dir, merge_lora=merge)


def save_gathered(ctx: StageContext, accelerator, model, tokenizer) -> str:
    """Save a model prepared by `accelerator` (our PPO loop); EVERY rank must call it. Sharded (FSDP): the full
    state dict is gathered collectively and the main process writes it (a LoRA adapter to merge is folded into its
    base afterwards). Whole on every rank: as `save_policy`. Returns the card's library name."""
    unwrapped = accelerator.unwrap_model(model)
    if not is_sharded(accelerator):
        return save_policy(ctx, unwrapped, tokenizer)
    merge = merge_requested(ctx)
    set_generation_padding(unwrapped, tokenizer)
    state_dict = accelerator.get_state_dict(model)
    if ctx.is_main:
        unwrapped.save_pretrained(ctx.output_dir, state_dict=state_dict, safe_serialization=True)
        finish_gathered_save(Path(ctx.output_dir), unwrapped, tokenizer, merge)
    return library_of(ctx, merge)


def set_generation_padding(model, tokenizer) -> None:
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def finish_gathered_save(folder: Path, model, tokenizer, merge: bool) -> None:
    """After gathered weights are written on the main process: merge a LoRA adapter into its base when asked,
    otherwise drop FSDP's untied embedding copy; then the tokenizer. No pickle stays in the artifact."""
    (folder / "training_args.bin").unlink(missing_ok=True)  # Trainer.save_model writes one
    if merge and is_adapter(folder):
        merge_saved_adapter(folder, tokenizer, num_labels=getattr(model.config, "num_labels", None))
    else:
        drop_untied_copy(folder, model)
        tokenizer.save_pretrained(folder)


def merge_requested(ctx: StageContext) -> bool:
    lora = getattr(ctx.config, "lora", None)
    return bool(lora and lora.merge)


def quantized(ctx: StageContext) -> bool:
    """True when the stage trains its adapter on a base loaded in 4 or 8 bits (`lora.quantize`)."""
    lora = getattr(ctx.config, "lora", None)
    return bool(lora and lora.quantize)


def library_of(ctx: StageContext, merge: bool) -> str:
    """'peft' when the stage writes a LoRA adapter, else 'transformers' (known on every rank before saving)."""
    return "peft" if getattr(ctx.config, "lora", None) is not None and not merge else "transformers"


def is_sharded(accelerator) -> bool:
    """True when no rank holds the whole model: FSDP (1 or 2), DeepSpeed ZeRO-3, or tensor/context parallel."""
    from accelerate.utils import DistributedType

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if state.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    config = getattr(accelerator, "parallelism_config", None)
    return bool(config is not None and (config.tp_enabled or config.cp_enabled or config.dp_shard_enabled))


def save_trained(ctx: StageContext, trainer, tokenizer, *, merge_lora: bool | None = None) -> str:
    """Write a Trainer's model into the artifact folder; EVERY rank must call it. When the model is sharded (FSDP,
    ZeRO-3, TP), `Trainer.save_model` gathers the full weights collectively and the main process writes them; a LoRA
    adapter to merge is then folded into its base on the main process. An adapter trained on a quantized base
    (`lora.quantize`) to merge is saved, then merged into the base reloaded unquantized. Returns the card's library
    name."""
    merge = merge_requested(ctx) if merge_lora is None else merge_lora
    library = library_of(ctx, merge)
    if not is_sharded(trainer.accelerator):
        if not ctx.is_main:
            return library
        if merge and quantized(ctx):  # never merge into 4/8-bit weights: reload the base unquantized to merge
            save_model(trainer.model, tokenizer, ctx.output_dir)
            merge_saved_adapter(Path(ctx.output_dir), tokenizer)
            return library
        return save_model(trainer.model, tokenizer, ctx.output_dir, merge_lora=merge)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    set_generation_padding(unwrapped, tokenizer)
    trainer.save_model(str(ctx.output_dir))
    if ctx.is_main:
        finish_gathered_save(Path(ctx.output_dir), unwrapped, tokenizer, merge)
    return library


def drop_untied_copy(folder: Path, model) -> None:
    """A gathered FSDP state dict unties tied weights, so `save_pretrained` writes the output embedding as well as
    the input embedding it equals; drop the copy so the checkpoint matches an unsharded save (single-file only)."""
    import torch
    from safetensors.torch import load_file, save_file

    file = Path(folder) / "model.safetensors"
    if not file.exists() or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    names = {id(module): name for name, module in model.named_modules()}
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or id(output) not in names or id(embedding) not in names:
        return
    copy, source = f"{names[id(output)]}.weight", f"{names[id(embedding)]}.weight"
    tensors = load_file(file)
    if copy in tensors and source in tensors and torch.equal(tensors[copy], tensors[source]):
        del tensors[copy]
        save_file(tensors, file, metadata={"format": "pt"})


def merge_saved_adapter(folder: Path, tokenizer, num_labels: int | None = None) -> None:
    """Replace the LoRA adapter saved in `folder` by full weights: its base with the adapter merged in (a reward
    model's base is loaded with the trained model's `num_labels`)."""
    from peft import AutoPeftModelForSequenceClassification

    task = json.loads((folder / "adapter_config.json").read_text()).get("task_type")
    if task == "SEQ_CLS":
        merged = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels or 1)
        if merged.config.pad_token_id is None:
            merged.config.pad_token_id = tokenizer.pad_token_id
        merged = merged.merge_and_unload()
    else:
        merged = load_adapter(folder, merge=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (folder / name).unlink(missing_ok=True)
    save_model(merged, tokenizer, folder)
