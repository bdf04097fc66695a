"""`python -m pipeline chat`: one-shot answers, piped multi-turn sessions, FIFO context windowing.

    .venv/bin/python -m pytest tests/test_chat.py -q

A tiny tokenizer -> pretrain -> LoRA sft recipe (a couple of steps) is run once per module to get real artifacts.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_lora_chain_recipe

from pipeline.tools.chat import window_messages

ROOT = Path(__file__).resolve().parents[1]


def _recipe(out: Path) -> dict:
    return tiny_lora_chain_recipe(out, "tinychat")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    from pipeline.__main__ import main

    tmp = tmp_path_factory.mktemp("chat")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp / "out"), sort_keys=False))
    assert main(["run", str(recipe)]) == 0
    return tmp / "out"


def _reference_reply(folder: Path, messages: list[dict], max_new_tokens: int) -> str:
    """What greedy decoding gives for `messages`, computed without pipeline.tools.chat."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    loader = AutoPeftModelForCausalLM if (folder / "adapter_config.json").exists() else AutoModelForCausalLM
    model = loader.from_pretrained(folder).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------- windowing


def _words(messages):
    return sum(len(m["content"].split()) for m in messages)


def test_window_keeps_everything_that_fits():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "a b"},
                {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]
    assert window_messages(messages, _words, 5) == messages


def test_window_drops_oldest_turns_first_and_keeps_system():
    system = {"role": "system", "content": "be brief"}
    u1, a1 = {"role": "user", "content": "one two three"}, {"role": "assistant", "content": "four five"}
    u2, a2 = {"role": "user", "content": "six"}, {"role": "assistant", "content": "seven eight"}
    u3 = {"role": "user", "content": "nine ten"}
    messages = [system, u1, a1, u2, a2, u3]  # 2 + 3 + 2 + 1 + 2 + 2 = 12 words
    assert window_messages(messages, _words, 11) == [system, u2, a2, u3]  # u1+a1 go together
    assert window_messages(messages, _words, 7) == [system, u2, a2, u3]
    assert window_messages(messages, _words, 6) == [system, u3]
    assert window_messages(messages, _words, 1) == [system, u3]  # the question itself always stays
    assert window_messages([u1, a1, u3], _words, 4) == [u3]  # no system message: nothing is invented


# ------------------------------------------------------------------------------------------------------ CLI


def test_one_shot_prompt_prints_the_greedy_completion(chain, capsys):
    from pipeline.__main__ import main

    assert main(["chat", str(chain / "base"), "--prompt", "What is 2+3?", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.strip()
    expected = _reference_reply(chain / "base", [{"role": "user", "content": "What is 2+3?"}], 8)
    assert printed == expected and printed


def test_adapter_artifact_chats_on_its_base(chain, capsys):
    from pipeline.__main__ import main

    messages = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "1+1"}]
    assert main(["chat", str(chain / "sft"), "--prompt", "1+1", "--system", "Answer.",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.strip() == _reference_reply(chain / "sft", messages, 6)


def test_interactive_session_keeps_history(chain, monkeypatch):
    from pipeline.tools import chat as chat_module

    model, tokenizer = chat_module.load(str(chain / "base"))
    out = io.StringIO()
    session = chat_module.Chat(model, tokenizer, max_new_tokens=4, out=out)
    seen: list[list[dict]] = []
    real = session.generate
    monkeypatch.setattr(session, "generate", lambda ids: (seen.append(list(session.history)), real(ids))[1])
    turns = chat_module.interactive(session, io.StringIO("hello\n\nwhat next\n/exit\nnever asked\n"))
    assert turns == 2
    assert [m["content"] for m in seen[1] if m["role"] == "user"] == ["hello", "what next"]
    assert seen[1][1]["role"] == "assistant"
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    replies = [m["content"] for m in session.history if m["role"] == "assistant"]
    assert out.getvalue().split() == " ".join(replies).split()  # every reply was streamed, nothing else


def test_window_applies_during_a_session(chain):
    from pipeline.tools import chat as chat_module

    model, tokenizer = chat_module.load(str(chain / "base"))
    session = chat_module.Chat(model, tokenizer, system="sys", max_new_tokens=4, context_tokens=130,
                               out=io.StringIO())
    # Questions long enough (about 50 tokens each) that three turns overflow the window whatever the replies are.
    questions = [f"{name} question here, " * 3 for name in ("first", "second", "third")]
    assert session.count_tokens([{"role": "user", "content": q} for q in questions]) > 130
    for question in questions:
        session.ask(question)
        assert session.count_tokens(session.history[:-1]) <= 126
    kept = [m["content"] for m in session.history]
    assert kept[0] == "sys" and session.history[0]["role"] == "system"
    assert questions[0] not in kept and questions[2] in kept


def test_piped_stdin_two_turns_in_a_subprocess(chain):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-m", "pipeline", "chat", str(chain / "base"), "--max-new-tokens", "5"],
                          input="hi there\nand again\n", capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    assert "> " not in done.stderr  # no interactive prompt when stdin is a pipe


def test_not_a_checkpoint_is_exit_2(tmp_path, capsys):
    from pipeline.__main__ import main

    assert main(["chat", str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err
