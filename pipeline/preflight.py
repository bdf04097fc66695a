"""Checks run on the whole recipe before any training, so a run does not fail an hour in.

Called by `python -m pipeline run recipe.yaml` before the output folder is created, and by
`python -m pipeline validate --deep recipe.yaml`. Raises a `PipelineError` (exit 2, one line naming the recipe file,
the key and the fix) on the first problem; nothing is written. Checks need no model weights and no network: local
data columns (the first rows, honouring `fields:`, fit a format the stage kind reads, or the one `data.format`
names: `pipeline.data.FORMATS`), chat templates where a stage needs one, LoRA target names, that a reward model and
its policy share a tokenizer, `train.max_length` against the model's positions, that local model folders hold
safetensors weights, and that an `export` stage's optional tools are installed. Hub ids are not checked. Nothing
runs at import.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path
from typing import Any

from pipeline import data as data_lib
from pipeline import registry, schema
from pipeline.data import looks_local
from pipeline.errors import DataError, PipelineError, RecipeError
from pipeline.models import base_model_of, check_safe_weights
from pipeline.recipe import Recipe
from pipeline.tools import gguf

NOT_AVAILABLE: dict[str, str] = {}
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODULES_BY_TYPE = {"llama": LLAMA_MODULES, "mistral": LLAMA_MODULES, "qwen2": LLAMA_MODULES, "qwen3": LLAMA_MODULES,
                   "gemma": LLAMA_MODULES, "gemma2": LLAMA_MODULES, "phi3": ("qkv_proj", "o_proj", "gate_up_proj",
                                                                             "down_proj"),
                   "gpt2": ("c_attn", "c_proj", "c_fc"), "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h",
                                                                      "dense_4h_to_h")}
POSITION_KEYS = ("max_position_embeddings", "n_positions")
FIRST_ROWS = data_lib.DETECT_ROWS  # the rows whose columns name a file's format (`pipeline.data.FORMATS`)


def check(recipe: Recipe) -> None:
    """Run every check on every stage; raise on the first problem."""
    for name, config in recipe.stages.items():
        if config.kind in NOT_AVAILABLE:
            raise _error(recipe, name, ("kind",), NOT_AVAILABLE[config.kind], "remove this stage for now")
        _check_weights(recipe, name, config)
        _check_data(recipe, name, config)
        _check_chat_template(recipe, name, config)
        _check_lora(recipe, name, config)
        _check_max_length(recipe, name, config)
        _check_shared_tokenizer(recipe, name, config)
        _check_export_tools(recipe, name, config)
        _check_rollout_engine(recipe, name, config)


# ----------------------------------------------------------------------------------------------------- helpers


def _error(recipe: Recipe, stage: str, key: tuple, message: str, fix: str, cls=RecipeError) -> PipelineError:
    path = ("stages", stage) + key
    line = None
    for depth in range(len(path), 0, -1):
        if path[:depth] in recipe.lines:
            line = recipe.lines[path[:depth]]
            break
    return cls(message, file=str(recipe.path), line=line, key=".".join(map(str, path)), fix=fix)


def _ref(value: Any) -> str | None:
    match = schema.REF_PATTERN.match(value) if isinstance(value, str) else None
    return match.group(1) if match else None


def _folder(value: str | None) -> Path | None:
    if not value or _ref(value):
        return None
    path = Path(value).expanduser()
    return path if path.is_dir() else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _artifact(recipe: Recipe, stage: str) -> Path | None:
    folder = recipe.output_dir / stage
    return folder if (folder / "manifest.json").exists() else None


# --------------------------------------------------------------------------------------------------- weights


def _check_weights(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    model = getattr(config, "model", None)
    folder = _folder(model.path) if isinstance(model, schema.ModelSection) else None
    if folder is not None:
        try:
            check_safe_weights(folder, key=f"stages.{name}.model.path")
        except PipelineError as exc:
            exc.file = str(recipe.path)
            raise


# ---------------------------------------------------------------------------------------------------- export


def _check_export_tools(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    """An `export` stage needs the optional `export` extra: say so before the stages ahead of it train."""
    if not isinstance(config, schema.ExportStage):
        return
    try:
        gguf.require(config.quant)
    except PipelineError as exc:
        raise _error(recipe, name, ("kind",), exc.message, exc.fix or gguf.INSTALL, cls=PipelineError) from None


def _check_rollout_engine(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    """`rollout: {engine: vllm}` without a `url` starts a server from `rollout.python`: it must exist, before the
    stages ahead of this one train."""
    section = getattr(config, "rollout", None)
    if section is None or section.engine != "vllm" or section.url is not None:
        return
    if not Path(section.python).exists():
        raise _error(recipe, name, ("rollout", "python"), f"no vLLM interpreter at {section.python}",
                     "create it with `bash requirements/vllm.sh` (GPU: VLLM_CUDA=1), point rollout.python at a "
                     "Python that has vllm, or set rollout.url to a running server", cls=PipelineError)


# ------------------------------------------------------------------------------------------------------ data


def first_rows(path: Path, n: int = FIRST_ROWS) -> list[dict]:
    """The first `n` object rows of a local json/jsonl/csv/parquet/txt file (bad lines ignored here)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    suffix = suffixes[-1] if suffixes else ""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).read_row_group(0).slice(0, n).to_pylist()
    if raw is None:
        raw = path.read_bytes() if suffix == ".json" else _head(path)
    text = raw.decode("utf-8", errors="replace")
    if suffix == ".csv":
        return [dict(row) for _, row in zip(range(n), csv.DictReader(io.StringIO(text)))]
    if suffix == ".txt":
        return [{"text": line} for line in text.splitlines()[:n]]
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            return []
        return [r for r in items[:n] if isinstance(r, dict)]
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
        if len(rows) >= n:
            break
    return rows


def _head(path: Path, size: int = 1 << 20) -> bytes:
    """The first `size` bytes of a file, cut at the last complete line (large corpora are not read whole)."""
    with open(path, "rb") as handle:
        data = handle.read(size + 1)
    return data if len(data) <= size else data[:data.rfind(b"\n") + 1]


def _text_columns(config: schema.StageBase) -> list[str]:
    return getattr(config, "text_fields", None) or [getattr(config, "text_field", "text")]


def _check_data(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    """The stage's local data files have the columns of a format its kind reads (`pipeline.data.FORMATS`), or of
    the one `data.format` names; a text stage's have one of its text columns."""
    section = getattr(config, "data", None)
    shape = registry.traits(config.kind).data_shape
    if not isinstance(section, schema.DataSection) or shape is None:
        return
    if section.format and data_lib.format_named(shape, section.format) is None:
        _, message, fix = data_lib.format_mismatch(set(), shape, section, f"a {config.kind} stage")
        raise _error(recipe, name, ("data", "format"), message, fix, cls=DataError)
    for key, value in (("path", section.path), ("eval_path", section.eval_path)):
        if value and looks_local(value) and Path(value).expanduser().is_file():
            _check_columns(recipe, name, key, Path(value).expanduser(), section, shape)


def _check_columns(recipe: Recipe, name: str, key: str, path: Path, section: schema.DataSection,
                   shape: str) -> None:
    rows = first_rows(path)
    if not rows:
        raise _error(recipe, name, ("data", key), f"{path} has no readable rows", "check the file's format and "
                     "encoding (UTF-8 JSON lines, CSV with a header, parquet)", cls=DataError)
    columns = data_lib.row_columns(rows)
    kind = config_kind(recipe, name)
    if shape == "text":
        wanted = _text_columns(recipe.stages[name])
        if not any(section.fields.get(c, c) in columns for c in wanted):
            raise _error(recipe, name, ("data", "fields"), f"{path} has columns {sorted(columns)}, a {kind} stage "
                         "needs " + " or ".join(f"'{section.fields.get(c, c)}'" for c in wanted),
                         f"rename the columns, or map them: `fields: {{{wanted[0]}: <your column>}}`", cls=DataError)
        return
    if data_lib.detect_format(columns, shape, section) is None:
        at, message, fix = data_lib.format_mismatch(columns, shape, section, f"a {kind} stage", source=str(path))
        raise _error(recipe, name, ("data", at), message, fix, cls=DataError)


def config_kind(recipe: Recipe, name: str) -> str:
    return recipe.stages[name].kind


# ------------------------------------------------------------------------------------------------ tokenizers


def tokenizer_origin(recipe: Recipe, name: str, seen: frozenset = frozenset()) -> tuple[str, str] | None:
    """Where a stage's tokenizer comes from: ('stage', tokenizer stage), ('folder', path), ('hub', id) or None."""
    config = recipe.stages[name]
    if config.kind == "tokenizer":
        return ("stage", name)
    if name in seen:
        return None
    model = getattr(config, "model", None)
    value = getattr(config, "tokenizer", None)
    if not value and isinstance(model, schema.ModelSection):
        if model.gguf_file:  # the tokenizer (and its template) lives inside the GGUF file: not checked here
            return None
        value = model.path
    return _origin_of_value(recipe, value, seen | {name})


def _origin_of_value(recipe: Recipe, value: str | None, seen: frozenset) -> tuple[str, str] | None:
    if not value:
        return None
    target = _ref(value)
    if target:
        return tokenizer_origin(recipe, target, seen) if target in recipe.stages else None
    if _folder(value):
        return ("folder", value)
    return None if looks_local(value) else ("hub", value)


def _folder_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = _read_json(folder / "tokenizer_config.json") or {}
    return bool(config.get("chat_template"))


def _check_chat_template(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    if not registry.traits(config.kind).chat_template:
        return
    origin = tokenizer_origin(recipe, name)
    key = ("tokenizer",) if getattr(config, "tokenizer", None) else ("model", "path")
    if origin and origin[0] == "stage" and not recipe.stages[origin[1]].chat_template.strip():
        raise _error(recipe, origin[1], ("chat_template",), f"stage '{name}' ({config.kind}) needs a chat template "
                     "but this tokenizer stage sets none", "set `chat_template: chatml`")
    if origin and origin[0] == "folder" and not _folder_chat_template(Path(origin[1])):
        raise _error(recipe, name, key, f"the tokenizer at {origin[1]} has no chat template, which a "
                     f"{config.kind} stage needs", "use an instruct model's tokenizer (`tokenizer: <folder>`) or "
                     "train one with a `tokenizer` stage")


def _tokenizer_digest(folder: Path) -> str | None:
    data = _read_json(folder / "tokenizer.json")
    if data is not None:
        vocab = (data.get("model") or {}).get("vocab")
        return hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()
    for file in ("vocab.json", "tokenizer.model"):
        if (folder / file).exists():
            return hashlib.sha256((folder / file).read_bytes()).hexdigest()
    return None


def _comparable(recipe: Recipe, origin: tuple[str, str] | None) -> tuple[str, str] | None:
    """A stage origin whose artifact exists compares by files; a folder by its vocabulary."""
    if origin is None or origin[0] == "hub":
        return origin
    folder = Path(origin[1]) if origin[0] == "folder" else _artifact(recipe, origin[1])
    digest = _tokenizer_digest(folder) if folder else None
    return ("vocab", digest) if digest else origin


def _check_shared_tokenizer(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    reward = getattr(config, "reward_model", None)
    if config.kind not in ("ppo", "grpo", "rloo") or not reward:
        return
    policy = tokenizer_origin(recipe, name)
    target = _ref(reward)
    scorer = tokenizer_origin(recipe, target) if target else _origin_of_value(recipe, reward, frozenset())
    if policy is None or scorer is None or policy == scorer:
        return
    if policy[0] == scorer[0] == "stage":
        different = True
    else:
        left, right = _comparable(recipe, policy), _comparable(recipe, scorer)
        different = left[0] == right[0] == "vocab" and left != right
    if different:
        raise _error(recipe, name, ("reward_model",), f"the reward model's tokenizer ({scorer[1]}) differs from the "
                     f"policy's ({policy[1]}): rewards would score the wrong tokens",
                     "train the reward model from the same base/tokenizer as the policy")


# ------------------------------------------------------------------------------------------------ model config


def model_config(recipe: Recipe, name: str, seen: frozenset = frozenset()) -> dict | None:
    """The config.json-like dict of the model a stage starts from, following references; None if unknown."""
    config = recipe.stages[name]
    model = getattr(config, "model", None)
    if not isinstance(model, schema.ModelSection) or name in seen:
        return None
    if model.path is None:
        return {"model_type": model.architecture, **(model.config or {})}
    target = _ref(model.path)
    if target:
        if target not in recipe.stages:
            return None
        built = _artifact(recipe, target)
        if built is not None and (built / "config.json").exists():
            return _read_json(built / "config.json")
        return model_config(recipe, target, seen | {name})
    folder = _folder(model.path)
    if folder is None:
        return None
    if (folder / "adapter_config.json").exists():
        folder = _folder(base_model_of(folder))
        if folder is None:
            return None
    return _read_json(folder / "config.json")


def _check_lora(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    lora = getattr(config, "lora", None)
    if not isinstance(lora, schema.LoraSection) or lora.target_modules == "all-linear":
        return
    known = MODULES_BY_TYPE.get(str((model_config(recipe, name) or {}).get("model_type")))
    if known is None:
        return
    missing = [m for m in lora.target_modules if m not in known]
    if missing:
        raise _error(recipe, name, ("lora", "target_modules"), f"LoRA target modules not in the model: "
                     f"{', '.join(missing)}", f"use some of: {', '.join(known)} (or 'all-linear')")


def _check_max_length(recipe: Recipe, name: str, config: schema.StageBase) -> None:
    train = getattr(config, "train", None)
    if not isinstance(train, schema.TrainSection):
        return
    values = model_config(recipe, name) or {}
    limit = next((values[k] for k in POSITION_KEYS if isinstance(values.get(k), int)), None)
    if limit is not None and train.max_length > limit:
        raise _error(recipe, name, ("train", "max_length"), f"max_length {train.max_length} exceeds the model's "
                     f"{limit} positions", f"set `train.max_length: {limit}` or less")
