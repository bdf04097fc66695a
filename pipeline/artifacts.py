"""Artifact folders: atomic writes, the lineage manifest, input fingerprints and the Hub model card.

Every stage writes `OUTPUT/<stage>/` through `ArtifactWriter`: files go to `OUTPUT/.tmp/<stage>-<fp>/`, the manifest
is written last, then the folder is renamed into place. A folder at `OUTPUT/<stage>` with a readable manifest is
therefore always complete; a crash leaves at most a temporary folder, which the next run finishes or discards.
The runner hands each finished stage to `commit_stage`, which writes its manifest, card and logs and commits it.
Nothing runs at import.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline.errors import SecurityError
from pipeline.data import looks_local
from pipeline.recipe import Recipe
from pipeline.schema import StageBase
from pipeline.stage import Artifact, StageResult

log = logging.getLogger("pipeline")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
LIBRARIES = ("pipeline", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers",
             "huggingface_hub")
_DISTRIBUTIONS = {"pipeline": "hf-pipeline", "huggingface_hub": "huggingface-hub"}
# Keys that change nothing in the trained weights: editing them does not invalidate an artifact.
NON_RESULT_KEYS = {"description", "push_to_hub", "logging_steps", "save_steps", "save_total_limit", "num_workers",
                   "report_to"}
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")
FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*\n?", re.S)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(_DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            continue
    return versions


def version_drift(manifests: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """{library: (recorded, installed)} for each library whose installed version differs from the one recorded in
    any of these manifests (`libraries`), e.g. reused parent artifacts built under another install."""
    installed = library_versions()
    drift: dict[str, tuple[str, str]] = {}
    for manifest in manifests:
        for name, recorded in (manifest.get("libraries") or {}).items():
            if name in installed and installed[name] != recorded and name not in drift:
                drift[name] = (recorded, installed[name])
    return drift


def version_drift_line(drift: dict[str, tuple[str, str]]) -> str | None:
    """One warning line for `version_drift`, or None when nothing differs."""
    if not drift:
        return None
    changes = ", ".join(f"{name} {old} -> {new}" for name, (old, new) in sorted(drift.items()))
    return (f"warning: reused artifacts were built with other library versions ({changes}); results may differ "
            f"from a fresh run (install from requirements/cpu.lock, or rerun with --force all)")


# --------------------------------------------------------------------------------------------------- fingerprints

_file_hash_cache: dict[tuple, str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (cached by path, size and mtime within one process)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _file_hash_cache[key] = digest.hexdigest()
    return _file_hash_cache[key]


def _strip_non_result(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_non_result(v) for k, v in value.items() if k not in NON_RESULT_KEYS}
    if isinstance(value, list):
        return [_strip_non_result(v) for v in value]
    return value


def local_files_in(value: Any) -> list[Path]:
    """Local files named anywhere in a stage config (data paths, include paths), for fingerprinting."""
    found: list[Path] = []
    if isinstance(value, dict):
        for item in value.values():
            found += local_files_in(item)
    elif isinstance(value, list):
        for item in value:
            found += local_files_in(item)
    elif isinstance(value, str) and not value.startswith("${") and looks_local(value):
        path = Path(value).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir() and not (path / "config.json").exists() and not (path / MANIFEST).exists():
            found += sorted(p for p in path.rglob("*") if p.is_file())
    return found


def fingerprint(config: dict[str, Any], parent_fingerprints: dict[str, str], seed: int) -> str:
    """Hash of everything that decides a stage's result: its config, its parents' results, its data bytes, seed."""
    files = {str(p): file_digest(p) for p in local_files_in(config)}
    payload = {"config": _strip_non_result(config), "parents": parent_fingerprints, "files": files, "seed": seed,
               "manifest_version": MANIFEST_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------------- secrets


def scrub(value: Any) -> Any:
    """Remove anything that looks like a Hub token (and the current HF_TOKEN's value) before writing it anywhere."""
    secrets = [v for k, v in os.environ.items() if k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") and v]
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return TOKEN_PATTERN.sub("***", value)
    return value


# -------------------------------------------------------------------------------------------------------- reading


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") and "fingerprint" in manifest else None


def open_artifact(folder: str | Path) -> Artifact | None:
    """The artifact at `folder` if it is complete, else None."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return Artifact(folder, manifest) if manifest else None


def update_manifest(folder: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields (e.g. evaluation metrics) into a complete artifact's manifest, atomically."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"{folder} is not a complete artifact")
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    write_json_atomic(folder / MANIFEST, scrub(manifest))
    return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------------- writing


def inside(root: Path, target: Path) -> Path:
    """`target` if it lies strictly inside `root` (after resolving '..' and links), else a SecurityError."""
    base, resolved = Path(root).resolve(), Path(target).resolve()
    if resolved == base or base not in resolved.parents:
        raise SecurityError(f"refusing to write {target}: it is outside the output folder {root}", key="stages",
                            fix="use stage names made of letters, digits, '_' and '-' only")
    return Path(target)


class ArtifactWriter:
    """Builds one stage's artifact in a temporary folder and moves it into place when complete."""

    def __init__(self, output_dir: Path, stage: str, fingerprint_: str):
        self.output_dir, self.stage, self.fingerprint = Path(output_dir), stage, fingerprint_
        self.final = inside(self.output_dir, self.output_dir / stage)
        self.tmp = inside(self.output_dir, self.output_dir / ".tmp" / f"{stage}-{fingerprint_[:16]}")

    def prepare(self) -> Path:
        """Create an empty temporary folder (main process only)."""
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def pending_complete(self) -> bool:
        """A previous run finished this artifact but died before moving it into place."""
        manifest = read_manifest(self.tmp)
        return bool(manifest and manifest.get("fingerprint") == self.fingerprint)

    def commit(self, manifest: dict[str, Any]) -> Artifact:
        """Write the manifest last, then swap the folder into place; the old artifact is removed only after."""
        manifest = scrub({**manifest, "complete": True, "fingerprint": self.fingerprint})
        write_json_atomic(self.tmp / MANIFEST, manifest)
        _fsync_dir(self.tmp)
        return self.promote()

    def promote(self) -> Artifact:
        trash = None
        if self.final.exists():
            trash = self.output_dir / ".tmp" / f"{self.stage}-replaced-{int(time.time() * 1000)}"
            os.replace(self.final, trash)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.output_dir)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return Artifact(self.final, read_manifest(self.final))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_output_dir(output_dir: Path, stages: list[str]) -> None:
    """After a crash mid-swap the old artifact may sit in .tmp while the stage folder is gone: put it back."""
    tmp_root = Path(output_dir) / ".tmp"
    if not tmp_root.exists():
        return
    for stage in stages:
        final = Path(output_dir) / stage
        if final.exists():
            continue
        replaced = sorted(tmp_root.glob(f"{stage}-replaced-*"))
        if replaced and read_manifest(replaced[-1]):
            os.replace(replaced[-1], final)


# ----------------------------------------------------------------------------------------------------- model card


def model_card(*, name: str, stage: str, kind: str, recipe: str, base_model: str | None, datasets: list[str],
               license_: str, metrics: dict[str, Any], lineage: list[dict[str, Any]], pipeline_tag: str | None,
               library_name: str = "transformers", extra_tags: list[str] | None = None,
               model_index: list[dict[str, Any]] | None = None, text: str | None = None) -> str:
    """README.md text with Hub YAML metadata (base_model, datasets, tags, license) and a lineage table; `text` is
    stage-written markdown placed before the Usage section (which a GGUF artifact's text replaces)."""
    meta: dict[str, Any] = {"library_name": library_name, "license": license_,
                            "tags": ["hf-pipeline", kind, *(extra_tags or [])]}
    if base_model:
        meta["base_model"] = base_model
    hub_datasets = [d for d in datasets if d and "/" in d and not Path(d).exists()]
    if hub_datasets:
        meta["datasets"] = hub_datasets
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    if model_index:
        meta["model-index"] = model_index
    meta = scrub(meta)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"Stage `{stage}` (kind `{kind}`) of recipe `{recipe}`, written by hf-pipeline on "
             f"{_dt.date.today().isoformat()}.", ""]
    if datasets:
        lines += ["## Data", ""] + [f"- `{d}`" for d in datasets] + [""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
        lines += [""]
    if lineage:
        lines += ["## Lineage", "", "| stage | kind | fingerprint |", "| --- | --- | --- |"]
        lines += [f"| {p['stage']} | {p.get('kind', '')} | `{p['fingerprint'][:12]}` |" for p in lineage]
        lines += [""]
    if text:
        lines += [text.rstrip("\n"), ""]
    if library_name == "gguf":
        return scrub("\n".join(lines))
    lines += ["## Usage", "", "```python"]
    if library_name == "peft":
        lines += ["from peft import AutoPeftModelForCausalLM", "model = AutoPeftModelForCausalLM.from_pretrained(PATH)"]
    elif pipeline_tag == "text-classification":
        lines += ["from transformers import AutoModelForSequenceClassification",
                  "model = AutoModelForSequenceClassification.from_pretrained(PATH)"]
    elif kind == "tokenizer":
        lines += ["from transformers import AutoTokenizer", "tokenizer = AutoTokenizer.from_pretrained(PATH)"]
    else:
        lines += ["from transformers import AutoModelForCausalLM", "model = AutoModelForCausalLM.from_pretrained(PATH)"]
    lines += ["```", ""]
    return scrub("\n".join(lines))


def split_card(text: str, warn: Callable[[str], None] | None = None) -> tuple[dict[str, Any], str]:
    """(YAML metadata, markdown body) of a model card; an unreadable header counts as empty metadata (said to
    `warn`, else logged)."""
    match = FRONT_MATTER.match(text)
    if not match:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        (warn or log.warning)("README.md metadata is not a YAML mapping; it is replaced by fresh metadata (license "
                              "and datasets must be added back by hand)")
        meta = {}
    return meta, text[match.end():]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ stage artifacts


def copy_logs(work_dir: Path, folder: Path) -> None:
    """The stage's train.log (and other ranks' train.rank<N>.log, and a vLLM rollout server's vllm-server.log) into
    its artifact, secrets scrubbed. They are not inputs of anything: fingerprints and skipping read only the
    manifest."""
    for log_file in sorted([*Path(work_dir).glob("train*.log"), *Path(work_dir).glob("vllm-server.log")]):
        text = log_file.read_text(encoding="utf-8", errors="replace")
        (Path(folder) / log_file.name).write_text(scrub(text), encoding="utf-8")


TIMING_KEYS = {"train_runtime", "step_time"}  # plus "*_per_second" and "time/*": wall-clock, not results


def is_timing_key(key: str) -> bool:
    """A log entry's wall-clock measurement (the Trainer's train_runtime and throughputs, TRL's step_time, PPO's
    time/*): it differs between two runs of the same stage, so it is kept out of `log_history`."""
    return key in TIMING_KEYS or key.endswith("_per_second") or key.startswith("time/")


def split_timing(log_history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(entries without their timing keys, the timing keys of each entry that has some, with its step)."""
    results, timings = [], []
    for entry in log_history:
        results.append({k: v for k, v in entry.items() if not is_timing_key(k)})
        timing = {k: v for k, v in entry.items() if is_timing_key(k)}
        if timing:
            timings.append({"step": entry.get("step"), **timing})
    return results, timings


def stage_manifest(recipe: Recipe, name: str, config: StageBase, parents: dict[str, Artifact], result: StageResult,
                   durations: dict[str, Any]) -> dict[str, Any]:
    """The artifact's manifest. Everything but `created_at`, the durations, `attempts` and `timing` is the same
    whether the stage ran once or was killed and resumed."""
    log_history, timing = split_timing(result.log_history)
    return {
        "manifest_version": MANIFEST_VERSION,
        "recipe": recipe.name,
        "recipe_file": str(recipe.path),
        "stage": name,
        "kind": config.kind,
        "produces": config.produced_kind(),
        "config": config.model_dump(mode="json"),
        "resolved_references": {p: str(a.path.resolve()) for p, a in parents.items()},
        "parents": [{"stage": p, "kind": a.manifest.get("kind"), "fingerprint": a.fingerprint,
                     "path": str(a.path.resolve())} for p, a in parents.items()],
        "lineage": lineage(parents, result.lineage),
        "seed": recipe.stage_seed(name),
        "metrics": result.metrics,
        "base_model": result.base_model,
        "datasets": result.datasets,
        **({"held_out": result.held_out} if result.held_out else {}),
        "log_history": log_history,
        "duration_s": durations["duration_s"],  # every attempt's time
        "last_attempt_duration_s": durations["last_attempt_duration_s"],
        "attempts": durations["attempts"],
        "timing": {"log_history": timing},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": library_versions(),
        **result.extra,
    }


def lineage(parents: dict[str, Artifact], extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """All ancestors, nearest first, each once: the parents' chains, then `extra` (a StageResult's `lineage`)."""
    seen, chain = set(), []
    chains = [[{"stage": artifact.manifest["stage"], "kind": artifact.manifest.get("kind"),
                "fingerprint": artifact.fingerprint}] + artifact.manifest.get("lineage", [])
              for artifact in parents.values()]
    for entries in chains + [extra or []]:
        for entry in entries:
            if entry["fingerprint"] not in seen:
                seen.add(entry["fingerprint"])
                chain.append(entry)
    return chain


def stage_card(recipe: Recipe, name: str, config: StageBase, parents: dict[str, Artifact], result: StageResult) -> str:
    """The artifact's model card (README.md)."""
    return model_card(
        name=f"{recipe.name}/{name}", stage=name, kind=config.kind, recipe=recipe.name,
        base_model=result.base_model, datasets=result.datasets, license_=recipe.header.license,
        metrics=result.metrics, lineage=lineage(parents, result.lineage), pipeline_tag=result.pipeline_tag,
        library_name=result.library_name, extra_tags=result.tags, text=result.card_text)


def commit_stage(writer: ArtifactWriter, work_dir: Path, *, recipe: Recipe, name: str, config: StageBase,
                 parents: dict[str, Artifact], result: StageResult, durations: dict[str, Any], state) -> Artifact:
    """Turn a finished stage into its committed artifact (main process): the manifest (with the launch's world
    size), the model card and the logs go into the writer's folder, which is then moved into place."""
    manifest = stage_manifest(recipe, name, config, parents, result, durations)
    manifest["world_size"] = state.num_processes
    manifest["distributed_type"] = getattr(state.distributed_type, "value", str(state.distributed_type))
    (writer.tmp / "README.md").write_text(stage_card(recipe, name, config, parents, result))
    copy_logs(work_dir, writer.tmp)
    return writer.commit(manifest)
