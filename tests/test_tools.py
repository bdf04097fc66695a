"""The tool environment: the calculator tool and its safety, the `chatml-tools` chat template (renders like ChatML
without tools, prefix-preserving, its tool calls parsed back by TRL), a stage's `chat_template:` checked with one-line
errors, an sft warm-up on tool transcripts (tool results out of the loss) and grpo with `tools:` running TRL's
multi-turn tool loop on a tiny model.

Run: `.venv/bin/python -m pytest tests/test_tools.py` (about a minute on 2 cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline import chat_templates, tasks
from pipeline.__main__ import main
from pipeline.rl import tools

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 12 * 3?"}]
CALL = {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 3"}}}]}
RESULT = {"role": "tool", "name": "calculator", "content": "36"}
ANSWER = {"role": "assistant", "content": "<answer>36</answer>"}


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.stages.tokenizer import build

    texts = [chat_templates.tool_call_text("calculator", {"expression": "12 * 3"}), "What is the answer? 36"] * 20
    return build(texts, 300, 1, "chatml-tools", 512)


# ----------------------------------------------------------------------------------------------- the calculator


@pytest.mark.parametrize("expression, value", [("2 + 3", "5"), ("(12 + 7) * 3", "57"), ("7 / 2", "3.5"),
                                               ("8 / 2", "4"), ("-4 - 5", "-9"), ("17 // 5 + 17 % 5", "5"),
                                               (" 1.5 * 2 ", "3")])
def test_calculator_evaluates_arithmetic(expression, value):
    assert tools.calculator(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "open('/etc/passwd')", "x + 1",
                                        "(1).__class__", "2 ** 10", "[1, 2]", "'a' * 3", "1 / 0",
                                        "999999999999999 * 999999999999999 * 999999999999999", "1 +" * 100 + "1",
                                        "lambda: 1", "1; 2"])
def test_calculator_refuses_everything_but_arithmetic(expression):
    with pytest.raises(ValueError):
        tools.calculator(expression)


def test_a_failing_or_unknown_call_is_its_result_not_a_crash():
    assert tools.call("calculator", {"expression": "6 * 7"}, ["calculator"]) == "42"
    assert "error" in tools.call("calculator", {"expression": "import os"}, ["calculator"])
    assert "error" in tools.call("calculator", {"wrong": "1"}, ["calculator"])  # bad arguments
    assert tools.call("shell", {"cmd": "rm -rf /"}, ["calculator"]) == str({"error": "Tool shell not found."})


def test_tool_calls_are_parsed_from_text_and_malformed_ones_ignored():
    text = ("Let me compute. " + chat_templates.tool_call_text("calculator", {"expression": "1 + 2"})
            + "<tool_call>\n{not json}\n</tool_call><tool_call>{\"name\": 3}</tool_call>")
    assert tools.parse_calls(text) == [("calculator", {"expression": "1 + 2"})]


def test_the_schema_shown_to_the_model_comes_from_the_docstring():
    (schema,) = tools.schemas(["calculator"])
    function = schema["function"]
    assert function["name"] == "calculator" and function["parameters"]["required"] == ["expression"]
    assert "arithmetic" in function["description"]


# -------------------------------------------------------------------------------------------- the chat template


def test_chatml_tools_renders_plain_conversations_exactly_as_chatml(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, *QUESTION, ANSWER]
    for messages, prompt in ((conversation, False), (conversation[:2], True)):
        assert (tokenizer.apply_chat_template(messages, chat_template=chat_templates.CHATML_TOOLS, tokenize=False,
                                              add_generation_prompt=prompt)
                == tokenizer.apply_chat_template(messages, chat_template=chat_templates.CHATML, tokenize=False,
                                                 add_generation_prompt=prompt))


def test_chatml_tools_shows_tools_and_renders_calls_as_flattened_data_reads_them(tokenizer):
    schemas = tools.schemas(["calculator"])
    text = tokenizer.apply_chat_template([*QUESTION, CALL, RESULT, ANSWER], tools=schemas, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou can call these tools.") and '"name": "calculator"' in text
    flattened = chat_templates.tool_call_text("calculator", {"expression": "12 * 3"})
    assert f"<|im_start|>assistant\n{flattened}<|im_end|>\n" in text  # what pipeline.data writes for a call
    assert "<|im_start|>user\n<tool_response>\n36\n</tool_response><|im_end|>\n" in text


def test_trl_accepts_the_template_and_parses_its_tool_calls_back(tokenizer):
    from trl.chat_template_utils import is_chat_template_prefix_preserving, parse_response

    chat_templates.apply(tokenizer, "chatml-tools", "stages.s.chat_template", tools=True)
    assert is_chat_template_prefix_preserving(tokenizer)  # TRL's multi-turn loop requires it
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template([*QUESTION, CALL], tokenize=True, return_dict=False)
    assert full[:len(prompt)] == prompt
    completion = full[len(prompt):full.index(tokenizer.eos_token_id, len(prompt)) + 1]
    parsed = parse_response(tokenizer, completion, prefix=prompt, tools=[tools.calculator])
    assert parsed["tool_calls"] == CALL["tool_calls"]
    said = tokenizer.apply_chat_template([*QUESTION, ANSWER], tokenize=True, return_dict=False)[len(prompt):-1]
    assert parse_response(tokenizer, said, prefix=prompt)["content"] == "<answer>36</answer>"


def test_a_template_that_cannot_show_tools_is_refused_in_one_line(tokenizer):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="leaves out tool schemas") as error:
        chat_templates.apply(tokenizer, "chatml", "stages.grpo.chat_template", tools=True)
    assert "stages.grpo.chat_template" in str(error.value) and "chatml-tools" in str(error.value)
    with pytest.raises(PipelineError, match="does not render"):
        chat_templates.apply(tokenizer, "{% for m in messages %}{{ m.content }", "stages.s.chat_template")
    with pytest.raises(PipelineError, match="no chat template file"):
        chat_templates.apply(tokenizer, "missing.jinja", "stages.s.chat_template")


def write_recipe(path: Path, stages: dict, out: Path) -> Path:
    path.write_text(yaml.safe_dump({"name": "tools", "output_dir": str(out), "stages": stages}, sort_keys=False))
    return path


def test_recipe_errors_for_templates_and_tools_name_the_key(tmp_path, capsys):
    data = {"path": str(ROOT / "data" / "prompts.jsonl")}
    grpo = {"kind": "grpo", "model": "m", "rewards": [{"type": "exact_match"}], "data": data}
    cases = [({**grpo, "chat_template": "chatml-tool"}, "stages.grpo.chat_template"),
             ({**grpo, "tools": ["shell"]}, "stages.grpo.tools"),
             ({**grpo, "tools": ["calculator"], "rollout": {"engine": "vllm"}}, "stages.grpo")]
    for stage, key in cases:
        recipe = write_recipe(tmp_path / "r.yaml", {"grpo": stage}, tmp_path / "out")
        assert main(["validate", str(recipe)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- warm-up and tool-using RL


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tool-data")
    assert tasks.main(["--out", str(folder), "--tasks", "arith", "--format", "tools", "--n", "16", "--eval-n", "4",
                       "--sft", "32", "--seed", "0"]) == 0
    return folder


def test_warm_up_rows_keep_tool_results_out_of_the_loss(tool_data):
    from pipeline import schema
    from pipeline.data import load_data

    section = schema.DataSection(path=str(tool_data / "sft.jsonl"), train_on="all_turns")
    loaded = load_data(section, "sft", key="stages.sft.data")
    assert len(loaded.train) == 2 * 32  # one row per assistant turn: the call, then the answer
    for row in loaded.train:
        assert [m["role"] for m in row["completion"]] == ["assistant"]
    calls = [row for row in loaded.train if row["completion"][0]["content"].startswith("<tool_call>")]
    answers = [row for row in loaded.train if row["prompt"][-1]["role"] == "tool"]
    assert len(calls) == len(answers) == 32  # tool results only ever in prompts


def one_item_files(folder: Path) -> tuple[Path, Path]:
    """A warm-up transcript (call, result, answer) of one arithmetic item repeated, and RL rows of the same item:
    a tiny model learns the two turns in a few steps, so the RL stage's reward depends on the tool loop."""
    item = tasks.Item(("arith", 12, "*", 3), "What is 12 * 3?", "36", "12 * 3")
    instruction = tasks.INSTRUCTIONS["tools"]
    sft, rows = folder / "sft.jsonl", folder / "rows.jsonl"
    tasks.write_jsonl(sft, [tasks.transcript(item, instruction, "tools")] * 16)
    tasks.write_jsonl(rows, [tasks.row(item, "arith", instruction)] * 4)
    return sft, rows


def test_sft_warm_up_then_grpo_calls_the_tool(tokenizer, tmp_path):
    """The warm-up (sft with `tools`, `chatml-tools`, every assistant turn) teaches a tiny model to call the
    calculator and then answer from its result; grpo with `tools` then runs TRL's multi-turn loop (the call is
    parsed, the tool runs, the policy answers) and the held-out loop answers the same way. The whole call text is
    one token of the tiny tokenizer, so a few steps learn it."""
    from tiny_models import save_tiny_chat_model
    from transformers import AutoTokenizer

    from pipeline import recipe as recipe_lib
    from pipeline import runner

    sft, rows = one_item_files(tmp_path)
    conversation = json.loads(sft.read_text().splitlines()[0])["messages"]
    schemas = tools.schemas(["calculator"])
    call = chat_templates.tool_call_text("calculator", {"expression": "12 * 3"})
    save_tiny_chat_model(tmp_path / "policy", [tokenizer.apply_chat_template(conversation, tools=schemas,
                                                                             tokenize=False)] * 4,
                         vocab=600, positions=512, extra_tokens=(call,))
    train = {"batch_size": 4, "learning_rate": 1e-2, "logging_steps": 5, "max_length": 384}
    stages = {
        "warmup": {"kind": "sft", "model": str(tmp_path / "policy"), "chat_template": "chatml-tools",
                   "tools": ["calculator"], "data": {"path": str(sft), "train_on": "all_turns"},
                   "train": {**train, "max_steps": 80}},
        "grpo": {"kind": "grpo", "model": "${warmup}", "tools": ["calculator"], "max_tool_calls": 1,
                 "rewards": [{"type": "exact_match", "extract": "tagged"}],
                 "data": {"path": str(rows), "eval_path": str(rows), "max_eval_rows": 2},
                 "num_generations": 2, "max_new_tokens": 48, "temperature": 0.3,
                 "train": {**train, "max_steps": 1, "batch_size": 2, "learning_rate": 1e-6}},
    }
    recipe = write_recipe(tmp_path / "recipe.yaml", stages, tmp_path / "out")
    done = runner.run_recipe(recipe_lib.load_recipe(recipe))
    saved = AutoTokenizer.from_pretrained(done["warmup"].path)
    assert saved.chat_template == chat_templates.CHATML_TOOLS  # the override travels with the artifact
    logged = {k: v for entry in done["grpo"].manifest["log_history"] for k, v in entry.items()}
    assert logged["tools/call_frequency"] > 0 and logged["tools/failure_frequency"] == 0  # TRL ran the calculator
    assert logged["reward"] > 0  # ... and the answers after its results scored
    metrics = done["grpo"].manifest["metrics"]
    assert metrics["eval_exact_match_before"] == 1.0  # the held-out loop calls the tool and answers from it too
