"""Deterministic generator for the project's small datasets: single-digit addition, a task whose answers can be
checked, so every stage's effect is measurable (pretrain loss, SFT exact match, reward accuracy, DPO margin, PPO
reward and accuracy on held-out prompts).

Run: `python data/make_data.py` (rewrites the files beside it; same bytes every time).
Facts a + b (a, b in 0..9) are split 75/25 into train and held-out; held-out facts never appear in SFT, preference
or prompt training files (they do appear in the pretraining corpus, as knowledge the later stages must surface).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
# One fixed sentence shape, in the answer format of later stages ("a + b = c"): a 2-layer model then learns the
# addition table (a phase change after ~700 steps) and the facts transfer to chat answers.
TEMPLATES = ["{a} + {b} = {c}."]
QUESTIONS = ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]


def facts() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(1234).shuffle(pairs)
    cut = int(len(pairs) * 0.75)
    return sorted(pairs[:cut]), sorted(pairs[cut:])


def answer(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


def wrong(a: int, b: int, rng: random.Random) -> str:
    c = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return f"{a} + {b} = {max(c, 0) if c != a + b else c + 1}"


def corpus(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(4, 8)):
            a, b = rng.randrange(10), rng.randrange(10)
            sentences.append(rng.choice(TEMPLATES).format(a=a, b=b, c=a + b))
        rows.append({"text": " ".join(sentences)})
    return rows


def sft(pairs, rng: random.Random, repeats: int) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for a, b in pairs:
            q = rng.choice(QUESTIONS).format(a=a, b=b)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(a, b)}]})
    rng.shuffle(rows)
    return rows


def preferences(pairs, rng: random.Random, repeats: int) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for a, b in pairs:
            rows.append({"prompt": rng.choice(QUESTIONS).format(a=a, b=b), "chosen": answer(a, b),
                         "rejected": wrong(a, b, rng)})
    rng.shuffle(rows)
    return rows


def prompts(pairs, rng: random.Random, repeats: int) -> list[dict]:
    rows = [{"prompt": rng.choice(QUESTIONS).format(a=a, b=b), "answer": str(a + b)}
            for _ in range(repeats) for a, b in pairs]
    rng.shuffle(rows)
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, held_out = facts()
    rng = random.Random(0)
    write("corpus.jsonl", corpus(rng, 3000))
    write("corpus_eval.jsonl", corpus(rng, 200))
    write("sft.jsonl", sft(train, rng, 4))
    write("sft_eval.jsonl", sft(held_out, rng, 1))
    write("preferences.jsonl", preferences(train, rng, 8))
    write("preferences_eval.jsonl", preferences(held_out, rng, 2))
    write("prompts.jsonl", prompts(train, rng, 4))
    write("prompts_eval.jsonl", prompts(held_out, rng, 2))


if __name__ == "__main__":
    main()
