"""Push an artifact folder to the Hugging Face Hub as one commit: weights (safetensors, or a GGUF export's .gguf and
Modelfile), tokenizer, manifest and a refreshed card.

    python -m pipeline push OUTPUT/stage user/repo [--private/--no-private] [--revision BRANCH] [--merge]

Also called by `pipeline.runner` after a stage whose recipe sets `push_to_hub`. LoRA adapters are pushed with
`base_model` (card) and `base_model_name_or_path` (adapter_config.json) pointing at the base's Hub repo when the base
artifact was pushed before (its manifest records `hub: {repo_id, revision, commit}`); `--merge` pushes full weights.
The token comes only from HF_TOKEN or `huggingface-cli login`; it is never printed or written. Nothing runs at import.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline import artifacts, models, schema
from pipeline.artifacts import Artifact
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
SKIP_NAMES = {".gitattributes"}
RELATIONS = {"peft": "adapter", "gguf": "quantized"}  # the card's base_model_relation by library; else finetune
LOCAL_ONLY = re.compile(r"^train(\.rank\d+)?\.log$")  # the stage's library output (local paths): never pushed


# ------------------------------------------------------------------------------------------------------ inputs


def find_token(token: str | None = None) -> str:
    """The Hub token from the argument, HF_TOKEN or the saved login; a one-line error when there is none."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PipelineError("no Hugging Face token found", key="push",
                            fix="export HF_TOKEN=... or run `hf auth login` (a token with write access)")
    return found


def check_complete(artifact: Artifact | None, path: str | Path) -> Artifact:
    """The artifact, if complete and holding what its kind needs (weights for models, tokenizer for tokenizers)."""
    if artifact is None or artifacts.open_artifact(artifact.path) is None:
        raise PipelineError(f"{path} is not a complete artifact (no finished manifest.json)", key="push",
                            fix="run the stage to completion first (python -m pipeline run RECIPE)")
    names = {p.name for p in artifact.path.iterdir()}
    if artifact.produces in (schema.CAUSAL_LM, schema.REWARD_MODEL) and not names & set(WEIGHTS):
        raise PipelineError(f"{artifact.path} has no safetensors weights", key="push",
                            fix="rerun the stage with --force to rewrite its artifact")
    if artifact.produces == schema.GGUF and not any(n.endswith(".gguf") for n in names):
        raise PipelineError(f"{artifact.path} has no .gguf file", key="push",
                            fix="rerun the export stage with --force to rewrite its artifact")
    if artifact.produces == schema.TOKENIZER and "tokenizer.json" not in names and "tokenizer_config.json" not in names:
        raise PipelineError(f"{artifact.path} has no tokenizer files", key="push", fix="rerun the tokenizer stage")
    return artifact


def hub_record(path: str | Path | None) -> dict[str, Any] | None:
    """The `hub` entry of the artifact at a local path, if it was pushed."""
    if not path or not Path(str(path)).is_dir():
        return None
    found = artifacts.open_artifact(path)
    record = found.manifest.get("hub") if found else None
    return record if isinstance(record, dict) and record.get("repo_id") else None


def hub_base(local: str | None) -> tuple[str | None, str | None]:
    """(repo id, revision) to name as base model for a parent given as a local path or Hub id; (None, None) if the
    parent is a local folder that was never pushed."""
    if not local:
        return None, None
    record = hub_record(local)
    if record:
        revision = record.get("revision")
        return record["repo_id"], (revision if revision and revision != "main" else None)
    if Path(local).exists() or local.startswith(("/", ".", "~")):
        return None, None
    return local, None


# ----------------------------------------------------------------------------------------------------- staging


def stage_files(artifact: Artifact, folder: Path, *, merge: bool) -> dict[str, Any]:
    """Copy (or merge) the artifact into `folder` ready to push; returns what the card needs to know."""
    base_local = models.base_model_of(artifact.path) if artifact.is_adapter else artifact.manifest.get("base_model")
    base_id, base_revision = hub_base(base_local)
    if base_local and base_id is None:
        _warn(f"base model {base_local} was never pushed, so the card on the Hub names no base_model"
              + ("; adapter_config.json keeps the local path and will not load from the Hub" if artifact.is_adapter
                 and not merge else "")
              + " (push the base artifact first: python -m pipeline push BASE_ARTIFACT REPO_ID)")
    if artifact.is_adapter and merge:
        _merge_into(artifact.path, folder)
        library = "transformers"
    else:
        for item in artifact.path.iterdir():
            if item.name not in SKIP_NAMES and not item.name.startswith(".") and not LOCAL_ONLY.match(item.name):
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
        library = "peft" if artifact.is_adapter else "gguf" if artifact.produces == schema.GGUF else None
        if artifact.is_adapter and base_id:
            _rewrite_adapter_config(folder / "adapter_config.json", base_id, base_revision)
    return {"base_model": base_id, "library_name": library, "merged": artifact.is_adapter and merge}


def _rewrite_adapter_config(path: Path, base_id: str, revision: str | None) -> None:
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_id
    if revision:
        config["revision"] = revision
    path.write_text(json.dumps(artifacts.scrub(config), indent=2))


def _merge_into(adapter: Path, folder: Path) -> None:
    """Merge a LoRA adapter into its (local) base and save full safetensors weights plus the tokenizer."""
    from transformers import AutoTokenizer

    model = models.load_adapter(adapter, merge=True)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter)).save_pretrained(folder)
    for name in ("manifest.json", "README.md"):
        if (adapter / name).exists():
            shutil.copy2(adapter / name, folder / name)


def _warn(message: str) -> None:
    log.warning(message)
    print(f"warning: {artifacts.scrub(message)}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------------- card


def refresh_card(text: str, manifest: dict[str, Any], info: dict[str, Any]) -> str:
    """The card with Hub-valid metadata (base_model as a repo id or absent) and current metrics from the manifest."""
    meta, body = artifacts.split_card(text, warn=_warn)
    meta.pop("base_model", None)
    if info["base_model"]:
        meta["base_model"] = info["base_model"]
        meta["base_model_relation"] = RELATIONS.get(info["library_name"], "finetune")
    if info["library_name"]:
        meta["library_name"] = info["library_name"]
    if info["merged"]:
        meta["library_name"] = "transformers"
        meta["tags"] = [*meta.get("tags", []), "merged-lora"]
    meta.setdefault("tags", ["hf-pipeline"])
    body = _metrics_section(body, manifest.get("metrics") or {})
    header = yaml.safe_dump(artifacts.scrub(meta), sort_keys=False).strip()
    return artifacts.scrub(f"---\n{header}\n---\n{body}")


def _metrics_section(body: str, metrics: dict[str, Any]) -> str:
    rows = [f"| {k} | {artifacts._fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    if not rows:
        return body
    section = "\n".join(["## Metrics", "", "| metric | value |", "| --- | --- |", *rows, "", ""])
    pattern = re.compile(r"## Metrics\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(body):
        return pattern.sub(lambda _: section, body, count=1)
    return body.rstrip("\n") + "\n\n" + section


# -------------------------------------------------------------------------------------------------------- push


def push_artifact(artifact: Artifact, target: schema.HubTarget, *, merge: bool = False,
                  token: str | None = None) -> str:
    """Push one artifact as a single commit to `target`; record it in the manifest; return the commit URL."""
    artifact = check_complete(artifact, artifact.path if artifact else "artifact")
    token = find_token(token)
    if merge and not artifact.is_adapter:
        raise PipelineError(f"{artifact.path} is not a LoRA adapter; --merge applies only to adapters", key="--merge",
                            fix="drop --merge")
    with tempfile.TemporaryDirectory(prefix="hf-pipeline-push-") as tmp:
        folder = Path(tmp)
        info = stage_files(artifact, folder, merge=merge)
        card = folder / "README.md"
        card.write_text(refresh_card(card.read_text() if card.exists() else "", artifact.manifest, info))
        message = target.commit_message or (f"hf-pipeline: {artifact.manifest.get('recipe')}/"
                                            f"{artifact.manifest.get('stage')} ({artifact.fingerprint[:12]})")
        commit = _commit_folder(folder, target, message, token)
    revision = target.revision or "main"
    artifacts.update_manifest(artifact.path, hub={"repo_id": target.repo_id, "revision": revision,
                                                  "commit": commit.oid, "merged": bool(merge)})
    print(f"pushed {artifact.path.name} to {target.repo_id}@{revision}: {commit.commit_url}", flush=True)
    return commit.commit_url


def _commit_folder(folder: Path, target: schema.HubTarget, message: str, token: str):
    """create_repo (exist_ok), create_branch if asked, then one commit that makes the branch mirror `folder`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    names = {p.relative_to(folder).as_posix() for p in files}
    try:
        api.create_repo(target.repo_id, private=target.private, exist_ok=True)
        if target.revision and target.revision != "main":
            api.create_branch(target.repo_id, branch=target.revision, exist_ok=True)
        stale = [n for n in api.list_repo_files(target.repo_id, revision=target.revision)
                 if n not in names and n not in SKIP_NAMES]
        operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                      for p in files] + [CommitOperationDelete(path_in_repo=n) for n in stale]
        return api.create_commit(target.repo_id, operations=operations, commit_message=message,
                                 revision=target.revision)
    except OfflineModeIsEnabled:
        raise PipelineError("cannot push while HF_HUB_OFFLINE=1", key="push",
                            fix="unset HF_HUB_OFFLINE (or set it to 0) for the push") from None
    except (HfHubHTTPError, ValueError) as exc:
        first = artifacts.scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise PipelineError(f"push to {target.repo_id} failed: {first}", key="push",
                            fix="check the repo id, the token's write access and the model card") from None
