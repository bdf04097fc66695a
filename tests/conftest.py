"""Shared fixtures: offline Hub, a repo-root working directory, and a tiny trained chain reused across tests.

A bare `pytest` (or `pytest -m slow`) started by an interpreter without the project's packages reruns itself under
the project's `.venv/bin/python` (the README's test command), or stops with one line saying how to make that venv.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
VENV = ROOT / ".venv"


def pytest_configure(config):
    """Run the suite under the interpreter that has the project: this one when it imports `pipeline` and torch,
    else the same pytest command under `.venv/bin/python` (once: inside the venv a missing package is an error)."""
    if all(importlib.util.find_spec(name) for name in ("torch", "pipeline")):
        return
    python = VENV / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
        config.pluginmanager.getplugin("capturemanager").stop_global_capturing()
        print(f"{sys.executable} lacks torch or the pipeline package: running the tests under {python}",
              file=sys.stderr, flush=True)
        os.chdir(config.invocation_params.dir)
        os.execv(str(python), [str(python), "-m", "pytest", *config.invocation_params.args])
    raise pytest.UsageError(f"{sys.executable} lacks torch or the pipeline package and there is no working "
                            f"{python}: run .ci/run once (it installs .venv from the lock), then "
                            ".venv/bin/python -m pytest")


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def tiny_chain_spec(output_dir: Path) -> dict:
    """Recipe data for a tiny tokenizer -> pretrain -> sft / reward chain on the repo's addition data (CPU, seconds)."""
    data = ROOT / "data"
    small = {"max_rows": 64, "max_eval_rows": 8}
    train = {"max_steps": 4, "batch_size": 8, "learning_rate": 3.0e-3, "logging_steps": 1, "max_length": 64}
    return {
        "name": "tiny-chain", "output_dir": str(output_dir), "seed": 0,
        "stages": {
            "tokenizer": {"kind": "tokenizer", "data": {"path": str(data / "corpus.jsonl"), "max_rows": 300},
                          "vocab_size": 300, "model_max_length": 128},
            "base": {"kind": "pretrain", "tokenizer": "${tokenizer}",
                     "model": {"architecture": "llama", "config": {
                         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "max_position_embeddings": 128, "tie_word_embeddings": True}},
                     "data": {"path": str(data / "corpus.jsonl"), "eval_path": str(data / "corpus_eval.jsonl"),
                              **small},
                     "train": train},
            "sft": {"kind": "sft", "model": "${base}",
                    "data": {"path": str(data / "sft.jsonl"), "eval_path": str(data / "sft_eval.jsonl"), **small},
                    "train": train},
            "reward": {"kind": "reward", "model": "${base}",
                       "data": {"path": str(data / "preferences.jsonl"),
                                "eval_path": str(data / "preferences_eval.jsonl"), **small},
                       "train": train},
        },
    }


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """A trained tiny chain (tokenizer, base, sft, reward) built once per session through the runner.

    Returns a namespace: `output` (folder holding one artifact per stage), `recipe` (its YAML path) and `spec`
    (the recipe as a dict, to extend with more stages). Copy `output` before changing its artifacts.
    """
    from types import SimpleNamespace

    import yaml

    from pipeline import recipe as recipe_lib
    from pipeline import runner

    root = tmp_path_factory.mktemp("tiny_chain")
    spec = tiny_chain_spec(root / "out")
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    runner.run_recipe(recipe_lib.load_recipe(path))
    return SimpleNamespace(output=root / "out", recipe=path, spec=spec)


def tiny_lora_chain_recipe(out: Path, name: str, **header) -> dict:
    """A tokenizer -> pretrain -> LoRA sft recipe at toy sizes (2 steps each), for tests that need real artifacts."""
    data = ROOT / "data"
    return {
        "name": name, "output_dir": str(out), "seed": 0, **header,
        "defaults": {"train": {"max_steps": 2, "batch_size": 4, "max_length": 64, "logging_steps": 1,
                               "learning_rate": 1e-3}},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "vocab_size": 300,
                          "data": {"path": str(data / "corpus.jsonl"), "max_rows": 100}},
            "base": {"kind": "pretrain", "tokenizer": "${tokenizer}",
                     "model": {"architecture": "llama", "config": {
                         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}},
                     "data": {"path": str(data / "corpus.jsonl"), "max_rows": 100}},
            "sft": {"kind": "sft", "model": "${base}", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                    "data": {"path": str(data / "sft.jsonl"), "max_rows": 40, "on_bad_rows": "skip"}},
        },
    }
