"""Helpers shared by the resilience tests (resume, faults, security, secrets, bad data): a tiny chained recipe
written into a temporary folder and a way to run the CLI in a subprocess. Imported by tests; nothing runs at import.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@functools.lru_cache(maxsize=None)
def data_dir() -> Path:
    """A private copy of data/*.jsonl taken once per test process, so runs compared with each other read the same
    bytes even if someone regenerates data/ meanwhile."""
    folder = Path(tempfile.mkdtemp(prefix="resilience-data-"))
    for name in ("corpus.jsonl", "sft.jsonl", "preferences.jsonl", "prompts.jsonl"):
        shutil.copy(ROOT / "data" / name, folder / name)
    return folder


def tiny_recipe(tmp: Path, *, steps: int = 6, save_steps: int = 2,
                stages: tuple[str, ...] = ("tokenizer", "base", "sft"), **train) -> dict:
    """A tokenizer -> pretrain -> sft recipe with a 1-layer hidden-32 Llama, a few steps each (data from data/)."""
    data = data_dir()
    train_cfg = {"max_steps": steps, "save_steps": save_steps, "batch_size": 4, "max_length": 48,
                 "logging_steps": 1, "learning_rate": 1e-3, "save_total_limit": 10, **train}
    recipe = {
        "name": "tiny", "output_dir": str(tmp / "out"), "seed": 0,
        "defaults": {"train": train_cfg},
        "stages": {
            "tokenizer": {"kind": "tokenizer", "vocab_size": 300,
                          "data": {"path": str(data / "corpus.jsonl"), "max_rows": 200}},
            "base": {"kind": "pretrain", "tokenizer": "${tokenizer}",
                     "model": {"architecture": "llama", "config": {
                         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}},
                     "data": {"path": str(data / "corpus.jsonl"), "max_rows": 200}},
            "sft": {"kind": "sft", "model": "${base}",
                    "data": {"path": str(data / "sft.jsonl"), "max_rows": 100}},
        },
    }
    recipe["stages"] = {k: v for k, v in recipe["stages"].items() if k in stages}
    return recipe


def write_recipe(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    """Offline, single-threaded, deterministic environment for a CLI subprocess."""
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
    out.update(extra)
    return out


def cli(*args: str, extra_env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` from the repo root, output captured."""
    return subprocess.run([PYTHON, "-m", "pipeline", *args], cwd=ROOT, env=env(**(extra_env or {})),
                          capture_output=True, text=True, timeout=timeout)


def popen(*args: str, extra_env: dict[str, str] | None = None, log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    return subprocess.Popen([PYTHON, "-m", "pipeline", *args], cwd=ROOT, env=env(**(extra_env or {})),
                            stdout=handle, stderr=subprocess.STDOUT)


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file under an artifact folder, to prove it was never rewritten."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} | {".": (folder.stat().st_ino, 0)}


# Manifest keys that differ between two runs of the same stage by design: when they ran and for how long.
RUN_SPECIFIC_KEYS = ("created_at", "duration_s", "last_attempt_duration_s", "attempts", "timing")


def manifest_differences(got, want, *, rel: float = 1e-5, roots: tuple[Path, Path] | None = None,
                         path: str = "") -> list[str]:
    """Where two manifests differ, ignoring exactly RUN_SPECIFIC_KEYS (top level) and, with `roots` (the two
    runs' folders), the folder each run wrote into. Floats match within `rel` (relative); all else exactly."""
    if not path:
        got = {k: v for k, v in got.items() if k not in RUN_SPECIFIC_KEYS}
        want = {k: v for k, v in want.items() if k not in RUN_SPECIFIC_KEYS}
    if isinstance(got, dict) and isinstance(want, dict):
        if got.keys() != want.keys():
            return [f"{path or '.'}: keys {sorted(got.keys() ^ want.keys())} in only one"]
        return [d for k in want for d in manifest_differences(got[k], want[k], rel=rel, roots=roots,
                                                              path=f"{path}.{k}")]
    if isinstance(got, list) and isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, want {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want))
                for d in manifest_differences(g, w, rel=rel, roots=roots, path=f"{path}[{i}]")]
    if isinstance(got, float) and isinstance(want, float):
        same = math.isclose(got, want, rel_tol=rel, abs_tol=1e-12) or (math.isnan(got) and math.isnan(want))
        return [] if same else [f"{path}: {got!r}, want {want!r}"]
    if isinstance(got, str) and isinstance(want, str) and roots is not None:
        got, want = got.replace(str(roots[0]), "<run>"), want.replace(str(roots[1]), "<run>")
    return [] if (got == want and type(got) is type(want)) else [f"{path}: {got!r}, want {want!r}"]


def assert_same_manifests(got_dir: Path, want_dir: Path, stages, **options) -> None:
    """Every stage's manifest under `got_dir` equals the one under `want_dir` (see manifest_differences)."""
    problems = []
    for stage in stages:
        got = json.loads((Path(got_dir) / stage / "manifest.json").read_text())
        want = json.loads((Path(want_dir) / stage / "manifest.json").read_text())
        problems += [f"{stage}{d}" for d in manifest_differences(got, want, **options)]
    assert not problems, "manifests differ from the uninterrupted run's:\n" + "\n".join(problems)
