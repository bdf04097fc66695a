"""A public preference set (Anthropic HH-RLHF, `chosen`/`rejected` whole conversations) feeds every data shape
without a conversion script: `sft` trains on the last assistant turn of `chosen` (or on every one, `train_on:
all_turns`), `prompts` takes the conversation before it, `preference` splits off the shared prefix; and any file
holds rows out with `eval_rows`/`eval_fraction`, seeded and recorded in the manifest.

The real rows come from ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz beside the repo (never copied into it).

    pytest tests/test_data_hh.py            # about 10 s on CPU, the tiny sft run included
"""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_lora_chain_recipe
from pipeline import data, schema
from pipeline.errors import DataError, RecipeError

HH_FILE = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def hh_rows(n: int = 20) -> list[dict]:
    assert HH_FILE.exists(), f"{HH_FILE} missing: the real HH-RLHF data lives in ../shared beside the repo"
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in itertools.islice(handle, n)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path: Path, shape: str, seed: int = 0, **section):
    return data.load_data(schema.DataSection(path=str(path), **section), shape, seed=seed)


def key(item: dict) -> str:
    return json.dumps(item, sort_keys=True)


@pytest.fixture
def hh_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "hh.jsonl", hh_rows())


# --------------------------------------------------------------------------------------------- parse_hh, by hand


def test_parse_hh_multi_turn():
    text = "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4, since 2+2=4."
    assert data.parse_hh(text) == [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"},
                                   {"role": "user", "content": "What is 2+2?"},
                                   {"role": "assistant", "content": "4, since 2+2=4."}]


def test_parse_hh_ignores_whitespace_around_the_text_and_the_turns():
    text = "  \n \n\nHuman:   Hi. \n\nAssistant:  Line one.\nLine two.  \n\n"
    assert data.parse_hh(text) == [{"role": "user", "content": "Hi."},
                                   {"role": "assistant", "content": "Line one.\nLine two."}]
    assert data.parse_hh("Human: Hi.\n\nAssistant: Yes.") == data.parse_hh("\n\nHuman: Hi.\n\nAssistant: Yes.")


def test_parse_hh_keeps_an_empty_last_turn_empty():
    assert data.parse_hh("\n\nHuman: Hi.\n\nAssistant: ")[-1] == {"role": "assistant", "content": ""}
    assert data.parse_hh("\n\nHuman: Hi.\n\nAssistant:")[-1] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize("text", ["no turns here", "", "Preface.\n\nHuman: Hi.\n\nAssistant: Yes.",
                                  "Human said hi. Assistant said yes."])
def test_parse_hh_rejects_text_without_the_markers(text):
    assert data.parse_hh(text) is None


@pytest.mark.parametrize("shape", ["sft", "prompts"])
def test_a_string_without_markers_names_the_file_and_the_row(tmp_path, shape):
    rows = hh_rows(3)
    rows.insert(1, {"chosen": "Just an answer, no turns.", "rejected": "Another."})
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as info:
        load(path, shape)
    line = info.value.render()
    assert "\n" not in line and str(path) in line and "data.path" in line and "on_bad_rows: skip" in line
    assert "1 bad rows: 1 'chosen' is not a conversation" in line and "(rows 2)" in line
    assert len(load(path, shape, on_bad_rows="skip").train) == 3


def test_a_conversation_must_end_with_an_assistant_turn_to_train_on():
    ends_with_user = {"chosen": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                                 {"role": "user", "content": "Bye?"}]}
    assert data.normalise_row(ends_with_user, "sft", {}) == (
        None, "conversation does not end with an assistant turn")
    item, reason = data.normalise_row(ends_with_user, "prompts", {})
    assert reason is None and item["prompt"] == ends_with_user["chosen"], "a prompt may end with the user's turn"
    mapped = {"dialogue": "\n\nHuman: Hi.\n\nAssistant: Hello."}
    assert data.normalise_row(mapped, "sft", {"chosen": "dialogue"})[0]["completion"][0]["content"] == "Hello."


# --------------------------------------------------------------------------------------------- real HH rows


def test_sft_trains_on_the_last_assistant_turn_of_chosen(hh_file):
    loaded = load(hh_file, "sft")
    rows = hh_rows()
    assert len(loaded.train) == len(rows) and loaded.eval is None and loaded.held_out is None
    for item, row in zip(loaded.train, rows):
        whole = data.parse_hh(row["chosen"])
        assert item["prompt"] + item["completion"] == whole
        assert item["completion"] == whole[-1:] and item["completion"][0]["role"] == "assistant"
        assert item["prompt"][-1]["role"] == "user" and item["completion"][0]["content"]


def test_sft_reads_chosen_message_lists_like_hh_strings(tmp_path, hh_file):
    as_messages = [{"chosen": data.parse_hh(row["chosen"]), "rejected": data.parse_hh(row["rejected"])}
                   for row in hh_rows()]
    from_lists = load(write_jsonl(tmp_path / "messages.jsonl", as_messages), "sft")
    assert from_lists.train.to_list() == load(hh_file, "sft").train.to_list()


def turn_rows(conversation: list[dict]) -> list[dict]:
    """What `train_on: all_turns` should make of one conversation, written out independently of the loader."""
    return [{"prompt": conversation[:i], "completion": [m]} for i, m in enumerate(conversation)
            if m["role"] == "assistant" and i > 0 and m["content"].strip()]


def test_sft_all_turns_has_one_row_per_assistant_turn(hh_file):
    last = load(hh_file, "sft").train.to_list()
    every = load(hh_file, "sft", train_on="all_turns").train.to_list()
    expected = [row for source in hh_rows() for row in turn_rows(data.parse_hh(source["chosen"]))]
    assert every == expected and len(every) > len(last)
    assert all(row["prompt"][-1]["role"] == "user" for row in every)
    assert all(item in every for item in last), "each last turn is one of the rows"


def test_prompts_are_the_conversation_before_the_last_assistant_turn(hh_file):
    loaded = load(hh_file, "prompts")
    for item, row in zip(loaded.train, hh_rows()):
        whole = data.parse_hh(row["chosen"])
        assert item["prompt"] == whole[:-1] and item["prompt"][-1]["role"] == "user" and item["answer"] is None


def test_preference_pairs_share_the_prefix_as_prompt(hh_file):
    loaded = load(hh_file, "preference")
    assert len(loaded.train) == 20
    for item, row in zip(loaded.train, hh_rows()):
        assert item["prompt"] + item["chosen"] == data.parse_hh(row["chosen"])
        assert item["prompt"] + item["rejected"] == data.parse_hh(row["rejected"])
        assert item["prompt"][-1]["role"] == "user" and item["chosen"] != item["rejected"]


# --------------------------------------------------------------------------------------------- holding rows out


@pytest.mark.parametrize("shape", ["sft", "prompts", "preference"])
def test_eval_rows_split_is_seeded_disjoint_and_recorded(hh_file, shape):
    everything = dict(zip(range(1, 21), load(hh_file, shape).train.to_list()))
    first, again, other = (load(hh_file, shape, seed=seed, eval_rows=4) for seed in (0, 0, 1))
    assert first.train.to_list() == again.train.to_list() and first.eval.to_list() == again.eval.to_list()
    assert first.held_out == again.held_out and first.held_out != other.held_out
    record = first.held_out
    assert (record["file"], record["seed"], record["held_out_rows"]) == (str(hh_file), 0, 4)
    assert (record["train_rows"], record["eval_rows"]) == (16, 4)
    numbers = record["held_out_row_numbers"]
    assert len(set(numbers)) == 4 and set(numbers) <= set(everything)
    assert first.eval.to_list() == [everything[n] for n in sorted(numbers)], "held-out rows, in file order"
    assert first.train.to_list() == [everything[n] for n in everything if n not in numbers], "the rest, in order"


def test_every_shape_holds_out_the_same_rows_whatever_it_drops(tmp_path):
    """The rows are drawn before any is checked: a row one shape drops (an empty last answer is no sft example, yet
    a fine prompt) does not shift which rows another shape holds out."""
    rows = hh_rows()
    for row in (rows[1], rows[8], rows[14]):
        row["chosen"] += "\n\nHuman: More?\n\nAssistant: "
    path = write_jsonl(tmp_path / "some-empty.jsonl", rows)
    sft = load(path, "sft", seed=5, eval_rows=6, on_bad_rows="skip")
    prompts = load(path, "prompts", seed=5, eval_rows=6)
    assert sft.held_out["held_out_row_numbers"] == prompts.held_out["held_out_row_numbers"]
    assert sft.bad_rows == 3 and prompts.bad_rows == 0
    assert sft.held_out["train_rows"] + sft.held_out["eval_rows"] == 17
    assert prompts.held_out["train_rows"] + prompts.held_out["eval_rows"] == 20


def test_all_turns_holds_out_whole_conversations(hh_file):
    loaded = load(hh_file, "sft", seed=3, eval_rows=5, train_on="all_turns")
    numbers = loaded.held_out["held_out_row_numbers"]
    turns = {n: turn_rows(data.parse_hh(row["chosen"])) for n, row in enumerate(hh_rows(), 1)}
    assert loaded.held_out["eval_rows"] == 5 and len(loaded.eval) > 5
    assert loaded.eval.to_list() == [row for n in sorted(numbers) for row in turns[n]]
    assert loaded.train.to_list() == [row for n in turns if n not in numbers for row in turns[n]]


def test_eval_fraction_is_the_same_split_and_max_rows_cut_each_side(hh_file):
    fraction = load(hh_file, "sft", seed=2, eval_fraction=0.2)
    rows = load(hh_file, "sft", seed=2, eval_rows=4)
    assert fraction.eval.to_list() == rows.eval.to_list() and fraction.train.to_list() == rows.train.to_list()
    assert fraction.held_out == {**rows.held_out, "eval_fraction": 0.2}
    cut = load(hh_file, "sft", seed=2, eval_rows=4, max_eval_rows=3, max_rows=10)
    assert cut.eval.to_list() == rows.eval.to_list()[:3] and cut.train.to_list() == rows.train.to_list()[:10]
    assert cut.held_out["held_out_row_numbers"] == rows.held_out["held_out_row_numbers"]
    assert (cut.held_out["held_out_rows"], cut.held_out["train_rows"], cut.held_out["eval_rows"]) == (4, 10, 3)


def test_eval_rows_must_leave_rows_to_train_on(hh_file):
    with pytest.raises(DataError) as info:
        load(hh_file, "sft", eval_rows=20)
    line = info.value.render()
    assert str(hh_file) in line and "data.eval_rows" in line and "holds out 20 of the 20 rows" in line
    assert "fix: lower `eval_rows`" in line and "\n" not in line
    with pytest.raises(DataError, match="eval_fraction: 0.99` holds out 20 of the 20 rows"):
        load(hh_file, "sft", eval_fraction=0.99)


def test_each_side_of_a_hold_out_needs_a_usable_row(tmp_path):
    rows = hh_rows(6)
    held = load(write_jsonl(tmp_path / "ok.jsonl", rows), "sft", seed=0, eval_rows=1).held_out["held_out_row_numbers"]
    rows[held[0] - 1] = {"chosen": "no turns", "rejected": "none"}
    with pytest.raises(DataError, match=r"eval_rows: none of the 1 held-out rows is usable \(fix: raise `eval_rows`"):
        load(write_jsonl(tmp_path / "bad.jsonl", rows), "sft", seed=0, eval_rows=1, on_bad_rows="skip")
    rows = [{"chosen": "no turns", "rejected": "none"} if number not in held else row
            for number, row in enumerate(hh_rows(6), 1)]
    with pytest.raises(DataError, match=r"eval_rows: none of the rows left to train on is usable \(fix: lower"):
        load(write_jsonl(tmp_path / "bad.jsonl", rows), "sft", seed=0, eval_rows=1, on_bad_rows="skip")


def test_unpaired_kto_rows_hold_out_the_same_rows(tmp_path):
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2 == 0} for i in range(1, 11)]
    section = schema.DataSection(path=str(write_jsonl(tmp_path / "kto.jsonl", rows)), eval_rows=3)
    loaded = data.load_data(section, "kto", seed=0)
    numbers = loaded.held_out["held_out_row_numbers"]
    assert (len(loaded.train), len(loaded.eval), loaded.held_out["eval_rows"]) == (7, 3, 3)
    assert [row["prompt"][0]["content"] for row in loaded.eval] == [f"Q{n}" for n in numbers]
    assert numbers == load(section.path, "prompts", eval_rows=3).held_out["held_out_row_numbers"]


# --------------------------------------------------------------------------------------------- recipes


def sft_recipe(tmp_path: Path, data_section: dict, **stage) -> Path:
    spec = tiny_lora_chain_recipe(tmp_path / "out", "hh")
    spec["stages"]["sft"] = {**spec["stages"]["sft"], "data": data_section, **stage}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("extra, expected", [
    ({"eval_path": "EVAL", "eval_rows": 4}, "`eval_path` already gives the held-out rows: drop `eval_rows`"),
    ({"eval_split": "test", "eval_fraction": 0.1}, "`eval_split` already gives the held-out rows"),
    ({"eval_fraction": 0.1, "eval_rows": 4}, "set `eval_rows` or `eval_fraction`, not both"),
])
def test_one_way_to_give_held_out_rows(tmp_path, hh_file, extra, expected):
    from pipeline.recipe import load_recipe

    extra = {k: str(hh_file) if v == "EVAL" else v for k, v in extra.items()}
    path = sft_recipe(tmp_path, {"path": str(hh_file), **extra})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    line = info.value.render()
    assert "\n" not in line and str(path) in line and expected in line and "stages.sft.data.eval_" in line


def test_train_on_is_an_sft_option(tmp_path, hh_file):
    from pipeline.recipe import load_recipe

    spec = tiny_lora_chain_recipe(tmp_path / "out", "hh")
    spec["stages"]["base"]["data"]["train_on"] = "all_turns"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(RecipeError, match=r"stages\.base: `data\.train_on: all_turns` applies to sft stages only"):
        load_recipe(path)


def test_preflight_accepts_hh_files_for_sft_and_prompts_but_not_prompt_chosen_pairs(tmp_path, hh_file):
    from pipeline import preflight
    from pipeline.errors import PipelineError
    from pipeline.recipe import load_recipe

    preflight.check(load_recipe(sft_recipe(tmp_path, {"path": str(hh_file)})))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"}])
    with pytest.raises(PipelineError, match=r"needs 'messages' or 'prompt'\+'completion' or 'chosen' \(without "
                                            r"'prompt'\)"):
        preflight.check(load_recipe(sft_recipe(tmp_path, {"path": str(pairs)})))


def test_sft_stage_on_hh_rows_records_the_held_out_rows(tmp_path):
    """A tiny LoRA sft run (2 steps) on 16 real HH rows with `eval_rows: 4`: the manifest says which rows were held
    out, with which seed, and the stage measured its loss on them."""
    from pipeline import preflight, runner
    from pipeline.recipe import load_recipe

    short = [row for row in hh_rows(40) if len(row["chosen"].encode()) < 800][:16]  # fits max_length at vocab 300
    assert len(short) == 16
    hh = write_jsonl(tmp_path / "hh16.jsonl", short)
    spec = tiny_lora_chain_recipe(tmp_path / "out", "hh-sft", seed=7)
    spec["stages"]["base"]["model"]["config"]["max_position_embeddings"] = 1024
    spec["stages"]["sft"].update(data={"path": str(hh), "eval_rows": 4}, train={"max_length": 1024})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    recipe = load_recipe(path)
    preflight.check(recipe)
    runner.run_recipe(recipe, report=False)
    manifest = json.loads((tmp_path / "out" / "sft" / "manifest.json").read_text())
    held = manifest["held_out"]
    expected = load(hh, "sft", seed=manifest["seed"], eval_rows=4).held_out
    assert held == expected and held["seed"] == manifest["seed"] == 7
    assert (held["file"], held["train_rows"], held["eval_rows"]) == (str(hh), 12, 4)
    assert held["held_out_rows"] == 4 and set(held["held_out_row_numbers"]) <= set(range(1, 17))
    assert manifest["metrics"]["train_rows"] == 12 and manifest["datasets"] == [str(hh)]
    before, after = manifest["metrics"]["eval_loss_before"], manifest["metrics"]["eval_loss_after"]
    assert before == before and after == after and after != before  # measured (not NaN) on the held-out rows
    assert "held_out" not in json.loads((tmp_path / "out" / "base" / "manifest.json").read_text())
