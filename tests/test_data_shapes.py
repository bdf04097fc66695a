"""Every data format a stage reads (`pipeline.data.FORMATS`): each fixture in tests/data_shapes/ (a handful of
hand-written rows on the addition task) is detected from its columns, converted to the canonical rows, named under
the stage's header (`  data: alpaca`) and in the manifest (`data_format`), through `pipeline validate --deep` and
`pipeline run` on a tiny model; a file whose columns fit no format is one line (exit 2, nothing written), before
training and when the rows are read; `data.format` names the format instead of detection.

    pytest tests/test_data_shapes.py     # the format checks in a second; one tiny chain with a stage per format
"""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_lora_chain_recipe
from pipeline import data, names, schema
from pipeline.__main__ import main
from pipeline.errors import DataError

SHAPES = Path(__file__).resolve().parent / "data_shapes"


def load(path: Path, shape: str, **section):
    return data.load_data(schema.DataSection(path=str(path), **section), shape)


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHAPES / name).read_text().splitlines()]


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You add numbers."}


# ------------------------------------------------------------------------------------------- the formats, by hand


def test_every_format_has_a_name_the_schema_accepts_and_a_row_in_the_docs_table():
    found = {fmt.name for formats in data.FORMATS.values() for fmt in formats}
    assert found == set(names.DATA_FORMATS)
    table = (ROOT / "docs" / "recipes.md").read_text()
    assert all(f"| `{name}` |" in table for name in names.DATA_FORMATS)
    assert set(data.FORMATS) == set(data.SHAPES)
    with pytest.raises(ValueError, match="unknown data format 'alpacca': choose from text, messages"):
        schema.DataSection(path="x.jsonl", format="alpacca")


def test_the_quickstart_files_keep_their_native_formats():
    expected = {"sft.jsonl": ("sft", "messages"), "preferences.jsonl": ("preference", "preference"),
                "prompts.jsonl": ("prompts", "prompt-answer"), "corpus.jsonl": ("text", "text")}
    for name, (shape, fmt) in expected.items():
        assert load(ROOT / "data" / name, shape, max_rows=4).format == fmt
    assert load(ROOT / "data" / "preferences.jsonl", "kto", max_rows=4).format == "preference"


def test_alpaca_instruction_then_input_with_the_system_first():
    sft = load(SHAPES / "alpaca.jsonl", "sft")
    assert sft.format == "alpaca" and len(sft.train) == 8
    assert sft.train[0] == {"prompt": [user("What is 3 + 4?")], "completion": [assistant("So 3 + 4 = 7")]}
    assert sft.train[1]["prompt"] == [user("Please add the two numbers.\n2 and 5")]
    assert sft.train[2]["prompt"] == [SYSTEM, user("Compute 6 + 1.")]
    prompts = load(SHAPES / "alpaca.jsonl", "prompts")
    assert prompts.format == "alpaca" and prompts.train[2] == {"prompt": [SYSTEM, user("Compute 6 + 1.")],
                                                               "answer": None}


def test_sharegpt_turns_in_every_spelling():
    sft = load(SHAPES / "sharegpt.jsonl", "sft")
    assert sft.format == "sharegpt" and len(sft.train) == 8
    assert sft.train[0] == {"prompt": [user("What is 3 + 4?")], "completion": [assistant("So 3 + 4 = 7")]}
    assert sft.train[1]["prompt"] == [SYSTEM, user("Tell me 2 + 5.")]  # a system turn
    assert sft.train[2]["prompt"] == [user("What is 1 + 1?"), assistant("So 1 + 1 = 2"), user("And 6 + 1?")]
    assert sft.train[3]["prompt"] == [user("Please add 8 and 3.")]  # user/assistant spellings
    assert sft.train[4]["completion"] == [assistant("So 9 + 4 = 13")]  # role/content keys
    assert sft.train[5]["prompt"] == [SYSTEM, user("What is 5 plus 5?")]  # a `system` column
    prompts = load(SHAPES / "sharegpt.jsonl", "prompts")
    assert prompts.format == "sharegpt" and prompts.train[2]["prompt"] == sft.train[2]["prompt"]
    item, reason = data.normalise_row({"conversations": [{"from": "robot", "value": "hi"}]}, "sft", {}, fmt="sharegpt")
    assert item is None and "wrong type in 'conversations'" in reason


def test_openai_messages_with_system_and_tool_roles():
    sft = load(SHAPES / "messages_tools.jsonl", "sft")
    assert sft.format == "messages" and len(sft.train) == 6
    call = "<tool_call>\n" + json.dumps({"name": "add", "arguments": {"a": 2, "b": 5}}) + "\n</tool_call>"
    assert sft.train[1] == {"prompt": [user("Tell me 2 + 5."), assistant(call), {"role": "tool", "content": "7"}],
                            "completion": [assistant("So 2 + 5 = 7")]}
    assert sft.train[0]["prompt"] == [SYSTEM, user("What is 3 + 4?")]
    assert sft.train[3]["prompt"] == [user("What is 8 + 3?")]  # content parts
    plain = rows("messages_tools.jsonl")[0]
    assert data.normalise_row(plain, "sft", {}, fmt="messages") == data.normalise_row(plain, "sft", {})


def test_ultrafeedback_pairs_do_not_repeat_the_prompt():
    pairs = load(SHAPES / "ultrafeedback.jsonl", "preference")
    assert pairs.format == "ultrafeedback" and len(pairs.train) == 8
    assert pairs.train[0] == {"prompt": [user("What is 3 + 4?")], "chosen": [assistant("So 3 + 4 = 7")],
                              "rejected": [assistant("So 3 + 4 = 8")]}
    assert load(SHAPES / "ultrafeedback.jsonl", "sft").format == "messages"  # its `messages` column, for sft


def test_sharegpt_preference_pairs():
    pairs = load(SHAPES / "sharegpt_preference.jsonl", "preference")
    assert pairs.format == "sharegpt-preference" and len(pairs.train) == 8
    assert pairs.train[0] == {"prompt": [user("What is 3 + 4?")], "chosen": [assistant("So 3 + 4 = 7")],
                              "rejected": [assistant("So 3 + 4 = 8")]}
    assert pairs.train[2]["prompt"] == [SYSTEM, user("Compute 6 + 1.")]
    assert pairs.train[3]["prompt"] == [user("What is 1 + 1?"), assistant("So 1 + 1 = 2"), user("And 8 + 3?")]


def test_kto_reads_unpaired_rows_and_pairs():
    unpaired = load(SHAPES / "kto_unpaired.jsonl", "kto", eval_rows=4)
    assert unpaired.format == "kto-unpaired" and (len(unpaired.train), len(unpaired.eval)) == (8, 4)
    assert set(unpaired.train.column_names) == {"prompt", "completion", "label"}
    for row in list(unpaired.train) + list(unpaired.eval):  # labels stay with their own completions
        a, b, c = map(int, re.findall(r"\d+", row["completion"][0]["content"]))
        assert row["label"] == (a + b == c)
    for name, fmt in (("ultrafeedback.jsonl", "ultrafeedback"), ("sharegpt_preference.jsonl", "sharegpt-preference")):
        pairs = load(SHAPES / name, "kto")
        assert pairs.format == fmt and set(pairs.train.column_names) == {"prompt", "chosen", "rejected"}


# ------------------------------------------------------------------------------- no format fits; naming the format


def test_columns_no_format_fits_are_one_line_when_the_rows_are_read(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 3 + 4?", "reply": "7"}])
    for shape, formats in (("sft", ("messages", "prompt-completion", "hh-rlhf", "alpaca", "sharegpt")),
                           ("kto", ("kto-unpaired", "ultrafeedback", "sharegpt-preference", "preference", "hh-rlhf"))):
        with pytest.raises(DataError) as info:
            load(path, shape)
        line = info.value.render()
        assert "\n" not in line and line.startswith(f"{path}: data.fields: has columns ['question', 'reply']")
        assert all(name in line for name in formats), line
    assert "needs 'label' or 'chosen'+'rejected'" in line


def test_data_format_names_the_format_instead_of_detection(tmp_path):
    """ShareGPT turns under a `messages` column: detected as OpenAI messages (their rows are then bad rows), read as
    ShareGPT when `data.format` says so."""
    items = [{"messages": row["conversations"]} for row in rows("sharegpt.jsonl")[:4]]
    path = write_jsonl(tmp_path / "sharegpt_messages.jsonl", items)
    with pytest.raises(DataError, match="wrong type in 'messages'"):
        load(path, "sft")
    named = load(path, "sft", format="sharegpt", fields={"conversations": "messages"})
    assert named.format == "sharegpt" and named.train[0]["completion"] == [assistant("So 3 + 4 = 7")]
    with pytest.raises(DataError, match=r"data.format: has columns \['messages'\], format 'alpaca' needs "
                                        r"'instruction'\+'output'"):
        load(path, "sft", format="alpaca")
    with pytest.raises(DataError, match="format 'alpaca' is not one a stage reading preference rows reads"):
        load(path, "preference", format="alpaca")


# ----------------------------------------------------------------------------------- through the CLI, tiny model


def tiny_stage(kind: str, fixture: str | Path, **extra) -> dict:
    stage = {"kind": kind, "model": "${base}", "data": {"path": str(fixture)}}
    return {**stage, **extra, "data": {**stage["data"], **extra.get("data", {})}}


ONLINE = {"rewards": [{"type": "length_penalty", "target_length": 4}], "num_generations": 2, "max_new_tokens": 4,
          "train": {"max_steps": 1}}
# stage -> (kind, fixture, extra stage keys, expected data_format, the row-count metric, its value)
CASES = {
    "sft": (None, None, {}, "messages", "train_rows", 40),  # the chain's own sft on data/sft.jsonl
    "sft_alpaca": ("sft", "alpaca.jsonl", {"data": {"eval_rows": 2}}, "alpaca", "train_rows", 6),
    "sft_sharegpt": ("sft", "sharegpt.jsonl", {}, "sharegpt", "train_rows", 8),
    "sft_messages": ("sft", "messages_tools.jsonl", {}, "messages", "train_rows", 6),
    "sft_named": ("sft", "NAMED", {"data": {"format": "sharegpt", "fields": {"conversations": "messages"}}},
                  "sharegpt", "train_rows", 8),
    "reward_ultrafeedback": ("reward", "ultrafeedback.jsonl", {"data": {"eval_rows": 2}}, "ultrafeedback",
                             "train_pairs", 6),
    "dpo_sharegpt": ("dpo", "sharegpt_preference.jsonl", {}, "sharegpt-preference", "train_pairs", 8),
    "kto_unpaired": ("kto", "kto_unpaired.jsonl", {"data": {"eval_rows": 4}}, "kto-unpaired", "train_rows", 8),
    "kto_pairs": ("kto", "ultrafeedback.jsonl", {}, "ultrafeedback", "train_rows", 16),  # each pair -> two rows
    "grpo_alpaca": ("grpo", "alpaca.jsonl", ONLINE, "alpaca", "train_prompts", 8),
    "rloo_sharegpt": ("rloo", "sharegpt.jsonl", ONLINE, "sharegpt", "train_prompts", 8),
}


def shapes_recipe(tmp: Path) -> Path:
    """The tiny LoRA chain (2 steps a stage) with a stage per format; positions and max_length fit the tool rows."""
    spec = tiny_lora_chain_recipe(tmp / "out", "data-shapes")
    spec["defaults"]["train"]["max_length"] = 160
    spec["stages"]["base"]["model"]["config"]["max_position_embeddings"] = 192
    named = write_jsonl(tmp / "sharegpt_messages.jsonl", [{"messages": r["conversations"]}
                                                         for r in rows("sharegpt.jsonl")])
    for name, (kind, fixture, extra, *_) in CASES.items():
        if kind is not None:
            spec["stages"][name] = tiny_stage(kind, named if fixture == "NAMED" else SHAPES / fixture, **extra)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    recipe = shapes_recipe(tmp)
    code, out, err = cli("validate", "--deep", str(recipe))
    assert code == 0 and "ok (" in out, err
    code, out, err = cli("run", str(recipe))
    assert code == 0, err[-3000:]
    return tmp / "out", out


@pytest.mark.parametrize("stage", list(CASES))
def test_each_format_trains_through_the_cli_and_is_named(shapes_run, stage):
    out, console = shapes_run
    _, _, _, fmt, metric, count = CASES[stage]
    manifest = json.loads((out / stage / "manifest.json").read_text())
    assert manifest["data_format"] == fmt and manifest["metrics"][metric] == count, manifest["metrics"]
    lines = console.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(rf"\[\d+/\d+\] {stage} \(\w+\): running", line))
    assert lines[header + 1] == f"  data: {fmt}", lines[header:header + 3]


def test_the_tokenizer_and_pretrain_stages_say_nothing_of_text(shapes_run):
    out, console = shapes_run
    assert "  data: text" not in console
    assert json.loads((out / "base" / "manifest.json").read_text())["data_format"] == "text"


def _bad_recipe(tmp_path: Path, data_section: dict, kind: str = "sft") -> Path:
    spec = tiny_lora_chain_recipe(tmp_path / "out", "bad-shape")
    spec["stages"]["sft"] = {**spec["stages"]["sft"], "kind": kind, "data": data_section}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_columns_no_format_fits_are_one_line_before_anything_trains(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 3 + 4?", "reply": "7"}])
    recipe = _bad_recipe(tmp_path, {"path": str(path)})
    for command in (("validate", "--deep"), ("run",)):
        code, _, err = cli(*command, str(recipe))
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "stages.sft.data.fields" in err and f"{path} has columns ['question', 'reply']" in err
        assert "(formats: messages, prompt-completion, hh-rlhf, alpaca, sharegpt)" in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_named_format_is_checked_before_anything_trains(tmp_path):
    alpaca = str(SHAPES / "alpaca.jsonl")
    code, _, err = cli("validate", "--deep", str(_bad_recipe(tmp_path, {"path": alpaca, "format": "sharegpt"})))
    assert code == 2 and "stages.sft.data.format" in err and "format 'sharegpt' needs 'conversations'" in err, err
    code, _, err = cli("validate", "--deep", str(_bad_recipe(tmp_path, {"path": alpaca, "format": "alpaca"},
                                                             kind="reward")))
    assert code == 2 and "format 'alpaca' is not one a reward stage reads (ultrafeedback, " in err, err
    code, _, err = cli("validate", "--deep", str(_bad_recipe(tmp_path, {"path": alpaca, "format": "alpaca"})))
    assert code == 0, err
