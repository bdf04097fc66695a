"""`python -m pipeline push ARTIFACT REPO_ID [--private/--no-private] [--revision BRANCH] [--merge]`: push a complete
artifact to the Hugging Face Hub as one commit (`pipeline.tools.hub`)."""
from __future__ import annotations

import argparse

from pydantic import ValidationError

from pipeline import artifacts, schema
from pipeline.errors import PipelineError
from pipeline.tools.hub import check_complete, push_artifact


def add_parser(sub) -> argparse.ArgumentParser:
    push = sub.add_parser("push", help="push an artifact to the Hub")
    push.add_argument("artifact")
    push.add_argument("repo_id")
    push.add_argument("--private", action=argparse.BooleanOptionalAction, default=True)
    push.add_argument("--revision", default=None)
    push.add_argument("--merge", action="store_true", help="push a LoRA adapter merged into its base")
    return push


def main(args) -> int:
    artifact = artifacts.open_artifact(args.artifact)
    check_complete(artifact, args.artifact)
    try:
        target = schema.HubTarget(repo_id=args.repo_id, private=args.private, revision=args.revision)
    except ValidationError as exc:
        raise PipelineError(exc.errors()[0]["msg"], key="repo_id", fix="use a repo id like 'user/name'") from None
    push_artifact(artifact, target, merge=args.merge)
    return 0
