"""The tools a policy may call during a rollout (`tools: [calculator]` on `sft` and `grpo` stages): plain Python
functions with type hints and a Google-style docstring, which transformers turns into the JSON schema that the chat
template shows the model and TRL's GRPO calls when a completion holds a tool call. `TOOLS` is the registry its names
(`pipeline.names.TOOLS`) come from; `schemas` gives an sft stage's `tools` column.

Used by `pipeline.stages.online_rl` and `pipeline.stages.sft`; nothing runs at import.
"""
from __future__ import annotations

import ast
import json
import operator
import re
from typing import Callable

MAX_EXPRESSION = 200  # characters
MAX_MAGNITUDE = 10 ** 30  # no result or operand beyond this: no huge powers or products
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def evaluate(node: ast.AST) -> int | float:
    """The value of an arithmetic syntax tree of numbers, + - * / // % and parentheses; ValueError otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = -evaluate(node.operand) if isinstance(node.op, ast.USub) else evaluate(node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if right == 0 and isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)):
            raise ValueError("division by zero")
        value = OPERATORS[type(node.op)](left, right)
    else:
        raise ValueError(f"only numbers, + - * / // % and parentheses are allowed, not {ast.dump(node)[:40]}")
    if abs(value) > MAX_MAGNITUDE:
        raise ValueError("the number is too large")
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, with numbers, + - * / // % and parentheses, e.g. "(12 + 7) * 3".

    Returns:
        The expression's value.
    """
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = evaluate(tree.body)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)


TOOLS: dict[str, Callable[..., str]] = {"calculator": calculator}


def functions(names: list[str]) -> list[Callable[..., str]]:
    """The tool functions called `names` (the schema has checked the names)."""
    return [TOOLS[name] for name in names]


def schemas(names: list[str]) -> list[dict]:
    """The tools' JSON schemas, as a chat template's `tools=` takes them."""
    from transformers.utils import get_json_schema

    return [get_json_schema(function) for function in functions(names)]


CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_calls(text: str) -> list[tuple[str, dict]]:
    """The (name, arguments) of each well-formed <tool_call> JSON block in a completion's text."""
    calls = []
    for block in CALL.findall(text):
        try:
            call = json.loads(block)
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments"), dict):
            calls.append((call["name"], call["arguments"]))
    return calls


def call(name: str, arguments: dict, allowed: list[str]) -> str:
    """The result of one tool call as the tool message's text; a failing or unknown call's error, worded as TRL's
    GRPO tool loop words it to the model."""
    try:
        if name not in allowed:
            raise ValueError(f"Tool {name} not found.")
        return str(TOOLS[name](**arguments))
    except Exception as error:  # the model's arguments are untrusted: any failure is its result
        return str({"error": str(error)})
