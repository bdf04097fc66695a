"""The quickstart's data: the committed files are what `data/make_data.py` writes, and its held-out phrasings are
held out yet made of words the corpus teaches (a word the corpus never shows has an untrained embedding).

    pytest tests/test_data.py
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def make_data():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def texts(name: str) -> list[str]:
    """Every string in a JSONL file (message contents, prompts, answers, corpus text)."""
    found: list[str] = []

    def walk(value):
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, dict):
            [walk(v) for v in value.values()]
        elif isinstance(value, list):
            [walk(v) for v in value]

    for line in (DATA / name).read_text().splitlines():
        walk(json.loads(line))
    return found


def test_committed_files_are_what_make_data_writes(tmp_path):
    make_data().main(tmp_path)
    for path in sorted(tmp_path.iterdir()):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), f"rerun python data/make_data.py ({path.name})"


def test_held_out_phrasings_are_in_no_training_file_nor_the_corpus():
    module = make_data()
    shapes = [re.escape(q).replace(r"\{a\}", r"\d").replace(r"\{b\}", r"\d") for q in module.HELD_OUT_QUESTIONS]
    pattern = re.compile("|".join(shapes))
    for name in ("corpus.jsonl", "corpus_eval.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl"):
        assert not any(pattern.search(text) for text in texts(name)), name
    assert all(pattern.search(t) for t in texts("prompts_eval.jsonl") if not t.isdigit())


def test_held_out_phrasings_use_only_words_the_corpus_uses():
    corpus_words = set(re.findall(r"[A-Za-z]+|[^\sA-Za-z\d]", " ".join(texts("corpus.jsonl"))))
    for question in make_data().HELD_OUT_QUESTIONS:
        words = set(re.findall(r"[A-Za-z]+|[^\sA-Za-z\d{}]", question.replace("{a}", "").replace("{b}", "")))
        assert words <= corpus_words, f"{question!r}: {sorted(words - corpus_words)} never appear in the corpus"
