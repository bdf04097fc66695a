"""`python -m pipeline chat ARTIFACT [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--system S]
[--context-tokens N]`: chat with a checkpoint (`pipeline.tools.chat`). `--prompt` answers once and exits; otherwise
lines are read from stdin until EOF or `/exit` (`/reset` clears the history)."""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError
from pipeline.tools.chat import Chat, interactive, load


def add_parser(sub) -> argparse.ArgumentParser:
    chat = sub.add_parser("chat", help="chat with a checkpoint")
    chat.add_argument("artifact")
    chat.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--system", default=None)
    chat.add_argument("--context-tokens", type=int, default=None, help="window size (default: model's maximum)")
    return chat


def main(args) -> int:
    if args.max_new_tokens <= 0:
        raise PipelineError("--max-new-tokens must be positive", key="--max-new-tokens", fix="e.g. 256")
    if args.temperature < 0:
        raise PipelineError("--temperature must be >= 0", key="--temperature", fix="0 for greedy decoding")
    model, tokenizer = load(args.artifact)
    chat = Chat(model, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, context_tokens=args.context_tokens)
    if args.context_tokens is not None and args.context_tokens <= args.max_new_tokens:
        raise PipelineError("--context-tokens must be larger than --max-new-tokens", key="--context-tokens",
                            fix=f"e.g. --context-tokens {args.max_new_tokens * 4}")
    if args.prompt is not None:
        chat.ask(args.prompt)
        return 0
    interactive(chat, sys.stdin, sys.stderr if sys.stdin.isatty() else None)
    return 0
