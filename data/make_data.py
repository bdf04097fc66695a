"""Deterministic generator for the project's small datasets: single-digit addition, a task whose answers can be
checked, so every stage's effect is measurable (pretrain loss, SFT exact match, reward accuracy, DPO margin, PPO
reward and accuracy on held-out prompts).

Run: `python data/make_data.py` (rewrites the files beside it; same bytes every time).

What "held-out" means: the eval files (`*_eval.jsonl`) ask with question phrasings (HELD_OUT_QUESTIONS) that never
appear in any training file or in the corpus, and their rejected answers are freshly drawn. They cover the 25 facts
of `facts()`'s held-out split, but those facts are NOT held out of training: every training file (SFT, preferences,
prompts) covers all 100 facts, and the pretraining corpus covers them all too. (Holding out the facts themselves
left SFT at ~0.04 exact match and the reward model at chance within the quickstart's few-minute CPU budget.) The
corpus eval file is fresh documents of the same kinds.
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
# Held-out phrasings: never in the SFT, preference or prompt training files.
HELD_OUT_QUESTIONS = ["How much is {a} + {b}?", "Find {a} + {b}."]


def facts() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(1234).shuffle(pairs)
    cut = int(len(pairs) * 0.75)
    return sorted(pairs[:cut]), sorted(pairs[cut:])


# Chat answers start with a word, so `a` is the same token (" 4") in the question and the answer: a 2-layer model
# copies a repeated token easily, but not " 4" -> "4" (the turn's first token has no leading space).
def answer(a: int, b: int) -> str:
    return f"So {a} + {b} = {a + b}"


def wrong(a: int, b: int, rng: random.Random) -> str:
    c = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    return f"So {a} + {b} = {max(c, 0) if c != a + b else c + 1}"


def corpus(rng: random.Random, n: int) -> list[dict]:
    """Pretraining documents over all 100 facts: half are fact sentences, half short ChatML tutoring exchanges
    (user: a training question phrasing, assistant "So a + b = c"). An assistant answer is wrong 30% of the time;
    then the user says "No." and the assistant gives the right fact; only a right answer ends the document. So the
    chat tokens are trained as inputs, and the final position of a chat (where a reward head reads) is meant to
    carry whether the answer was right (the model predicts there whether the exchange ends); in the quickstart's
    budget the 2-layer model does not learn that (see docs/recipes.md)."""
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            sentences = []
            for _ in range(rng.randint(4, 8)):
                a, b = rng.randrange(10), rng.randrange(10)
                sentences.append(rng.choice(TEMPLATES).format(a=a, b=b, c=a + b))
            rows.append({"text": " ".join(sentences)})
            continue
        a, b = rng.randrange(10), rng.randrange(10)
        turns = [("user", rng.choice(QUESTIONS).format(a=a, b=b))]
        if rng.random() < 0.3:
            turns += [("assistant", wrong(a, b, rng)), ("user", "No.")]
        turns.append(("assistant", answer(a, b)))
        rows.append({"text": "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns)})
    return rows


def sft(pairs, rng: random.Random, repeats: int, questions=QUESTIONS) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for a, b in pairs:
            q = rng.choice(questions).format(a=a, b=b)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(a, b)}]})
    rng.shuffle(rows)
    return rows


def preferences(pairs, rng: random.Random, repeats: int, questions=QUESTIONS) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for a, b in pairs:
            rows.append({"prompt": rng.choice(questions).format(a=a, b=b), "chosen": answer(a, b),
                         "rejected": wrong(a, b, rng)})
    rng.shuffle(rows)
    return rows


def prompts(pairs, rng: random.Random, repeats: int, questions=QUESTIONS) -> list[dict]:
    rows = [{"prompt": rng.choice(questions).format(a=a, b=b), "answer": str(a + b)}
            for _ in range(repeats) for a, b in pairs]
    rng.shuffle(rows)
    return rows


def write(name: str, rows: list[dict]) -> None:
    with open(HERE / name, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    train, held_out = facts()
    every = sorted(train + held_out)
    rng = random.Random(0)
    write("corpus.jsonl", corpus(rng, 3000))
    write("corpus_eval.jsonl", corpus(rng, 200))
    write("sft.jsonl", sft(every, rng, 3))
    write("sft_eval.jsonl", sft(held_out, rng, 2, HELD_OUT_QUESTIONS))
    write("preferences.jsonl", preferences(every, rng, 6))
    write("preferences_eval.jsonl", preferences(held_out, rng, 2, HELD_OUT_QUESTIONS))
    write("prompts.jsonl", prompts(every, rng, 3))
    write("prompts_eval.jsonl", prompts(held_out, rng, 2, HELD_OUT_QUESTIONS))


if __name__ == "__main__":
    main()
