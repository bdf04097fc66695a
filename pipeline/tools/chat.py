"""Chat with a checkpoint in the terminal: its chat template, streamed tokens, a history that fits the context window.

    python -m pipeline chat OUTPUT/sft [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--system S]
                                       [--context-tokens N]

`--prompt` answers once and exits; otherwise lines are read from stdin until EOF or `/exit` (`/reset` clears the
history), so a conversation can be piped in. When the rendered conversation plus the reply would not fit in the
context window, the oldest turns are dropped first, keeping the system message (`window_messages`, a pure function).
LoRA adapter artifacts are loaded on their base with peft. Nothing runs at import.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

from pipeline import models
from pipeline.errors import PipelineError
from pipeline.eval.measures import render

Message = dict[str, str]
EXIT, RESET = "/exit", "/reset"


# ---------------------------------------------------------------------------------------------------- windowing


def window_messages(messages: list[Message], count_tokens: Callable[[list[Message]], int],
                    limit: int) -> list[Message]:
    """Drop the oldest non-system messages (FIFO) until `count_tokens(kept) <= limit`.

    System messages always stay, and so does the last message (the turn being answered); if even that does not
    fit, the shortest possible conversation (system + last message) is returned and the caller decides.
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while len(turns) > 1 and count_tokens(system + turns) > limit:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # never start on a dangling assistant reply
            turns = turns[1:]
    return system + turns


# ------------------------------------------------------------------------------------------------------ loading


def load(path: str):
    """(model, tokenizer) for a full checkpoint or a LoRA adapter (loaded on its base), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").exists() and not models.is_adapter(folder):
        raise PipelineError(f"{path} is not a model checkpoint (no config.json or adapter_config.json)",
                            key="chat", fix="point at a causal-lm artifact folder, e.g. outputs/quickstart/sft")
    models.check_safe_weights(folder, key="chat")
    tokenizer = models.load_tokenizer(str(folder))
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(f"{path} has no chat template", key="chat",
                            fix="chat with an artifact whose tokenizer has one (tokenizer stage or an sft stage)")
    if models.is_adapter(folder):
        model = models.load_adapter(folder, merge=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True)
    return model.eval(), tokenizer


def context_size(model, tokenizer, requested: int | None) -> int:
    """The window: --context-tokens, else the model's maximum positions, else the tokenizer's maximum length."""
    if requested:
        return requested
    config = getattr(model, "config", None)
    found = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not found and getattr(tokenizer, "model_max_length", 0) and tokenizer.model_max_length < 10 ** 9:
        found = tokenizer.model_max_length
    return int(found or 2048)


# -------------------------------------------------------------------------------------------------------- replies


class Chat:
    """A conversation with one model: history, windowing and streamed replies."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0, context_tokens: int | None = None, out: TextIO | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_new_tokens, self.temperature = system, max_new_tokens, temperature
        self.window = context_size(model, tokenizer, context_tokens)
        self.out = out or sys.stdout
        self.history: list[Message] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_ids(messages))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        return self.tokenizer(render(self.tokenizer, messages)[0], add_special_tokens=False)["input_ids"]

    def ask(self, text: str) -> str:
        """Answer `text` given the history (trimmed to the window), streaming tokens; the reply joins the history."""
        budget = max(self.window - self.max_new_tokens, 1)
        self.history = window_messages(self.history + [{"role": "user", "content": text}], self.count_tokens,
                                       budget)
        ids = self.prompt_ids(self.history)
        if len(ids) > budget:
            print(f"warning: the message alone is {len(ids)} tokens, over the {budget}-token window; "
                  f"keeping its last {budget}", file=sys.stderr, flush=True)
            ids = ids[-budget:]
        reply = self.generate(ids)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def generate(self, ids: list[int]) -> str:
        import torch

        streamer = _streamer(self.tokenizer, self.out)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else \
            {"do_sample": False}
        device = next(self.model.parameters()).device
        with torch.no_grad():
            output = self.model.generate(input_ids=torch.tensor([ids], device=device),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                         max_new_tokens=self.max_new_tokens, streamer=streamer,
                                         pad_token_id=self.tokenizer.pad_token_id,
                                         eos_token_id=self.tokenizer.eos_token_id, **sampling)
        return self.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def _streamer_class():
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        """TextStreamer that writes to a chosen stream (stdout by default) and flushes every piece."""

        def __init__(self, tokenizer, out: TextIO):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stream = out

        def on_finalized_text(self, text: str, stream_end: bool = False):
            self.stream.write(text + ("\n" if stream_end else ""))
            self.stream.flush()

    return Streamer


def _streamer(tokenizer, out: TextIO):
    return _streamer_class()(tokenizer, out)


# ------------------------------------------------------------------------------------------------------------ CLI


def interactive(chat: Chat, lines: TextIO, prompt_out: TextIO | None = None) -> int:
    """Answer each input line until EOF or /exit; returns the number of turns answered."""
    turns = 0
    show_prompt = prompt_out is not None
    while True:
        if show_prompt:
            prompt_out.write("> ")
            prompt_out.flush()
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if text == EXIT:
            break
        if text == RESET:
            chat.reset()
            continue
        if text:
            chat.ask(text)
            turns += 1
    return turns
