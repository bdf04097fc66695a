"""Chat templates by name, and the one way a stage's `chat_template:` (a name, a .jinja file or inline Jinja) becomes
its tokenizer's template: `chatml` (what the `tokenizer` stage writes by default) and `chatml-tools` (ChatML that
also renders tool schemas, tool calls and tool results in the Hermes/Qwen wire format, which TRL's GRPO parses
back into calls with `RESPONSE_TEMPLATE`).

Used by the `tokenizer` stage (its template), `pipeline.stages.common.load_policy` (a trained stage's
`chat_template:` override, saved with its artifact) and `pipeline.data` (how flattened tool calls read). Nothing runs
at import.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Without tools and tool messages it renders exactly as CHATML. With `tools`, a system turn lists their JSON schemas
# (after the conversation's own system text); an assistant's `tool_calls` render as <tool_call> JSON blocks (the same
# text `tool_call_text` gives a flattened call); each tool result is a user turn inside <tool_response> tags. Every
# message renders the same whatever follows it (prefix-preserving), as TRL's multi-turn GRPO requires.
CHATML_TOOLS = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- 'You can call these tools. To call one, write <tool_call>' }}"
    "{{- '{\"name\": <tool name>, \"arguments\": <its arguments as a JSON object>}</tool_call>.\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first and tools %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- set call = call.function if call.function is defined else call %}"
    "{%- set arguments = call.arguments if call.arguments is string else (call.arguments | tojson) %}"
    "{{- ('\n' if (message.content or not loop.first) else '') + '<tool_call>\n{\"name\": \"' + call.name + "
    "'\", \"arguments\": ' + arguments + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
TEMPLATES = {"chatml": CHATML, "chatml-tools": CHATML_TOOLS}

# How transformers' `parse_response` reads an assistant turn rendered by CHATML_TOOLS back into a message: text
# content up to <|im_end|>, and each <tool_call> block's JSON as a call (TRL's Qwen3 response template without its
# <think> field, since our `format` rule scores <think> tags as text).
RESPONSE_TEMPLATE: dict[str, Any] = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}

PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "A probe.", "parameters": {
    "type": "object", "properties": {"x": {"type": "string", "description": "a value"}}, "required": ["x"]}}}
PROBE = [{"role": "user", "content": "probe question"},
         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
             "name": "probe_tool", "arguments": {"x": "probe argument"}}}]},
         {"role": "tool", "name": "probe_tool", "content": "probe result"},
         {"role": "assistant", "content": "probe answer"}]


def tool_call_text(name: str, arguments: Any) -> str:
    """One tool call as CHATML_TOOLS renders it: the text a flattened call (pipeline.data) reads as."""
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


def looks_like_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def template_text(value: str, key: str) -> str:
    """The Jinja text of `value`: a name in TEMPLATES, a .jinja file, or inline Jinja."""
    if value in TEMPLATES:
        return TEMPLATES[value]
    if looks_like_jinja(value):
        return value
    path = Path(value).expanduser()
    if value.endswith(".jinja"):
        if not path.is_file():
            raise PipelineError(f"no chat template file at {path}", key=key,
                                fix="give the path of a .jinja file (relative to where you launch), or a name: "
                                    + ", ".join(TEMPLATES))
        return path.read_text()
    raise PipelineError(f"unknown chat template {value!r}", key=key,
                        fix=f"use {', '.join(TEMPLATES)}, a .jinja file or an inline Jinja template")


def render(tokenizer, template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False)


def check_template(tokenizer, template: str, key: str, tools: bool) -> None:
    """`template` renders a conversation with this tokenizer (and, when the stage has `tools`, the tools' schemas,
    a tool call and its result), or a one-line error naming `key`."""
    try:
        text = render(tokenizer, template, PROBE if tools else [PROBE[0], PROBE[-1]], [PROBE_TOOL] if tools else None)
    except Exception as error:  # jinja2's syntax and runtime errors
        raise PipelineError(f"the chat template does not render: {type(error).__name__}: {error}".splitlines()[0],
                            key=key, fix="fix the template's Jinja, or use one of " + ", ".join(TEMPLATES)) from None
    needed = ["probe question", "probe answer"] + (["probe_tool", "probe argument", "probe result"] if tools else [])
    missing = [piece for piece in needed if piece not in text]
    if missing:
        what = "tool schemas, tool calls and tool results" if tools else "the messages' content"
        raise PipelineError(f"the chat template leaves out {what} (missing {', '.join(map(repr, missing))})",
                            key=key, fix="use chat_template: chatml-tools, or a template that renders them")


def apply(tokenizer, value: str | None, key: str, tools: bool = False) -> None:
    """Give `tokenizer` the stage's `chat_template:` (checked first; None keeps its own, which is then checked when
    the stage has tools); with CHATML_TOOLS, also the response template that parses its tool calls. `key`: the
    stage's chat_template key, which errors name."""
    template = template_text(value, key) if value else tokenizer.chat_template
    if value or tools:
        check_template(tokenizer, template, key, tools)
    if value:
        tokenizer.chat_template = template
    if template == CHATML_TOOLS:
        tokenizer.response_template = copy.deepcopy(RESPONSE_TEMPLATE)
