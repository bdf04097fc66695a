"""GGUF export through llama.cpp's own tools: find its converter, convert a Hugging Face folder, quantise, read a
GGUF's metadata, and write an Ollama Modelfile whose template and stop tokens come from the tokenizer.

Used by `pipeline.stages.export` (the `export` stage and `python -m pipeline export`); nothing runs at import.

What it needs is the `export` extra, installed by `bash requirements/export.sh`: llama-cpp-python compiled from its
source distribution (its `llama_model_quantize` writes q4_k_m; its `Llama` runs the result in tests), `gguf` and
`sentencepiece`, and llama.cpp's converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`) copied from that same
source distribution to `<venv>/share/hf-pipeline/llama.cpp`. `LLAMA_CPP_DIR=<a llama.cpp checkout>` uses another
converter instead. f16 and q8_0 are written by the converter itself (`--outtype`); q4_k_m is quantised from f16.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import PipelineError

EXTRA = "export"
INSTALL = "bash requirements/export.sh"
CONVERTER_ENV = "LLAMA_CPP_DIR"
LABELS = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
CONVERTER_OUTTYPE = {"f16": "f16", "q8_0": "q8_0"}  # q4_k_m: f16 first, then llama.cpp's quantiser
LLAMA_FTYPE_Q4_K_M = 15  # enum llama_ftype in llama.h (LLAMA_FTYPE_MOSTLY_Q4_K_M)
CONVERT_TIMEOUT_S = 3600


def missing(what: str, key: str = "export") -> PipelineError:
    return PipelineError(f"{what} is not installed (the optional `{EXTRA}` extra)", key=key,
                         fix=f"{INSTALL} (llama-cpp-python, gguf, sentencepiece and llama.cpp's converter)")


# ------------------------------------------------------------------------------------------------- the converter


def default_converter_dir() -> Path:
    """Where requirements/export.sh puts llama.cpp's converter: inside the active environment."""
    return Path(sys.prefix) / "share" / "hf-pipeline" / "llama.cpp"


def converter_dir() -> Path:
    """The llama.cpp tree whose `convert_hf_to_gguf.py` to run: $LLAMA_CPP_DIR, else the extra's copy."""
    configured = os.environ.get(CONVERTER_ENV)
    folder = Path(configured).expanduser() if configured else default_converter_dir()
    if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py").is_dir():
        return folder
    if configured:
        raise PipelineError(f"{CONVERTER_ENV}={configured} holds no convert_hf_to_gguf.py and gguf-py/",
                            key=CONVERTER_ENV, fix="point it at a llama.cpp checkout, or unset it to use the "
                            f"`{EXTRA}` extra ({INSTALL})")
    raise missing("llama.cpp's converter (convert_hf_to_gguf.py)")


def converter_version(folder: Path) -> str | None:
    """The llama-cpp-python version whose source distribution the converter came from (written by export.sh)."""
    stamp = folder / "LLAMA_CPP_PYTHON_VERSION"
    return stamp.read_text().strip() if stamp.is_file() else None


def require(quant: str) -> Path:
    """Check before any work that everything `quant` needs is installed; returns the converter's folder."""
    folder = converter_dir()
    for module in ("sentencepiece", "gguf"):
        if _missing_module(module):
            raise missing(f"`{module}`")
    if quant == "q4_k_m" and _missing_module("llama_cpp"):
        raise missing("llama-cpp-python (its quantiser writes q4_k_m)")
    return folder


def _missing_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


# ---------------------------------------------------------------------------------------------------- converting


def convert(model_dir: Path, outfile: Path, outtype: str, *, tokenizer_pre: str | None = None,
            override_pre: bool = False, model_name: str | None = None) -> None:
    """Run llama.cpp's converter on a Hugging Face folder (config.json, safetensors, tokenizer files) in a child
    process; a failure is one PipelineError line with the converter's last message."""
    folder = converter_dir()
    command = [sys.executable, "-m", "pipeline.tools.gguf_convert", "--llama-cpp", str(folder)]
    if tokenizer_pre:
        command += ["--tokenizer-pre", tokenizer_pre] + (["--override-pre"] if override_pre else [])
    command += ["--", str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    if model_name:
        command += ["--model-name", model_name]  # general.name, which llama.cpp and Ollama show
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0 or not outfile.is_file():
        message = last_message(done.stderr)
        fix = ("name the tokenizer's pre-tokenization for llama.cpp with the export stage's `tokenizer_pre:` "
               "(e.g. gpt-2, llama3, qwen2)" if "pre-tokenizer was not recognized" in message else
               "see the message; an architecture llama.cpp does not support cannot be exported to GGUF")
        raise PipelineError(f"llama.cpp's converter failed on {model_dir}: {message}", key="export", fix=fix)


def last_message(text: str) -> str:
    """The most telling line of a converter's stderr: the exception, else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def quantize(source: Path, outfile: Path, quant: str) -> None:
    """llama.cpp's own quantiser (llama_model_quantize, through llama-cpp-python) from an f16 GGUF."""
    if quant != "q4_k_m":
        raise ValueError(f"quantize() writes q4_k_m only, not {quant}")
    try:
        import llama_cpp
    except ImportError:
        raise missing("llama-cpp-python (its quantiser writes q4_k_m)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPE_Q4_K_M
    params.nthread = max(1, os.cpu_count() or 1)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), params)
    if status != 0 or not outfile.is_file():
        raise PipelineError(f"llama.cpp could not quantise {source.name} to q4_k_m (status {status})", key="export",
                            fix="export with quant: q8_0 or f16")


def write_gguf(model_dir: Path, outfile: Path, quant: str, work_dir: Path, *, tokenizer_pre: str | None = None,
               override_pre: bool = False, model_name: str | None = None) -> None:
    """`outfile` in the requested quantisation: the converter writes f16 and q8_0; q4_k_m is quantised from f16."""
    options = {"tokenizer_pre": tokenizer_pre, "override_pre": override_pre, "model_name": model_name}
    if quant in CONVERTER_OUTTYPE:
        convert(model_dir, outfile, CONVERTER_OUTTYPE[quant], **options)
        return
    f16 = work_dir / "model-F16.gguf"
    convert(model_dir, f16, "f16", **options)
    try:
        quantize(f16, outfile, quant)
    finally:
        f16.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- reading GGUF


def metadata(file: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """Scalar or string metadata of a GGUF file (the `gguf` package's reader), for the keys present."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise missing("`gguf`") from None
    reader = GGUFReader(str(file))
    found: dict[str, Any] = {}
    for key in keys:
        field = reader.get_field(key)
        if field is not None:
            found[key] = field.contents()
    return found


def tensor_types(file: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {'Q8_0': 7, 'F32': 3}."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(file)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def pre_tokenizer_of(tokenizer_json: Path) -> str | None:
    """llama.cpp's name for a tokenizer.json's pre-tokenization when it is plain GPT-2 byte-level (the regex of
    ByteLevel with use_regex, no normalizer): 'gpt-2'. None for anything else."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pre = data.get("pre_tokenizer") or {}
    model = data.get("model") or {}
    if (model.get("type") == "BPE" and data.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)):
        return "gpt-2"
    return None


# ------------------------------------------------------------------------------------------------------ Ollama


MARK = "\u2063CONTENT\u2063"
ROLES = ("system", "user", "assistant")


def ollama_template(render: Callable[[list[dict[str, str]], bool], str]) -> str | None:
    """The tokenizer's chat template as an Ollama (Go) template, or None when it is not a plain concatenation of
    per-role wrappers around each message (then Ollama falls back to the template inside the GGUF).

    `render(messages, add_generation_prompt)` renders the Jinja template. Each role's wrapper is read from renders
    with a marker as content, the generation prompt and any default preamble (e.g. a default system message) from
    differences between renders; the result is checked against `render` on several conversations before use."""
    try:
        parts = _template_parts(render)
        if parts is None or not all(_rebuild(parts, c) == render(c, True) for c in _check_conversations()):
            return None
    except Exception:  # noqa: BLE001 - a template that raises on these conversations is not expressible either
        return None
    text = go_template(parts)
    return None if '"""' in text else text


def go_template(parts: dict[str, Any]) -> str:
    """Ollama's Go template for per-role wrappers: `_rebuild` is its exact transcription."""
    branches = []
    for index, role in enumerate(ROLES):
        before, after = parts[role]
        keyword = "if" if index == 0 else "else if"
        branches.append("{{ " + keyword + ' eq .Role "' + role + '" }}' + _go_literal(before) + "{{ .Content }}"
                        + _go_literal(after))
    text = ""
    if parts["default"]:
        text += ('{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + _go_literal(parts["default"])
                 + "{{ end }}")
    return text + "{{ range .Messages }}" + "".join(branches) + "{{ end }}{{ end }}" + _go_literal(parts["generation"])


def _template_parts(render) -> dict[str, Any] | None:
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
               {"role": "assistant", "content": "a"}]
    parts: dict[str, Any] = {}
    first_system = _split(render([{"role": "system", "content": MARK}], False))
    parts["system"] = first_system
    for role in ("user", "assistant"):
        before = render(history, False)
        after = render(history + [{"role": role, "content": MARK}], False)
        if not after.startswith(before):
            return None
        parts[role] = _split(after[len(before):])
    lone_user = _split(render([{"role": "user", "content": MARK}], False))
    if not lone_user[0].endswith(parts["user"][0]):
        return None
    parts["default"] = lone_user[0][:len(lone_user[0]) - len(parts["user"][0])]
    closed, open_ = render(history[:2], False), render(history[:2], True)
    if not open_.startswith(closed):
        return None
    parts["generation"] = open_[len(closed):]
    return parts


def _split(text: str) -> tuple[str, str]:
    before, after = text.split(MARK)  # ValueError unless the marker is there exactly once
    return before, after


def _rebuild(parts: dict[str, Any], messages: list[dict[str, str]]) -> str:
    """What the Go template renders for `messages` (its exact transcription, in Python)."""
    text = parts["default"] if not messages or messages[0]["role"] != "system" else ""
    for message in messages:
        before, after = parts[message["role"]]
        text += before + message["content"] + after
    return text + parts["generation"]


def _check_conversations() -> list[list[dict[str, str]]]:
    system, user, assistant = ({"role": r, "content": f" {r} text\nline two "} for r in ROLES)
    return [[user], [system, user], [user, assistant, user], [system, user, assistant, user, assistant, user]]


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile(gguf_name: str, tokenizer, *, context_length: int | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF next to it, TEMPLATE from the chat template, a stop per end token."""
    lines = [f"# Ollama: ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{gguf_name}"]
    template = None
    if getattr(tokenizer, "chat_template", None):
        template = ollama_template(lambda messages, open_: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=open_))
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    elif getattr(tokenizer, "chat_template", None):
        lines.append("# the chat template is not a per-message concatenation: Ollama reads it from the GGUF")
    for stop in stop_tokens(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    return "\n".join(lines) + "\n"


def stop_tokens(tokenizer) -> list[str]:
    """End-of-sequence and end-of-turn tokens: EOS, and special tokens the chat template closes a reply with."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    if getattr(tokenizer, "chat_template", None):
        try:
            reply = tokenizer.apply_chat_template([{"role": "user", "content": "u"},
                                                   {"role": "assistant", "content": MARK}], tokenize=False)
            closing = reply.split(MARK, 1)[1]
        except (ValueError, IndexError, TypeError):
            closing = ""
        stops += [t for t in tokenizer.all_special_tokens if t and t in closing]
    return list(dict.fromkeys(stops))
