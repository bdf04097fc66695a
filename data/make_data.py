"""Deterministic generator for the project's small datasets: single-digit addition, a task whose answers can be
checked, so every stage's effect is measurable (pretrain loss, SFT exact match, reward accuracy, DPO margin, PPO
reward and accuracy on held-out prompts).

Run: `python data/make_data.py` (rewrites the files beside it; same bytes every time).

What is held out, exactly:
- Phrasings: the eval files (`*_eval.jsonl` but the corpus's) ask with question phrasings (HELD_OUT_QUESTIONS)
  that appear in no training file and not in the corpus. They are new combinations of words the corpus does use
  ("Tell me", "Please add", "plus", "+"). A phrasing made of characters the corpus never shows ("How much is ...",
  the phrasing used before) leaves its tokens' embeddings at their random initial values: what the model then does
  depends on the seed and on the CPU's float rounding (AVX2 vs AVX-512 kernels), not on what it learned. That made
  the quickstart's SFT exact match 0.96 on one CPU and 0.40 on another.
- Answers: the rejected answers of the eval preference pairs are freshly drawn, of the same three kinds as in
  training (REJECTED): a wrong sum, a sum of miscopied numbers, and the right answer running on into another sum.
- Facts are NOT held out. The eval files ask about the 25 facts of `facts()`'s held-out split, but every training
  file (SFT, preferences, prompts) covers all 100 facts, and so does the pretraining corpus. Holding the 25 facts
  out of the fine-tuning files (kept in the corpus) was measured this session on one pretrained base: SFT exact
  match 0.80 (the base's own table was 85% right, and SFT cannot teach a fact it never sees) and the reward model
  at chance (0.47-0.59 held-out accuracy), so the quickstart keeps all facts in training.
The corpus eval file is fresh documents of the same kinds as the corpus.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
# One fixed sentence shape, in the answer format of later stages ("a + b = c"): a 2-layer model then learns the
# addition table (a phase change after ~700 steps) and the facts transfer to chat answers.
TEMPLATES = ["{a} + {b} = {c}."]
QUESTIONS = ["What is {a} + {b}?", "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
             "Please add {a} and {b}.", "Tell me {a} + {b}."]
# Held-out phrasings: in no training file and not in the corpus, made only of words the corpus uses.
HELD_OUT_QUESTIONS = ["Tell me {a} plus {b}.", "Please add {a} + {b}."]


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
    """A wrong answer 1-3 away from the sum (never negative, never the sum itself: 0 + 0 once got "0")."""
    delta = rng.choice([-3, -2, -1, 1, 2, 3])
    c = max(a + b + delta, 0)
    return f"So {a} + {b} = {c if c != a + b else a + b + abs(delta)}"


FACT_DOCUMENTS = 0.3  # the share of corpus documents that are fact sentences; the rest are tutoring chats


def corpus(rng: random.Random, n: int) -> list[dict]:
    """Pretraining documents over all 100 facts: 30% are fact sentences ("a + b = c."), 70% ChatML tutoring chats
    of one or two exchanges (user: a training question phrasing, assistant "So a + b = c"). An assistant answer is
    wrong 30% of the time; then the user says "No." and the assistant gives the right fact. The chats teach the chat
    tokens and copying the question's numbers into the answer, which a 2-layer model learns later than the table
    itself: with half the documents as chats, whether it had learned to copy after the quickstart's 1800 steps
    depended on the seed."""
    rows = []
    for _ in range(n):
        if rng.random() < FACT_DOCUMENTS:
            sentences = []
            for _ in range(rng.randint(4, 8)):
                a, b = rng.randrange(10), rng.randrange(10)
                sentences.append(rng.choice(TEMPLATES).format(a=a, b=b, c=a + b))
            rows.append({"text": " ".join(sentences)})
            continue
        turns = []
        for _ in range(rng.randint(1, 2)):
            a, b = rng.randrange(10), rng.randrange(10)
            turns.append(("user", rng.choice(QUESTIONS).format(a=a, b=b)))
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


def miscopied(a: int, b: int, rng: random.Random) -> str:
    """A sum that is right for other numbers than the question's: one operand miscopied."""
    other = rng.choice([n for n in range(10) if n != a])
    return f"So {other} + {b} = {other + b}" if rng.random() < 0.5 else f"So {b} + {other} = {b + other}"


def run_on(a: int, b: int, rng: random.Random) -> str:
    """The right answer, then the turn runs on into another sum: its last number is no longer the answer."""
    d = rng.randint(1, 9)
    return f"{answer(a, b)} + {d} = {a + b + d}"


# The kinds of rejected answer in preference pairs, with their shares: a policy sampled at a high temperature makes
# all three mistakes, and a reward model that saw only wrong sums scored miscopied sums as right.
REJECTED = ((0.7, wrong), (0.2, miscopied), (0.1, run_on))


def rejected(a: int, b: int, rng: random.Random) -> str:
    draw = rng.random()
    for share, make in REJECTED:
        if draw < share:
            return make(a, b, rng)
        draw -= share
    return REJECTED[-1][1](a, b, rng)


def preferences(pairs, rng: random.Random, repeats: int, questions=QUESTIONS) -> list[dict]:
    rows = []
    for _ in range(repeats):
        for a, b in pairs:
            rows.append({"prompt": rng.choice(questions).format(a=a, b=b), "chosen": answer(a, b),
                         "rejected": rejected(a, b, rng)})
    rng.shuffle(rows)
    return rows


def prompts(pairs, rng: random.Random, repeats: int, questions=QUESTIONS) -> list[dict]:
    rows = [{"prompt": rng.choice(questions).format(a=a, b=b), "answer": str(a + b)}
            for _ in range(repeats) for a, b in pairs]
    rng.shuffle(rows)
    return rows


def write(name: str, rows: list[dict], folder: Path = HERE) -> None:
    with open(folder / name, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(folder: Path = HERE) -> None:
    train, held_out = facts()
    every = sorted(train + held_out)
    rng = random.Random(0)
    write("corpus.jsonl", corpus(rng, 3000), folder)
    write("corpus_eval.jsonl", corpus(rng, 200), folder)
    write("sft.jsonl", sft(every, rng, 3), folder)
    write("sft_eval.jsonl", sft(held_out, rng, 2, HELD_OUT_QUESTIONS), folder)
    write("preferences.jsonl", preferences(every, rng, 12), folder)
    write("preferences_eval.jsonl", preferences(held_out, rng, 8, HELD_OUT_QUESTIONS), folder)
    write("prompts.jsonl", prompts(every, rng, 3), folder)
    write("prompts_eval.jsonl", prompts(held_out, rng, 4, HELD_OUT_QUESTIONS), folder)


if __name__ == "__main__":
    main()
