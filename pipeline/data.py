"""Load a stage's dataset (local json/jsonl/csv/parquet/txt, or a Hub id) and bring it to the shape its trainer wants.

Shapes: `text` (pretrain, tokenizer), `sft` (messages, prompt/completion, or a whole conversation in `chosen`: an
HH-RLHF string or a message list), `preference` (prompt/chosen/rejected as text or messages, or HH-RLHF full
conversations) and `prompts` (prompt + optional checkable `answer`, or the conversation before the last assistant
turn of `messages`/`chosen`). Bad rows (empty, missing field, wrong type, non-UTF-8, too long) are counted with their
row numbers; `on_bad_rows` picks `error` (default) or `skip`. Eval rows come from `eval_path`/`eval_split`, or are
held out of the training rows (`eval_rows`/`eval_fraction`, seeded, recorded for the manifest). `train_on:
all_turns` makes one sft row per assistant turn. Called by stage modules; nothing runs at import.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline import schema
from pipeline.errors import DataError
from pipeline.recipe import looks_local

HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
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


def normalise_row(row: Any, shape: str, fields: dict[str, str], text_fields: Iterable[str] = ("text",)) -> tuple[
        dict | None, str | None]:
    """One row in the canonical shape, or (None, reason)."""
    if not isinstance(row, dict):
        return None, "not an object"
    if shape == "text":
        return _text_row(row, fields, text_fields)
    if shape == "sft":
        return _sft_row(row, fields)
    if shape == "preference":
        return _preference_row(row, fields)
    if shape == "prompts":
        return _prompts_row(row, fields)
    raise ValueError(f"unknown shape {shape}")


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
    training file, for the manifest (None when there was no such split)."""

    train: Any  # datasets.Dataset
    eval: Any | None
    bad_rows: int = 0
    sources: list[str] = field(default_factory=list)
    held_out: dict[str, Any] | None = None


def _normalise(rows: list[tuple[int, Any]], shape: str, section: schema.DataSection, bad: BadRows,
               text_fields: Iterable[str], too_long: Callable[[dict], bool] | None,
               limit: int | None) -> list[tuple[int, dict]]:
    """The usable rows with their row numbers; the others go to `bad`."""
    out = []
    for number, row in rows:
        item, reason = normalise_row(row, shape, section.fields, text_fields)
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


def hold_out(count: int, section: schema.DataSection, seed: int, source: str,
             key: str = "data") -> tuple[list[int], list[int]]:
    """(train, held-out) positions among `count` usable rows for `eval_rows` or `eval_fraction`: the split datasets'
    `train_test_split(seed=seed)` makes (each in its shuffled order)."""
    from datasets import Dataset

    option = "eval_rows" if section.eval_rows else "eval_fraction"
    size = section.eval_rows or section.eval_fraction
    held = section.eval_rows or math.ceil(section.eval_fraction * count)
    if held >= count:
        raise DataError(f"`{option}: {size}` holds out {held} of the {count} usable rows, leaving none to train on",
                        file=source, key=f"{key}.{option}",
                        fix=f"lower `{option}` (or raise `max_rows`), or give held-out rows in `eval_path`")
    split = Dataset.from_dict({"i": list(range(count))}).train_test_split(test_size=size, seed=seed)
    return split["train"]["i"], split["test"]["i"]


def _held_out_record(section: schema.DataSection, seed: int, numbers: list[int], train_count: int,
                     held_count: int) -> dict:
    """What the manifest says about a hold-out: the file, the seed, how many rows trained and were held out, and
    which rows were evaluated (1-based row numbers as in bad-row reports: line numbers in a JSONL file, positions
    otherwise; fewer than held out when `max_eval_rows` cuts them)."""
    record: dict[str, Any] = {"file": section.path}
    if not looks_local(section.path):
        record["split"] = section.split
    if section.eval_fraction:
        record["eval_fraction"] = section.eval_fraction
    return {**record, "seed": seed, "train_rows": train_count, "held_out_rows": held_count,
            "eval_rows": len(numbers), "eval_row_numbers": sorted(numbers)}


def _dataset(items: list[dict], expand: bool):
    """A Dataset of the items; `expand` (sft under `train_on: all_turns`): one row per assistant turn of each."""
    from datasets import Dataset

    if expand:
        items = [row for item in items for row in assistant_turns(item)]
    return Dataset.from_list(items)


def split_held_out(train: list[tuple[int, dict]], section: schema.DataSection, seed: int, key: str = "data",
                   expand: bool = False):
    """(train dataset, eval dataset, manifest record) for the rows `eval_rows`/`eval_fraction` hold out of the
    numbered training rows, the first `max_eval_rows` of them evaluated. Unexpanded, both are selections of one
    Dataset of every row, as `Dataset.train_test_split` returns them."""
    train_at, held_at = hold_out(len(train), section, seed, section.path, key)
    eval_at = held_at[:section.max_eval_rows] if section.max_eval_rows else held_at
    record = _held_out_record(section, seed, [train[i][0] for i in eval_at], len(train_at), len(held_at))
    if expand:
        return (_dataset([train[i][1] for i in train_at], True), _dataset([train[i][1] for i in eval_at], True),
                record)
    everything = _dataset([item for _, item in train], False)
    return everything.select(train_at), everything.select(eval_at), record


def _read_normalised(path: str, split: str, shape: str, section: schema.DataSection, text_fields: Iterable[str],
                     too_long: Callable[[dict], bool] | None, limit: int | None,
                     key: str) -> tuple[list[tuple[int, dict]], int]:
    """(usable numbered rows, bad rows skipped) of one file or Hub split; bad rows stop here unless skipped."""
    bad = BadRows()
    rows = _normalise(read_rows(path, section, split, bad), shape, section, bad, text_fields, too_long, limit)
    _report(bad, path, section, key)
    return rows, bad.count


def load_data(section: schema.DataSection, shape: str, *, key: str = "data", seed: int = 0,
              text_fields: Iterable[str] = ("text",), too_long: Callable[[dict], bool] | None = None) -> LoadedData:
    """Train and (optional) eval datasets in the canonical `shape`, validated row by row. Eval rows come from
    `eval_path`/`eval_split`, or are held out of the training rows by `eval_rows`/`eval_fraction` (seeded by `seed`,
    recorded in `held_out`)."""
    if shape not in SHAPES:
        raise ValueError(shape)
    train, skipped = _read_normalised(section.path, section.split, shape, section, text_fields, too_long, None,
                                      f"{key}.path")
    if not train:
        raise DataError("no usable rows", file=section.path, key=f"{key}.path",
                        fix="check the file and the `fields:` mapping")
    evaluation: list[tuple[int, dict]] | None = None
    sources = [section.path]
    if section.eval_path or section.eval_split:
        path = section.eval_path or section.path
        evaluation, bad = _read_normalised(path, section.eval_split or section.split, shape, section, text_fields,
                                           too_long, section.max_eval_rows, f"{key}.eval_path")
        skipped += bad
        if path not in sources:
            sources.append(path)
    if section.max_rows:
        train = train[:section.max_rows]
    expand = shape == "sft" and section.train_on == "all_turns"
    if evaluation is None and (section.eval_rows or section.eval_fraction):
        train_ds, eval_ds, record = split_held_out(train, section, seed, key, expand)
        return LoadedData(train=train_ds, eval=eval_ds, bad_rows=skipped, sources=sources, held_out=record)
    eval_ds = _dataset([item for _, item in evaluation], expand) if evaluation else None
    return LoadedData(train=_dataset([item for _, item in train], expand), eval=eval_ds, bad_rows=skipped,
                      sources=sources)
