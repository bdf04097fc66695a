"""`export` stage: write a causal LM as a GGUF file that llama.cpp and Ollama run, with an Ollama Modelfile.

In a recipe (`kind: export`, `model: ${sft}`), or alone on any artifact or model folder:

    python -m pipeline export OUTPUT/stage --format gguf --quant q8_0 --output DIR

A LoRA adapter is merged into its base first (a base held as a .gguf is loaded through its file); a model given as
`{path, gguf_file}` is dequantised by transformers and converted again. The conversion is llama.cpp's own
(`pipeline.tools.gguf`, the optional `export` extra). The main process converts; other ranks wait at the runner's
barrier.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from pipeline import artifacts, models, schema
from pipeline.tools import gguf
from pipeline.stage import StageContext, StageResult

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config
    source = ctx.resolve(cfg.model.path)
    gguf.require(cfg.quant)  # every rank: a missing extra fails before any work, with one line
    info: dict = {}
    metrics: dict = {}
    if ctx.is_main:
        info = export(source, cfg, ctx.output_dir, ctx.work_dir)
        metrics = {"gguf_mib": info["mib"], "parameters": info["parameters"]}
    ancestors = source_lineage(source) if not ctx.parents else []
    return StageResult(metrics=metrics, base_model=source, library_name="gguf", tags=["gguf", cfg.quant],
                       extra={"export": info} if info else {}, lineage=ancestors, card_text=card_text(info))


def export(source: str, cfg: schema.ExportStage, output_dir: Path, work_dir: Path) -> dict:
    """Write `<name>-<QUANT>.gguf` and `Modelfile` into `output_dir`; returns what the manifest records."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="hf-") as tmp:
        folder, tokenizer, base_gguf = hf_folder(source, cfg.model, Path(tmp))
        pre, override = tokenizer_pre(cfg, folder, base_gguf)
        stem = gguf_stem(source, cfg.model)
        name = f"{stem}-{gguf.LABELS[cfg.quant]}.gguf"
        gguf.write_gguf(folder, output_dir / name, cfg.quant, Path(tmp), tokenizer_pre=pre, override_pre=override,
                        model_name=stem)
        config = json.loads((folder / "config.json").read_text())
    file = output_dir / name
    context = config.get("max_position_embeddings")
    (output_dir / "Modelfile").write_text(gguf.modelfile(name, tokenizer, context_length=context))
    written = gguf.metadata(file, ("tokenizer.ggml.pre", "general.architecture", "general.file_type", "general.name"))
    types = gguf.tensor_types(file)
    converter = gguf.converter_dir()
    return {"format": cfg.format, "quant": cfg.quant, "file": name, "mib": round(file.stat().st_size / 2 ** 20, 3),
            "parameters": parameter_count(file), "tensor_types": types,
            "name": written.get("general.name"), "llama_file_type": written.get("general.file_type"),
            "architecture": written.get("general.architecture"),
            "tokenizer_pre": written.get("tokenizer.ggml.pre"),
            "stop": gguf.stop_tokens(tokenizer), "converter": {"path": str(converter),
                                                              "llama_cpp_python": gguf.converter_version(converter)}}


def hf_folder(source: str, section: schema.ModelSection, tmp: Path):
    """(a folder the converter reads: config.json, safetensors and tokenizer files; the tokenizer; the GGUF file
    the weights came from, if any). A full-weights folder is linked file by file; an adapter is merged and a GGUF
    model dequantised into `tmp`."""
    folder = tmp / "model"
    folder.mkdir()
    base_gguf = None
    if not models.is_adapter(source) and not section.gguf_file and (Path(source) / "config.json").exists():
        models.check_safe_weights(source, key="model.path")
        for item in Path(source).iterdir():
            if item.is_file() and item.name not in TOKENIZER_FILES and item.suffix in (".json", ".safetensors"):
                (folder / item.name).symlink_to(item.resolve())
        tokenizer = models.load_tokenizer(source)
    else:  # an adapter (merged), a GGUF (dequantised), or a Hub id
        if models.is_adapter(source):
            name = models.adapter_base_gguf(source)
            base_gguf = Path(models.base_model_of(source)) / name if name else None
        elif section.gguf_file and Path(source).is_dir():
            base_gguf = Path(source) / section.gguf_file
        model = models.load_causal_lm(source, section.model_copy(update={"path": source}), merge_adapter=True)
        tokenizer = models.load_tokenizer(source, gguf_file=None if models.is_adapter(source) else section.gguf_file)
        model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return folder, tokenizer, base_gguf


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer files, with `add_bos_token` / `add_eos_token` stated as the tokenizer behaves: the converter
    copies them into the GGUF, and without them llama.cpp guesses (and may add a BOS that training never saw)."""
    tokenizer.save_pretrained(folder)
    ids = tokenizer("a")["input_ids"]
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config["add_bos_token"] = bool(ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    config["add_eos_token"] = bool(ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def tokenizer_pre(cfg: schema.ExportStage, folder: Path, base_gguf: Path | None) -> tuple[str | None, bool]:
    """(pre-tokenizer name for a tokenizer llama.cpp's converter does not recognise, whether to use it even when it
    does): the recipe's `tokenizer_pre`, else plain GPT-2 byte-level read from tokenizer.json, else the base GGUF's."""
    if cfg.tokenizer_pre:
        return cfg.tokenizer_pre, True
    found = gguf.pre_tokenizer_of(folder / "tokenizer.json")
    if found is None and base_gguf is not None and base_gguf.is_file():
        found = gguf.metadata(base_gguf, ("tokenizer.ggml.pre",)).get("tokenizer.ggml.pre")
    return found, False


def gguf_stem(source: str, section: schema.ModelSection) -> str:
    """File name stem: '<recipe>-<stage>' for an artifact, the GGUF's or the folder's name otherwise."""
    folder = Path(source)
    manifest = folder / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        stem = f"{data.get('recipe', '')}-{data.get('stage', folder.name)}".strip("-")
    elif section.gguf_file:
        stem = Path(section.gguf_file).name.split(".")[0]
    else:
        stem = folder.name or "model"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem)


def parameter_count(file: Path) -> int:
    from gguf import GGUFReader

    return int(sum(int(t.n_elements) for t in GGUFReader(str(file)).tensors))


def source_lineage(source: str) -> list[dict]:
    """An artifact named by path (not `${stage}`): itself and its lineage, so the export's manifest keeps the chain."""
    found = artifacts.open_artifact(source) if Path(source).is_dir() else None
    if found is None:
        return []
    entry = {"stage": found.manifest.get("stage"), "kind": found.manifest.get("kind"),
             "fingerprint": found.fingerprint, "path": str(found.path.resolve())}
    return [entry] + list(found.manifest.get("lineage", []))


def card_text(info: dict) -> str | None:
    """The card's description of the file and how to run it."""
    if not info:
        return None
    name = info["file"]
    return "\n".join([
        "## GGUF", "",
        f"`{name}`: {info['parameters']:,} parameters, quantisation `{info['quant']}` ({info['mib']} MiB), written by "
        "llama.cpp's `convert_hf_to_gguf.py`" + (" and quantised by llama.cpp" if info["quant"] == "q4_k_m" else "")
        + ". `Modelfile` carries the chat template and stop tokens for Ollama.", "",
        "```bash", "ollama create my-model -f Modelfile && ollama run my-model",
        f"llama-cli -m {name} -cnv", "```", ""])
