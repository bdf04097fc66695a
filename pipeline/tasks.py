"""Procedural tasks with checkable answers, for RL with verifiable rewards: writes `prompt`/`answer` jsonl files
(a training file and a held-out file) that a `grpo`, `rloo` or `ppo` stage reads with `data: {path, eval_path}` and
scores with `rewards: [{type: math_verify}]` or `[{type: exact_match, extract: tagged}]`.

    python -m pipeline.tasks --out data/rlvr --tasks add,mul,chain,linear,order --n 2000 --eval-n 200 --seed 0
    # -> data/rlvr/train.jsonl (2000 rows) and data/rlvr/eval.jsonl (200 rows); --format plain drops the
    #    "answer in <think>/<answer> tags" instruction from the prompts
    python -m pipeline.tasks --out data/tools --tasks arith --format tools --n 500 --eval-n 100 --sft 200
    # -> also data/tools/sft.jsonl: 200 worked transcripts (OpenAI messages) for an sft warm-up stage

Tasks (`TASKS`): `add` (one-digit a + b or a - b), `mul` (one-digit products), `chain` (sums and differences of 3-5
one-digit numbers), `linear` (solve a*x + b = c for an integer x), `order` (who is tallest or shortest, from
shuffled pairwise comparisons of 3-4 people: a logic task whose answer is a name, so score it with
`extract: tagged` or `contains_answer`; math_verify is for numbers), `arith` (a + b, a - b or a * b of 2-3-digit
numbers: the tool task; not in the default mixture). Each row is `{"prompt", "answer", "task"}`.

Prompt styles (`--format`): `tagged` asks for <think>/<answer> tags, `plain` is the bare question, `tools` asks the
model to use the calculator tool (`pipeline.rl.tools`) and answer in <answer> tags. `--sft K` also writes `sft.jsonl`:
K worked transcripts of training items in the same style (tools: a calculator call, its result, the answer; tagged:
the sum in <think> and the answer), OpenAI messages an sft stage with `train_on: all_turns` learns every assistant
turn of (tool results stay in the prompt, out of the loss).

Held out: the eval file holds `eval_n` distinct items (an item is a task's problem, e.g. ("add", 3, "-", 5), whatever
its wording), and no training row is any of them; training rows are drawn with replacement from the rest, so small
spaces (add: 200 items, mul: 100) can repeat. The same arguments write the same bytes (one `random.Random(seed)`).
Written here rather than taken from reasoning-gym: its 0.1.25 pins tabulate==0.9.0 and requirements/cpu.lock has
0.10.0, so pip refuses it under the lock. Nothing runs at import.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable, NamedTuple


class Item(NamedTuple):
    key: tuple  # the problem itself: two items with the same key are the same problem
    question: str
    answer: str
    expression: str | None = None  # arithmetic items: the expression a calculator call evaluates


INSTRUCTIONS = {
    "tagged": (" Think step by step inside <think> </think> tags, then give the final answer inside "
               "<answer> </answer> tags."),
    "plain": "",
    "tools": " Use the calculator tool, then give the final answer inside <answer> </answer> tags.",
}
INSTRUCTION = INSTRUCTIONS["tagged"]
NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi")
ATTEMPTS = 10_000  # draws allowed per row before a task's item space counts as exhausted


def add(rng: random.Random) -> Item:
    a, b, op = rng.randrange(10), rng.randrange(10), rng.choice("+-")
    return Item(("add", a, op, b), f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b), f"{a} {op} {b}")


def mul(rng: random.Random) -> Item:
    a, b = rng.randrange(10), rng.randrange(10)
    return Item(("mul", a, b), f"What is {a} * {b}?", str(a * b), f"{a} * {b}")


def chain(rng: random.Random) -> Item:
    numbers = [rng.randrange(1, 10) for _ in range(rng.randint(3, 5))]
    ops = [rng.choice("+-") for _ in numbers[1:]]
    total, text = numbers[0], str(numbers[0])
    for op, n in zip(ops, numbers[1:]):
        total, text = (total + n if op == "+" else total - n), f"{text} {op} {n}"
    return Item(("chain", text), f"What is {text}?", str(total), text)


def linear(rng: random.Random) -> Item:
    a, x, b, op = rng.randrange(2, 10), rng.randrange(-9, 10), rng.randrange(1, 10), rng.choice("+-")
    c = a * x + b if op == "+" else a * x - b
    return Item(("linear", a, op, b, c), f"Solve for x: {a}x {op} {b} = {c}. What is x?", str(x))


def order(rng: random.Random) -> Item:
    people = rng.sample(NAMES, rng.randint(3, 4))  # tallest first
    facts = [f"{people[i]} is taller than {people[i + 1]}." for i in range(len(people) - 1)]
    rng.shuffle(facts)
    tallest = rng.random() < 0.5
    ask = "tallest" if tallest else "shortest"
    answer = people[0] if tallest else people[-1]
    return Item(("order", tuple(people), ask), f"{' '.join(facts)} Who is the {ask}?", answer)


def arith(rng: random.Random) -> Item:
    a, b, op = rng.randrange(10, 1000), rng.randrange(10, 1000), rng.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return Item(("arith", a, op, b), f"What is {a} {op} {b}?", str(value), f"{a} {op} {b}")


TASKS: dict[str, Callable[[random.Random], Item]] = {"add": add, "mul": mul, "chain": chain, "linear": linear,
                                                     "order": order, "arith": arith}
DEFAULT_TASKS = ("add", "mul", "chain", "linear", "order")


def draw(rng: random.Random, task: str, refuse: Callable[[tuple], bool]) -> Item:
    """An item of `task` whose key `refuse` accepts, or a one-line error when the task runs out of them."""
    for _ in range(ATTEMPTS):
        item = TASKS[task](rng)
        if not refuse(item.key):
            return item
    raise ValueError(f"task {task!r} has no item left to draw (its distinct items are all held out or "
                     f"already in the held-out file): lower --eval-n")


def row(item: Item, task: str, instruction: str) -> dict:
    return {"prompt": item.question + instruction, "answer": item.answer, "task": task}


def transcript(item: Item, instruction: str, style: str) -> dict:
    """A worked conversation for an item (OpenAI messages): with tools, a calculator call on its expression, the
    tool's result and the tagged answer; otherwise its working in <think> tags and the tagged answer."""
    user = {"role": "user", "content": item.question + instruction}
    answer = {"role": "assistant", "content": f"<answer>{item.answer}</answer>"}
    if style == "tools" and item.expression is not None:
        call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "calculator", "arguments": json.dumps({"expression": item.expression})}}]}
        return {"messages": [user, call, {"role": "tool", "name": "calculator", "content": item.answer}, answer]}
    working = f"{item.expression} = {item.answer}" if item.expression is not None else item.answer
    return {"messages": [user, {"role": "assistant",
                                "content": f"<think>{working}</think> <answer>{item.answer}</answer>"}]}


def generate(tasks: list[str], n: int, eval_n: int, seed: int = 0, tagged: bool = True,
             style: str | None = None) -> tuple[list, list]:
    """(training rows, held-out rows): tasks drawn uniformly per row; held-out items distinct and never trained on.
    `style` (an INSTRUCTIONS key) overrides `tagged`."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    rng, instruction = random.Random(seed), INSTRUCTIONS[style or ("tagged" if tagged else "plain")]
    held_out: set[tuple] = set()
    eval_rows = []
    for _ in range(eval_n):
        task = rng.choice(tasks)
        item = draw(rng, task, held_out.__contains__)
        held_out.add(item.key)
        eval_rows.append(row(item, task, instruction))
    train_rows = []
    for _ in range(n):
        task = rng.choice(tasks)
        train_rows.append(row(draw(rng, task, held_out.__contains__), task, instruction))
    return train_rows, eval_rows


def transcripts(tasks: list[str], count: int, eval_rows: list[dict], seed: int, style: str) -> list[dict]:
    """`count` worked transcripts of items not in `eval_rows` (its own stream, seed + 1, so the rows of
    `generate` with the same arguments do not change)."""
    rng, instruction = random.Random(seed + 1), INSTRUCTIONS[style]
    held_out = {r["prompt"] for r in eval_rows}
    out = []
    for _ in range(count):
        task = rng.choice(tasks)
        item = draw(rng, task, lambda key, task=task: False)
        while item.question + instruction in held_out:
            item = TASKS[task](rng)
        out.append(transcript(item, instruction, style))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--n", type=int, default=1000, help="training rows")
    parser.add_argument("--eval-n", type=int, default=100, help="held-out rows (distinct items)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=tuple(INSTRUCTIONS), default="tagged",
                        help="tagged: the prompt asks for <think>/<answer> tags; plain: the bare question; tools: "
                             "asks for a calculator call and an <answer> tag")
    parser.add_argument("--sft", type=int, default=0, metavar="K",
                        help="also write sft.jsonl: K worked transcripts of training items, in the same style")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tasks = args.tasks.split(",")
        train, held = generate(tasks, args.n, args.eval_n, args.seed, style=args.format)
        worked = transcripts(tasks, args.sft, held, args.seed, args.format) if args.sft else []
    except ValueError as err:
        print(f"error: --tasks/--eval-n: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", held)
    print(f"wrote {out / 'train.jsonl'} ({len(train)} rows) and {out / 'eval.jsonl'} ({len(held)} held-out rows)")
    if worked:
        write_jsonl(out / "sft.jsonl", worked)
        print(f"wrote {out / 'sft.jsonl'} ({len(worked)} worked transcripts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
