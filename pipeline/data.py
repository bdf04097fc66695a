"""Load a stage's dataset (local json/jsonl/csv/parquet/txt, or a Hub id) and bring it to the shape its trainer wants.

Shapes (what a stage kind reads, `registry.StageKind.data_shape`): `text` (pretrain, tokenizer), `sft`
(prompt/completion messages), `preference` (prompt/chosen/rejected messages), `prompts` (prompt messages + optional
checkable `answer`) and `kto` (preference pairs, or unpaired prompt/completion rows with a boolean `label`).
Formats (how a file lays those rows out, `FORMATS`): each shape reads several, named and detected from the columns
of a file's first rows (`file_format`; `data.format` names one instead): OpenAI `messages` (system and tool roles
too), prompt/completion, HH-RLHF whole conversations in `chosen`/`rejected` (text or message lists), alpaca,
ShareGPT, UltraFeedback-binarized, ShareGPT-preference (LLaMA-Factory), prompt/answer and unpaired KTO rows; every
one becomes the shape's canonical rows, so the trainers see one layout. Bad rows (empty, missing field, wrong type,
non-UTF-8, too long) are counted with their row numbers; `on_bad_rows` picks `error` (default) or `skip`. Eval rows
come from `eval_path`/`eval_split`, or are held out of the training rows (`eval_rows`/`eval_fraction`, seeded,
recorded for the manifest). `train_on: all_turns` makes one sft row per assistant turn. Called by stage modules and
preflight; nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline import chat_templates, schema
from pipeline.errors import DataError

HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
SHAPES = ("text", "sft", "preference", "prompts", "kto")
DETECT_ROWS = 20  # a file's format is detected from the columns of its first this-many object rows
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".gz")


def looks_local(path: str) -> bool:
    """A data or model path that must exist on disk (vs a Hub id like 'org/name')."""
    return (path.startswith(("/", "./", "../", "~")) or path.lower().endswith(LOCAL_DATA_SUFFIXES)
            or os.path.exists(path))


@dataclass
class BadRows:
    """Row numbers (1-based, in file order) of rows rejected, by reason."""

    reasons: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int) -> None:
        self.reasons.setdefault(reason, []).append(row)

    @property
    def count(self) -> int:
        return sum(len(rows) for rows in self.reasons.values())

    def summary(self) -> str:
        parts = []
        for reason, rows in self.reasons.items():
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            parts.append(f"{len(rows)} {reason} (rows {shown})")
        return "; ".join(parts)


# ------------------------------------------------------------------------------------------------------- reading


def _open_text(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def _inner_suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1].lower() if suffixes else ""


def _read_json_rows(path: Path, bad: BadRows) -> list[tuple[int, Any]]:
    """Rows of a .jsonl or .json file with their 1-based numbers; undecodable rows go to `bad`."""
    raw = _open_text(path)
    stripped = raw.lstrip()
    if stripped.startswith(b"["):
        try:
            items = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError("file is not valid UTF-8", file=str(path), fix="re-encode it as UTF-8") from None
        except ValueError as exc:
            raise DataError(f"invalid JSON: {exc}", file=str(path), fix="fix the JSON array") from None
        return list(enumerate(items, start=1))
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            bad.add("non-UTF-8", number)
            continue
        try:
            rows.append((number, json.loads(text)))
        except ValueError:
            bad.add("invalid JSON", number)
    return rows


def _read_table(path: Path) -> list[tuple[int, Any]]:
    import datasets

    suffix = _inner_suffix(path)
    builder = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}[suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise DataError(f"cannot read {suffix} file: {str(exc).splitlines()[0]}", file=str(path),
                        fix="check the file's format") from None
    return list(enumerate(ds, start=1))


def _read_hub(section: schema.DataSection, split: str) -> list[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(section.path, section.name, split=split)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load Hub dataset '{section.path}' split '{split}': {str(exc).splitlines()[0]}",
                        key="data.path", fix="check the dataset id and split, or download it to a local file") from None
    return list(enumerate(ds, start=1))


def read_rows(path: str, section: schema.DataSection, split: str, bad: BadRows) -> list[tuple[int, Any]]:
    if looks_local(path):
        file = Path(path).expanduser()
        if not file.exists():
            raise DataError("file not found", file=path, key="data.path", fix="fix the path")
        if _inner_suffix(file) in (".json", ".jsonl"):
            return _read_json_rows(file, bad)
        if _inner_suffix(file) in (".csv", ".parquet", ".txt"):
            return _read_table(file)
        raise DataError(f"unsupported file type '{file.suffix}'", file=path, key="data.path",
                        fix="use .jsonl, .json, .csv, .parquet or .txt")
    return _read_hub(section, split)


# --------------------------------------------------------------------------------------------------- normalising


def _is_messages(value: Any) -> bool:
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value))


def _as_messages(value: Any, role: str) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value.strip() else None
    return value if _is_messages(value) else None


def parse_hh(text: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages (user/assistant, contents stripped); None when the text
    is not in that shape (no turn markers, or text before the first one). Whitespace around the text is ignored."""
    parts = HH_TURN.split("\n\n" + text.strip())
    if len(parts) < 3 or parts[0].strip():
        return None
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def conversation(value: Any) -> list[dict[str, str]] | None:
    """A whole conversation: an HH-RLHF string (see `parse_hh`) or a list of {role, content}; None otherwise."""
    if isinstance(value, str):
        return parse_hh(value)
    return value if _is_messages(value) else None


def _not_a_conversation(column: str) -> str:
    return (f"'{column}' is not a conversation (need '\\n\\nHuman: ...\\n\\nAssistant: ...' text "
            "or a list of {role, content})")


def _split_shared_prefix(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _field(row: dict, name: str, fields: dict[str, str]) -> Any:
    return row.get(fields.get(name, name))


def _text_row(row: dict, fields: dict[str, str], text_fields: Iterable[str]) -> tuple[dict | None, str | None]:
    texts = []
    for name in text_fields:
        value = _field(row, name, fields)
        if value is None:
            continue
        if not isinstance(value, str):
            return None, f"wrong type in '{name}'"
        texts.append(value)
    if not texts:
        return None, f"missing field '{fields.get('text', 'text')}'"
    text = "\n".join(texts)
    return ({"text": text}, None) if text.strip() else (None, "empty")


def _last_turn(messages: list[dict[str, str]]) -> tuple[dict | None, str | None]:
    """prompt = every turn before the last one, completion = the last one (which must be the assistant's)."""
    if messages[-1]["role"] != "assistant":
        return None, "conversation does not end with an assistant turn"
    if not messages[-1]["content"].strip():
        return None, "empty"
    return {"prompt": messages[:-1], "completion": messages[-1:]}, None


def _sft_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    messages = _field(row, "messages", fields)
    if messages is not None:
        if not _is_messages(messages) or messages[-1]["role"] != "assistant":
            return None, "wrong type in 'messages' (need a list of {role, content} ending with assistant)"
        if not messages[-1]["content"].strip():
            return None, "empty"
        return {"prompt": messages[:-1], "completion": messages[-1:]}, None
    prompt, completion = _field(row, "prompt", fields), _field(row, "completion", fields)
    chosen = _field(row, "chosen", fields)
    if prompt is None and chosen is not None:  # a whole conversation, e.g. HH-RLHF
        whole = conversation(chosen)
        return _last_turn(whole) if whole else (None, _not_a_conversation(fields.get("chosen", "chosen")))
    if prompt is None or completion is None:
        return None, "missing field 'messages' or 'prompt'/'completion' (or a whole conversation in 'chosen')"
    prompt_m, completion_m = _as_messages(prompt, "user"), _as_messages(completion, "assistant")
    if prompt_m is None or completion_m is None:
        if isinstance(prompt, str) and isinstance(completion, str):
            return None, "empty"
        return None, "wrong type in 'prompt'/'completion'"
    return {"prompt": prompt_m, "completion": completion_m}, None


def _preference_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    chosen, rejected = _field(row, "chosen", fields), _field(row, "rejected", fields)
    prompt = _field(row, "prompt", fields)
    if chosen is None or rejected is None:
        return None, "missing field 'chosen'/'rejected'"
    if prompt is None:  # full conversations: HH-RLHF strings or message lists
        chosen_m, rejected_m = conversation(chosen), conversation(rejected)
        if not chosen_m or not rejected_m:
            return None, "wrong type in 'chosen'/'rejected' (need prompt, or full conversations)"
        prompt_m, chosen_m, rejected_m = _split_shared_prefix(chosen_m, rejected_m)
        if not prompt_m:
            return None, "chosen and rejected share no prompt"
    else:
        prompt_m = _as_messages(prompt, "user")
        chosen_m, rejected_m = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
        if prompt_m is None or chosen_m is None or rejected_m is None:
            return None, "empty" if all(isinstance(v, str) for v in (prompt, chosen, rejected)) else \
                "wrong type in 'prompt'/'chosen'/'rejected'"
    if not chosen_m[-1]["content"].strip() or not rejected_m[-1]["content"].strip():
        return None, "empty"
    return {"prompt": prompt_m, "chosen": chosen_m, "rejected": rejected_m}, None


def _prompts_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    prompt = _field(row, "prompt", fields)
    messages = _field(row, "messages", fields)
    chosen = _field(row, "chosen", fields)
    if prompt is None and messages is None and chosen is not None:  # a whole conversation, e.g. HH-RLHF
        messages = conversation(chosen)
        if messages is None:
            return None, _not_a_conversation(fields.get("chosen", "chosen"))
    if prompt is None and messages is not None and _is_messages(messages):
        prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    prompt_m = _as_messages(prompt, "user") if prompt is not None else None
    if prompt is None:
        return None, "missing field 'prompt'"
    if prompt_m is None:
        return None, "empty" if isinstance(prompt, str) else "wrong type in 'prompt'"
    answer = _field(row, "answer", fields)
    return {"prompt": prompt_m, "answer": None if answer is None else str(answer)}, None


def _answer(row: dict, fields: dict[str, str]) -> str | None:
    answer = _field(row, "answer", fields)
    return None if answer is None else str(answer)


def _with_system(system: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """`messages` after a system turn holding `system`, when that is non-empty text."""
    return ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []) + messages


# ------------------------------------------------------------------------------------- formats beyond the native ones


def _tool_call(call: Any) -> dict[str, Any]:
    """An OpenAI tool call as {name, arguments}, its JSON-string arguments decoded where they decode."""
    function = call.get("function", call) if isinstance(call, dict) else {}
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return {"name": function.get("name"), "arguments": arguments}


def _openai_content(message: dict) -> str | None:
    """A message's text: its content (the text of content parts joined), then each tool call as a <tool_call> block
    of its JSON (Hermes/Qwen style, what the `chatml-tools` template renders and TRL's GRPO parses)."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        lines = [chat_templates.tool_call_text(**_tool_call(call)) for call in calls]
        content = "\n".join(([content] if isinstance(content, str) and content else []) + lines)
    return content if isinstance(content, str) else None


def openai_messages(value: Any) -> list[dict[str, str]] | None:
    """OpenAI chat messages (system, user, assistant, tool roles; content parts; an assistant's `tool_calls` with no
    content) as {role, content} text; other keys (tool_call_id, name) are dropped. None when it is not such a list."""
    if not isinstance(value, list) or not value:
        return None
    out = []
    for message in value:
        content = _openai_content(message) if isinstance(message, dict) else None
        if content is None or not isinstance(message.get("role"), str):
            return None
        out.append({"role": message["role"], "content": content})
    return out


def _openai_row(row: dict, fields: dict[str, str]) -> dict:
    """`row` with its `messages` as {role, content} text when they are OpenAI messages that are not that already
    (rows that already are stay as they are; tool calls are always flattened, even beside string contents)."""
    column = fields.get("messages", "messages")
    value = row.get(column)
    plain = _is_messages(value) and not any(m.get("tool_calls") for m in value)
    converted = None if value is None or plain else openai_messages(value)
    return row if converted is None else {**row, column: converted}


def _messages_sft(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    return _sft_row(_openai_row(row, fields), fields)


def _messages_prompts(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    return _prompts_row(_openai_row(row, fields), fields)


def _alpaca_prompt(row: dict, fields: dict[str, str]) -> tuple[list | None, str | None]:
    """alpaca: the user turn is `instruction`, then `input` on the next line when there is one; `system` first."""
    instruction, extra, system = (_field(row, name, fields) for name in ("instruction", "input", "system"))
    if instruction is None:
        return None, f"missing field '{fields.get('instruction', 'instruction')}'"
    if not all(isinstance(value, str) for value in (instruction, extra or "", system or "")):
        return None, "wrong type in 'instruction'/'input'/'system'"
    text = instruction + ("\n" + extra if extra and extra.strip() else "")
    if not text.strip():
        return None, "empty"
    return _with_system(system, [{"role": "user", "content": text}]), None


def _alpaca_sft(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    prompt, reason = _alpaca_prompt(row, fields)
    output = _field(row, "output", fields)
    if prompt is None or output is None:
        return None, reason or f"missing field '{fields.get('output', 'output')}'"
    if not isinstance(output, str):
        return None, "wrong type in 'output'"
    if not output.strip():
        return None, "empty"
    return {"prompt": prompt, "completion": [{"role": "assistant", "content": output}]}, None


def _alpaca_prompts(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    prompt, reason = _alpaca_prompt(row, fields)
    return ({"prompt": prompt, "answer": _answer(row, fields)}, None) if prompt else (None, reason)


def sharegpt_messages(value: Any) -> list[dict[str, str]] | None:
    """ShareGPT turns ({from: human|gpt|system, value}; `role`/`content` keys and user/assistant spellings too;
    function_call and observation turns) as {role, content} messages; None when it is not such a list."""
    if not isinstance(value, list) or not value:
        return None
    messages = []
    for turn in value:
        if not isinstance(turn, dict):
            return None
        speaker, text = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES or not isinstance(text, str):
            return None
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": text})
    return messages


def _sharegpt(row: dict, fields: dict[str, str]) -> tuple[list | None, str | None]:
    """A ShareGPT row's `conversations` as messages, after its `system` column when it has one."""
    value = _field(row, "conversations", fields)
    if value is None:
        return None, f"missing field '{fields.get('conversations', 'conversations')}'"
    messages = sharegpt_messages(value)
    if messages is None:
        return None, ("wrong type in 'conversations' (need a list of {from: human|gpt|system, value}, or "
                      "{role: user|assistant|system, content})")
    return _with_system(_field(row, "system", fields), messages), None


def _sharegpt_sft(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    messages, reason = _sharegpt(row, fields)
    return _last_turn(messages) if messages else (None, reason)


def _sharegpt_prompts(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    """The conversation before its last assistant turn (all of it when it ends with the user's)."""
    messages, reason = _sharegpt(row, fields)
    if messages is None:
        return None, reason
    prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    return ({"prompt": prompt, "answer": _answer(row, fields)}, None) if prompt else (None, "empty")


def _sharegpt_answer(value: Any) -> list[dict[str, str]] | None:
    """A ShareGPT-preference answer: one {from: gpt, value} turn (or a list of turns, or plain text)."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    turns = sharegpt_messages([value] if isinstance(value, dict) else value)
    return turns if turns and turns[-1]["role"] == "assistant" else None


def _sharegpt_pair(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    """ShareGPT-preference (LLaMA-Factory): `conversations` is the prompt, `chosen`/`rejected` one answer each."""
    prompt, reason = _sharegpt(row, fields)
    if prompt is None:
        return None, reason
    chosen, rejected = (_sharegpt_answer(_field(row, name, fields)) for name in ("chosen", "rejected"))
    if chosen is None or rejected is None:
        return None, "wrong type in 'chosen'/'rejected' (need a {from: gpt, value} turn each)"
    if not chosen[-1]["content"].strip() or not rejected[-1]["content"].strip():
        return None, "empty"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def _ultrafeedback_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    """UltraFeedback-binarized: `chosen`/`rejected` are whole conversations (the user's turn included), so their
    shared prefix is the prompt and `prompt` is not put before it again; the scores are not used."""
    chosen, rejected = _field(row, "chosen", fields), _field(row, "rejected", fields)
    if all(_is_messages(value) and value[0]["role"] != "assistant" for value in (chosen, rejected)):
        row = {key: value for key, value in row.items() if key != fields.get("prompt", "prompt")}
    return _preference_row(row, fields)


def _unpaired_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    """Unpaired KTO: a prompt/completion row (any `sft` layout) and a boolean `label` (desirable or not)."""
    item, reason = _sft_row(row, fields)
    if item is None:
        return None, reason
    label = _field(row, "label", fields)
    if not isinstance(label, bool):
        return None, "wrong type in 'label' (need true/false)"
    return {**item, "label": label}, None


def _kto_row(row: dict, fields: dict[str, str]) -> tuple[dict | None, str | None]:
    return (_unpaired_row if fields.get("label", "label") in row else _preference_row)(row, fields)


# ----------------------------------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Format:
    """One layout of a shape's rows. A file is read this way when its columns (canonical names, through `fields:`)
    hold every one of `needs` and none of `without`; `convert(row, fields)` gives (canonical row, None) or (None,
    reason)."""

    name: str
    needs: tuple[str, ...]
    convert: Callable[[dict, dict[str, str]], tuple[dict | None, str | None]] | None
    without: tuple[str, ...] = ()

    def fits(self, columns: set[str], fields: dict[str, str]) -> bool:
        return (all(fields.get(c, c) in columns for c in self.needs)
                and not any(fields.get(c, c) in columns for c in self.without))

    def describe(self, fields: dict[str, str]) -> str:
        text = "+".join(f"'{fields.get(c, c)}'" for c in self.needs)
        return text + "".join(f" (without '{fields.get(c, c)}')" for c in self.without)


PAIRS = (Format("ultrafeedback", ("chosen", "rejected", "score_chosen", "score_rejected"), _ultrafeedback_row),
         Format("sharegpt-preference", ("conversations", "chosen", "rejected"), _sharegpt_pair),
         Format("preference", ("prompt", "chosen", "rejected"), _preference_row),
         Format("hh-rlhf", ("chosen", "rejected"), _preference_row))
# Each shape's formats in detection order: the first whose columns a file has is its format. The native layouts
# come first, so a file read before formats had names is read as it was.
FORMATS: dict[str, tuple[Format, ...]] = {
    "text": (Format("text", (), None),),
    "sft": (Format("messages", ("messages",), _messages_sft),
            Format("prompt-completion", ("prompt", "completion"), _sft_row),
            Format("hh-rlhf", ("chosen",), _sft_row, without=("prompt",)),
            Format("alpaca", ("instruction", "output"), _alpaca_sft),
            Format("sharegpt", ("conversations",), _sharegpt_sft)),
    "preference": PAIRS,
    "prompts": (Format("prompt-answer", ("prompt",), _prompts_row),
                Format("messages", ("messages",), _messages_prompts),
                Format("hh-rlhf", ("chosen",), _prompts_row),
                Format("alpaca", ("instruction",), _alpaca_prompts),
                Format("sharegpt", ("conversations",), _sharegpt_prompts)),
    "kto": (Format("kto-unpaired", ("label",), _unpaired_row), *PAIRS),
}
# A shape's rows read row by row without a named format (`normalise_row(..., fmt=None)`), as before formats.
NATIVE = {"sft": _sft_row, "preference": _preference_row, "prompts": _prompts_row, "kto": _kto_row}


def format_named(shape: str, name: str | None) -> Format | None:
    """The format `name` of `shape`, or None when `shape` reads no such format."""
    return next((fmt for fmt in FORMATS[shape] if fmt.name == name), None)


def row_columns(rows: Iterable[Any], limit: int = DETECT_ROWS) -> set[str]:
    """The columns of the first `limit` object rows (other rows are skipped: they are bad rows)."""
    found: set[str] = set()
    objects = (row for row in rows if isinstance(row, dict))
    for _, row in zip(range(limit), objects):
        found.update(row)
    return found


def detect_format(columns: set[str], shape: str, section: schema.DataSection) -> str | None:
    """The format a file with these columns is read in for `shape`: `section.format` when the columns fit it, else
    the first of the shape's formats they fit; None when they fit none (see `format_mismatch`)."""
    if section.format:
        fmt = format_named(shape, section.format)
        return fmt.name if fmt is not None and fmt.fits(columns, section.fields) else None
    return next((fmt.name for fmt in FORMATS[shape] if fmt.fits(columns, section.fields)), None)


def _fewest(formats: tuple[Format, ...]) -> list[Format]:
    """The formats no other format with fewer of the same columns covers: the columns a file needs at the least."""
    return [fmt for fmt in formats
            if not any(not other.without and set(other.needs) < set(fmt.needs) for other in formats)]


def format_mismatch(columns: set[str], shape: str, section: schema.DataSection, reader: str,
                    source: str = "") -> tuple[str, str, str]:
    """Why `detect_format` found no format: (the data key at fault, `fields` or `format`; the message, starting with
    `source`; the fix). `reader` names who reads the rows, e.g. 'a kto stage'."""
    formats, fields, found = FORMATS[shape], section.fields, sorted(columns)
    names = ", ".join(fmt.name for fmt in formats)
    where = f"{source} has columns {found}" if source else f"has columns {found}"
    if not section.format:
        wanted = " or ".join(fmt.describe(fields) for fmt in _fewest(formats))
        return "fields", f"{where}, {reader} needs {wanted} (formats: {names})", (
            f"rename the columns, or map them: `fields: {{{formats[0].needs[0]}: <your column>}}`")
    fmt = format_named(shape, section.format)
    if fmt is None:
        return "format", f"format '{section.format}' is not one {reader} reads ({names})", (
            f"use one of {names}, or drop `format` to detect it from the columns")
    return "format", f"{where}, format '{fmt.name}' needs {fmt.describe(fields)}", (
        f"rename the columns, map them (`fields: {{{fmt.needs[0]}: <your column>}}`), or drop `format`")


def file_format(rows: list[tuple[int, Any]], shape: str, section: schema.DataSection, source: str, key: str,
                reader: str) -> str:
    """The format a file's `rows` (as read) are in: `data.format`, or detected from the columns of the first
    DETECT_ROWS object rows. A file without object rows takes the shape's first format (its rows are all bad rows
    then). Raises one DataError line naming the file, the formats and the columns found when none fits."""
    columns = row_columns(row for _, row in rows)
    name = detect_format(columns, shape, section) if columns else (section.format or FORMATS[shape][0].name)
    if name is None or format_named(shape, name) is None:
        at, message, fix = format_mismatch(columns, shape, section, reader)
        raise DataError(message, file=source, key=f"{key}.{at}", fix=fix)
    return name


def normalise_row(row: Any, shape: str, fields: dict[str, str], text_fields: Iterable[str] = ("text",),
                  fmt: str | None = None) -> tuple[dict | None, str | None]:
    """One row in the canonical shape, or (None, reason). `fmt`: the file's format (`file_format`); None: read by
    the shape's native columns, row by row."""
    if not isinstance(row, dict):
        return None, "not an object"
    if shape == "text":
        return _text_row(row, fields, text_fields)
    if shape not in NATIVE:
        raise ValueError(f"unknown shape {shape}")
    found = format_named(shape, fmt) if fmt else None
    return (found.convert if found is not None else NATIVE[shape])(row, fields)


def assistant_turns(item: dict) -> list[dict]:
    """`train_on: all_turns`: one prompt/completion row per assistant turn of an sft row, each with the conversation
    before it as its prompt: the earlier assistant turns of `item`'s prompt (in order; one with nothing before it,
    or an empty one, is left out), then `item` itself (its last turn)."""
    prompt = item["prompt"]
    earlier = [{"prompt": prompt[:i], "completion": [m]} for i, m in enumerate(prompt)
               if i > 0 and m["role"] == "assistant" and m["content"].strip()]
    return earlier + [item]


# ---------------------------------------------------------------------------------------------------------- entry


@dataclass
class LoadedData:
    """A stage's rows in their canonical shape. `held_out`: which rows `eval_rows`/`eval_fraction` held out of the
    training file, for the manifest (None when there was no such split). `format`: the training file's format
    (`FORMATS`), shown on the console and recorded in the manifest as `data_format`."""

    train: Any  # datasets.Dataset
    eval: Any | None
    bad_rows: int = 0
    sources: list[str] = field(default_factory=list)
    held_out: dict[str, Any] | None = None
    format: str | None = None


def _normalise(rows: list[tuple[int, Any]], shape: str, section: schema.DataSection, bad: BadRows,
               text_fields: Iterable[str], too_long: Callable[[dict], bool] | None,
               limit: int | None, fmt: str | None = None) -> list[tuple[int, dict]]:
    """The usable rows (read in format `fmt`) with their row numbers; the others go to `bad`."""
    out = []
    for number, row in rows:
        item, reason = normalise_row(row, shape, section.fields, text_fields, fmt)
        if item is None:
            bad.add(reason, number)
            continue
        if too_long is not None and too_long(item):
            bad.add("over-long", number)
            continue
        out.append((number, item))
        if limit and len(out) >= limit:
            break
    return out


def _report(bad: BadRows, source: str, section: schema.DataSection, key: str) -> None:
    if bad.count and section.on_bad_rows == "error":
        raise DataError(f"{bad.count} bad rows: {bad.summary()}", file=source, key=key,
                        fix="fix the rows, or set `on_bad_rows: skip` in the data section")
    if bad.count:
        import logging

        logging.getLogger("pipeline").warning("%s: skipped %d bad rows: %s", source, bad.count, bad.summary())


def row_tokens(tokenizer, tools: list | None = None) -> Callable[[dict], int]:
    """A row's length in chat-template tokens: its longest of prompt plus completion (or chosen, or rejected); a
    prompt-only row: the prompt with the generation prompt, as it is sampled from. `tools`: the tool schemas the
    stage's prompts show, counted too."""
    shown = {"tools": tools} if tools else {}

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(item: dict) -> int:
        answers = [key for key in ("completion", "chosen", "rejected") if key in item]
        if not answers:
            return tokens(tokenizer.apply_chat_template(item["prompt"], tokenize=False, add_generation_prompt=True,
                                                        **shown))
        return max(tokens(tokenizer.apply_chat_template(item["prompt"] + item[key], tokenize=False, **shown))
                   for key in answers)

    return count


def too_long_for(tokenizer, max_length: int, tools: list | None = None) -> Callable[[dict], bool] | None:
    """A `too_long` row check: a row over `max_length` chat-template tokens (`row_tokens`, with `tools` shown)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    count = row_tokens(tokenizer, tools)
    return lambda item: count(item) > max_length


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, group_batches: int = 50) -> list[int]:
    """Row indices in an order whose consecutive `batch_size` slices hold rows of similar length: shuffle the rows,
    sort each group of `group_batches` batches by length, cut it into batches, shuffle the full batches (a short
    last batch stays last, so every slice stays one batch). Deterministic in `seed`."""
    rng = random.Random(seed)
    rows = list(range(len(lengths)))
    rng.shuffle(rows)
    group = batch_size * group_batches
    batches = []
    for start in range(0, len(rows), group):
        ordered = sorted(rows[start:start + group], key=lambda row: lengths[row])
        batches += [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    short = [batches.pop()] if batches and len(batches[-1]) < batch_size else []
    rng.shuffle(batches)
    return [row for batch in batches + short for row in batch]


def holding_out(section: schema.DataSection) -> bool:
    """True when `eval_rows`/`eval_fraction` hold rows out of `path` itself (no eval file or split is given)."""
    return not (section.eval_path or section.eval_split) and bool(section.eval_rows or section.eval_fraction)


def held_out_rows(rows: list[tuple[int, Any]], section: schema.DataSection, seed: int, key: str = "data") -> set[int]:
    """Row numbers of the file's rows that `eval_rows` (a count) or `eval_fraction` (of the rows, rounded up) holds
    out, drawn by `seed`. Drawn from the rows as read, before any is checked, so every stage reading the same file
    with the same seed and option holds out the same rows, whatever its shape, filters or `max_rows`."""
    import numpy as np

    option = "eval_rows" if section.eval_rows else "eval_fraction"
    held = section.eval_rows or math.ceil(section.eval_fraction * len(rows))
    if held >= len(rows):
        raise DataError(f"`{option}: {getattr(section, option)}` holds out {held} of the {len(rows)} rows, leaving "
                        "none to train on", file=section.path, key=f"{key}.{option}",
                        fix=f"lower `{option}`, or give held-out rows in `eval_path`")
    return {rows[i][0] for i in np.random.default_rng(seed).permutation(len(rows))[:held].tolist()}


def held_out_record(section: schema.DataSection, seed: int, held: set[int], train_rows: int,
                    eval_rows: int) -> dict[str, Any]:
    """What the manifest says about a hold-out: the file, the seed, which rows were held out (1-based row numbers as
    in bad-row reports: line numbers in a JSONL file, positions otherwise) and how many usable rows each side kept."""
    record: dict[str, Any] = {"file": section.path}
    if not looks_local(section.path):
        record["split"] = section.split
    if section.eval_fraction:
        record["eval_fraction"] = section.eval_fraction
    return {**record, "seed": seed, "held_out_rows": len(held), "held_out_row_numbers": sorted(held),
            "train_rows": train_rows, "eval_rows": eval_rows}


def _dataset(items: list[tuple[int, dict]], expand: bool):
    """A Dataset of the numbered items; `expand` (sft, `train_on: all_turns`): one row per assistant turn of each."""
    from datasets import Dataset

    rows = [item for _, item in items]
    return Dataset.from_list([turn for row in rows for turn in assistant_turns(row)] if expand else rows)


def _eval_source(section: schema.DataSection, shape: str, key: str, text_fields: Iterable[str],
                 too_long: Callable[[dict], bool] | None, reader: str) -> tuple[list[tuple[int, dict]], int]:
    """(usable rows, bad rows skipped) of `eval_path` or `eval_split` (in its own format), at most
    `max_eval_rows`."""
    bad = BadRows()
    path = section.eval_path or section.path
    raw = read_rows(path, section, section.eval_split or section.split, bad)
    fmt = file_format(raw, shape, section, path, key, reader)
    rows = _normalise(raw, shape, section, bad, text_fields, too_long, section.max_eval_rows, fmt)
    _report(bad, path, section, f"{key}.eval_path")
    return rows, bad.count


def _split(items: list[tuple[int, dict]], held: set[int], section: schema.DataSection,
           key: str) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """(train, eval) of the usable rows, by whether their row is held out; eval cut to `max_eval_rows`."""
    option = "eval_rows" if section.eval_rows else "eval_fraction"
    train = [pair for pair in items if pair[0] not in held]
    evaluation = [pair for pair in items if pair[0] in held][:section.max_eval_rows or None]
    if not evaluation or not train:
        side = f"none of the {len(held)} held-out rows" if not evaluation else "none of the rows left to train on"
        raise DataError(f"{side} is usable", file=section.path, key=f"{key}.{option}",
                        fix=f"{'raise' if not evaluation else 'lower'} `{option}`, or fix the rows")
    return train, evaluation


def load_data(section: schema.DataSection, shape: str, *, key: str = "data", seed: int = 0,
              text_fields: Iterable[str] = ("text",), too_long: Callable[[dict], bool] | None = None,
              reader: str | None = None) -> LoadedData:
    """Train and (optional) eval datasets in the canonical `shape`, validated row by row, each file read in its
    format (`file_format`; `reader`, e.g. 'a kto stage', names who reads them in its errors). Eval rows come from
    `eval_path`/`eval_split`, or are held out of `path` by `eval_rows`/`eval_fraction` (drawn by `seed`, recorded
    in `held_out`); both sides keep the file's order."""
    if shape not in SHAPES:
        raise ValueError(shape)
    reader = reader or f"a stage reading {shape} rows"
    bad = BadRows()
    rows = read_rows(section.path, section, section.split, bad)
    fmt = file_format(rows, shape, section, section.path, key, reader)
    held = held_out_rows(rows, section, seed, key) if holding_out(section) else None
    train = _normalise(rows, shape, section, bad, text_fields, too_long, None, fmt)
    _report(bad, section.path, section, f"{key}.path")
    skipped, sources, evaluation = bad.count, [section.path], None
    if not train:
        raise DataError("no usable rows", file=section.path, key=f"{key}.path",
                        fix="check the file and the `fields:` mapping")
    if held is not None:
        train, evaluation = _split(train, held, section, key)
    if section.eval_path or section.eval_split:
        evaluation, eval_skipped = _eval_source(section, shape, key, text_fields, too_long, reader)
        skipped += eval_skipped
        if section.eval_path and section.eval_path not in sources:
            sources.append(section.eval_path)
    if section.max_rows:
        train = train[:section.max_rows]
    expand = shape == "sft" and section.train_on == "all_turns"
    record = None if held is None else held_out_record(section, seed, held, len(train), len(evaluation))
    return LoadedData(train=_dataset(train, expand), eval=_dataset(evaluation, expand) if evaluation else None,
                      bad_rows=skipped, sources=sources, held_out=record, format=fmt)
