"""Load a stage's dataset (local json/jsonl/csv/parquet/txt, or a Hub id) and bring it to the shape its trainer wants.

Shapes: `text` (pretrain, tokenizer), `sft` (messages or prompt/completion), `preference` (prompt/chosen/rejected as
text or messages, or HH-RLHF full conversations) and `prompts` (prompt + optional checkable `answer`). Bad rows
(empty, missing field, wrong type, non-UTF-8, too long) are counted with their row numbers; `on_bad_rows` picks
`error` (default) or `skip`. Called by stage modules; nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline import schema
from pipeline.errors import DataError
from pipeline.recipe import looks_local

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
SHAPES = ("text", "sft", "preference", "prompts")


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
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> messages; None if it is not in that shape."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _split_shared_prefix(chosen: list, rejected: list) -> tuple[list, list, list]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _field(row: dict, name: str, fields: dict[str, str]) -> Any:
    return row.get(fields.get(name, name))


def normalise_row(row: Any, shape: str, fields: dict[str, str], text_fields: Iterable[str] = ("text",)) -> tuple[
        dict | None, str | None]:
    """One row in the canonical shape, or (None, reason)."""
    if not isinstance(row, dict):
        return None, "not an object"
    if shape == "text":
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
    if shape == "sft":
        messages = _field(row, "messages", fields)
        if messages is not None:
            if not _is_messages(messages) or messages[-1]["role"] != "assistant":
                return None, "wrong type in 'messages' (need a list of {role, content} ending with assistant)"
            if not messages[-1]["content"].strip():
                return None, "empty"
            return {"prompt": messages[:-1], "completion": messages[-1:]}, None
        prompt, completion = _field(row, "prompt", fields), _field(row, "completion", fields)
        if prompt is None or completion is None:
            return None, "missing field 'messages' or 'prompt'/'completion'"
        prompt_m, completion_m = _as_messages(prompt, "user"), _as_messages(completion, "assistant")
        if prompt_m is None or completion_m is None:
            if isinstance(prompt, str) and isinstance(completion, str):
                return None, "empty"
            return None, "wrong type in 'prompt'/'completion'"
        return {"prompt": prompt_m, "completion": completion_m}, None
    if shape == "preference":
        chosen, rejected = _field(row, "chosen", fields), _field(row, "rejected", fields)
        prompt = _field(row, "prompt", fields)
        if chosen is None or rejected is None:
            return None, "missing field 'chosen'/'rejected'"
        if prompt is None:  # full conversations: HH-RLHF strings or message lists
            chosen_m = parse_hh(chosen) if isinstance(chosen, str) else (chosen if _is_messages(chosen) else None)
            rejected_m = parse_hh(rejected) if isinstance(rejected, str) else (
                rejected if _is_messages(rejected) else None)
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
    if shape == "prompts":
        prompt = _field(row, "prompt", fields)
        messages = _field(row, "messages", fields)
        if prompt is None and messages is not None and _is_messages(messages):
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        prompt_m = _as_messages(prompt, "user") if prompt is not None else None
        if prompt is None:
            return None, "missing field 'prompt'"
        if prompt_m is None:
            return None, "empty" if isinstance(prompt, str) else "wrong type in 'prompt'"
        answer = _field(row, "answer", fields)
        return {"prompt": prompt_m, "answer": None if answer is None else str(answer)}, None
    raise ValueError(f"unknown shape {shape}")


# ---------------------------------------------------------------------------------------------------------- entry


@dataclass
class LoadedData:
    train: Any  # datasets.Dataset
    eval: Any | None
    bad_rows: int = 0
    sources: list[str] = field(default_factory=list)


def _normalise(rows: list[tuple[int, Any]], shape: str, section: schema.DataSection, bad: BadRows,
               text_fields: Iterable[str], too_long: Callable[[dict], bool] | None, limit: int | None) -> list[dict]:
    out = []
    for number, row in rows:
        item, reason = normalise_row(row, shape, section.fields, text_fields)
        if item is None:
            bad.add(reason, number)
            continue
        if too_long is not None and too_long(item):
            bad.add("over-long", number)
            continue
        out.append(item)
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


def too_long_for(tokenizer, max_length: int) -> Callable[[dict], bool] | None:
    """A `too_long` row check: prompt plus completion (or chosen/rejected) over `max_length` chat-template tokens."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def check(item: dict) -> bool:
        for key in ("completion", "chosen", "rejected"):
            if key in item:
                text = tokenizer.apply_chat_template(item["prompt"] + item[key], tokenize=False)
                if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_length:
                    return True
        return False

    return check


def load_data(section: schema.DataSection, shape: str, *, key: str = "data", seed: int = 0,
              text_fields: Iterable[str] = ("text",), too_long: Callable[[dict], bool] | None = None) -> LoadedData:
    """Train and (optional) eval datasets in the canonical `shape`, validated row by row."""
    from datasets import Dataset

    if shape not in SHAPES:
        raise ValueError(shape)
    bad = BadRows()
    rows = read_rows(section.path, section, section.split, bad)
    train = _normalise(rows, shape, section, bad, text_fields, too_long, None)
    _report(bad, section.path, section, f"{key}.path")
    skipped = bad.count
    if not train:
        raise DataError("no usable rows", file=section.path, key=f"{key}.path",
                        fix="check the file and the `fields:` mapping")
    eval_rows: list[dict] | None = None
    sources = [section.path]
    if section.eval_path or section.eval_split:
        bad = BadRows()
        path = section.eval_path or section.path
        raw = read_rows(path, section, section.eval_split or section.split, bad)
        eval_rows = _normalise(raw, shape, section, bad, text_fields, too_long, section.max_eval_rows)
        _report(bad, path, section, f"{key}.eval_path")
        skipped += bad.count
        if path not in sources:
            sources.append(path)
    if section.max_rows:
        train = train[:section.max_rows]
    train_ds = Dataset.from_list(train)
    eval_ds = Dataset.from_list(eval_rows) if eval_rows else None
    if eval_ds is None and section.eval_fraction:
        split = train_ds.train_test_split(test_size=section.eval_fraction, seed=seed)
        train_ds, eval_ds = split["train"], split["test"]
        if section.max_eval_rows:
            eval_ds = eval_ds.select(range(min(len(eval_ds), section.max_eval_rows)))
    return LoadedData(train=train_ds, eval=eval_ds, bad_rows=skipped, sources=sources)
