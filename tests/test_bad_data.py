"""Bad rows in a stage's data (empty, missing field, wrong type, non-UTF-8, invalid JSON, over-long) are reported with
their counts and row numbers; `on_bad_rows: error` (default) stops with one line, `skip` trains on the rest.

Run: `pytest tests/test_bad_data.py` (in-process loader checks, a second; the CLI run of an sft stage in skip
mode is marked slow: `pytest -m slow tests/test_bad_data.py`).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import data, schema
from pipeline.errors import DataError
from resilience_common import ROOT, cli, tiny_recipe, write_recipe

GOOD = {"messages": [{"role": "user", "content": "Add 1 and 2."}, {"role": "assistant", "content": "1 + 2 = 3"}]}


def _jsonl(tmp: Path, rows: list, name: str = "rows.jsonl") -> Path:
    path = tmp / name
    path.write_bytes(b"\n".join(r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows) + b"\n")
    return path


def _load(path: Path, shape: str, mode: str = "error", **kwargs):
    return data.load_data(schema.DataSection(path=str(path), on_bad_rows=mode), shape, **kwargs)


CASES = {
    "empty": ({"text": "   "}, "text", "1 empty (rows 2)"),
    "missing field": ({"body": "hello"}, "text", "1 missing field 'text' (rows 2)"),
    "wrong type": ({"text": 42}, "text", "1 wrong type in 'text' (rows 2)"),
    "non-UTF-8": (b'{"text": "caf\xe9"}', "text", "1 non-UTF-8 (rows 2)"),
    "invalid JSON": (b'{"text": "unclosed', "text", "1 invalid JSON (rows 2)"),
    "sft wrong type": ({"prompt": ["not", "messages"], "completion": 3}, "sft",
                       "1 wrong type in 'prompt'/'completion'"),
    "sft missing": ({"question": "x", "answer": "y"}, "sft", "1 missing field 'messages' or 'prompt'/'completion'"),
    "preference missing": ({"prompt": "x", "chosen": "y"}, "preference", "1 missing field 'chosen'/'rejected'"),
}
GOOD_OF = {"text": {"text": "one plus two is three."}, "sft": GOOD,
           "preference": {"prompt": "Add 1 and 2.", "chosen": "3", "rejected": "4"}}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_is_reported_with_row_number(tmp_path, case):
    bad, shape, expected = CASES[case]
    good = GOOD_OF[shape]
    path = _jsonl(tmp_path, [good, bad, good])
    with pytest.raises(DataError) as info:
        _load(path, shape)
    line = info.value.render()
    assert expected in line and str(path) in line and "on_bad_rows: skip" in line
    assert "\n" not in line
    loaded = _load(path, shape, "skip")
    assert len(loaded.train) == 2 and loaded.bad_rows == 1


def test_counts_and_row_numbers_for_many_bad_rows(tmp_path):
    rows = [GOOD_OF["text"]] * 3 + [{"text": ""}] * 7 + [{"text": 1}, GOOD_OF["text"]]
    with pytest.raises(DataError, match=r"8 bad rows: 7 empty \(rows 4, 5, 6, 7, 8, \.\.\.\); 1 wrong type in 'text' "
                                        r"\(rows 11\)"):
        _load(_jsonl(tmp_path, rows), "text")


def test_empty_file_has_no_usable_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no usable rows"):
        _load(path, "text")


def test_csv_wrong_type(tmp_path):
    """A numeric CSV column is read as integers: a text field of numbers is a wrong type on every row."""
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\nAdd 1 and 2.,3\nAdd 2 and 2.,4\n")
    with pytest.raises(DataError, match=r"2 bad rows: 2 wrong type in 'prompt'/'completion' \(rows 1, 2\)"):
        _load(path, "sft")


class _Chars:
    """A stand-in tokenizer: one token per character, with a trivial chat template."""

    chat_template = "x"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(m["content"] for m in messages) + ("> " if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text)}


def test_over_long_rows(tmp_path):
    long = {"messages": [{"role": "user", "content": "x" * 50}, {"role": "assistant", "content": "y"}]}
    path = _jsonl(tmp_path, [GOOD, long, GOOD, long])
    too_long = data.too_long_for(_Chars(), 30)
    with pytest.raises(DataError, match=r"2 over-long \(rows 2, 4\)"):
        _load(path, "sft", too_long=too_long)
    assert len(_load(path, "sft", "skip", too_long=too_long).train) == 2
    assert data.too_long_for(None, 30) is None


def test_over_long_prompts_count_the_generation_prompt(tmp_path):
    """PPO samples from the prompt with the generation prompt: that is what must fit max_length - max_new_tokens."""
    rows = [{"prompt": "x" * 28}, {"prompt": "x" * 29}, {"prompt": "x" * 10}]
    path = _jsonl(tmp_path, rows)
    too_long = data.too_long_for(_Chars(), 30)  # 28 + "> " fits, 29 + "> " does not
    with pytest.raises(DataError, match=r"1 over-long \(rows 2\)"):
        _load(path, "prompts", too_long=too_long)
    assert len(_load(path, "prompts", "skip", too_long=too_long).train) == 2


def test_ppo_needs_room_for_a_prompt():
    from pydantic import ValidationError

    from pipeline.schema import PpoStage

    stage = {"kind": "ppo", "model": "m", "reward_model": "r", "data": {"path": "d.jsonl"}, "max_new_tokens": 64}
    PpoStage.model_validate({**stage, "train": {"max_length": 65}})
    with pytest.raises(ValidationError, match=r"max_new_tokens \(64\) leaves no room for a prompt"):
        PpoStage.model_validate({**stage, "train": {"max_length": 64}})


@pytest.mark.slow
def test_skip_mode_trains_on_the_rest(tmp_path):
    """An sft stage with bad and over-long rows and `on_bad_rows: skip` trains on the good rows only."""
    good = [json.loads(line) for line in (ROOT / "data/sft.jsonl").read_text().splitlines()[:40]]
    long = {"messages": [{"role": "user", "content": "Add 1 and 2. " * 20}, {"role": "assistant", "content": "3"}]}
    rows = good[:20] + [{"messages": "oops"}, b"\xff\xfe", long, {"text": ""}] + good[20:]
    recipe = tiny_recipe(tmp_path, steps=2, save_steps=2)
    recipe["stages"]["sft"]["data"] = {"path": str(_jsonl(tmp_path, rows)), "on_bad_rows": "skip"}
    path = write_recipe(tmp_path, recipe)
    result = cli("run", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((tmp_path / "out/sft/manifest.json").read_text())
    assert manifest["metrics"]["train_rows"] == 40

    recipe["stages"]["sft"]["data"]["on_bad_rows"] = "error"
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("run", str(tmp_path / "strict.yaml"))
    assert result.returncode == 2
    errors = [line[line.index("error: "):] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1 and "4 bad rows" in errors[0] and "1 over-long (rows 23)" in errors[0], errors
