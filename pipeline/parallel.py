"""Multi-process glue: the recipe's `parallelism:` section -> Accelerate's ParallelismConfig, and checks that every
rank agrees (same plan, same fingerprints, same weights).

Used by `pipeline.training.trainer_kwargs` (ParallelismConfig for TrainingArguments) and by `pipeline.runner`
(rank agreement) when a recipe runs under `accelerate launch` or `torchrun`, e.g.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m pipeline run recipe.yaml
    torchrun --standalone --nproc_per_node 2 -m pipeline run recipe.yaml

With one process every check here is a no-op. Nothing runs at import; torch and accelerate are imported lazily.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pipeline.artifacts import file_digest
from pipeline.errors import PipelineError
from pipeline.stage import StageContext

SIZE_KEYS = ("dp_replicate", "dp_shard", "tp", "cp")


# ------------------------------------------------------------------------------------------------- parallelism


def resolve_sizes(section, world_size: int) -> dict[str, int]:
    """The four sizes with `dp_shard: -1` filled in as 'the rest'; their product must equal the world size."""
    sizes = {key: int(getattr(section, key)) for key in SIZE_KEYS}
    others = sizes["dp_replicate"] * sizes["tp"] * sizes["cp"]
    if sizes["dp_shard"] == -1:
        if world_size % others:
            raise _size_error(sizes, world_size, f"dp_replicate*tp*cp = {others} does not divide it")
        sizes["dp_shard"] = world_size // others
    if sizes["dp_shard"] < 1:
        raise _size_error(sizes, world_size, "dp_shard must be >= 1 or -1 ('the rest')")
    product = math.prod(sizes.values())
    if product != world_size:
        raise _size_error(sizes, world_size, f"their product is {product}")
    return sizes


def _size_error(sizes: dict[str, int], world_size: int, why: str) -> PipelineError:
    shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
    return PipelineError(f"parallelism sizes ({shown}) do not fit {world_size} process(es): {why}",
                         key="parallelism", fix=f"make dp_replicate*dp_shard*tp*cp = {world_size} (the number of "
                                                "launched processes), or set dp_shard: -1 to take the rest")


def parallelism_config(section, world_size: int):
    """An accelerate ParallelismConfig for TrainingArguments(parallelism_config=...), or None when there is nothing
    to configure (no section, one process, or plain data parallelism, which DDP/DeepSpeed handle themselves)."""
    if section is None:
        return None
    sizes = resolve_sizes(section, world_size)
    if world_size == 1 or (sizes["dp_shard"] == 1 and sizes["tp"] == 1 and sizes["cp"] == 1):
        return None
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(dp_replicate_size=sizes["dp_replicate"], dp_shard_size=sizes["dp_shard"],
                             tp_size=sizes["tp"], cp_size=sizes["cp"])


def sharding_in_launch(section, environ=None) -> str | None:
    """What shards the model in this launch (FSDP, DeepSpeed ZeRO-3, or the recipe's tp/cp > 1), else None.
    Read from the variables `accelerate launch` sets, so a stage can refuse before any model is wrapped."""
    import os

    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and \
            environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    if section is not None:
        parts = [f"{key}={getattr(section, key)}" for key in ("tp", "cp") if int(getattr(section, key)) > 1]
        if parts:
            return "parallelism " + ", ".join(parts)
    return None


def check_launch(section, state, recipe_file: str | None = None) -> None:
    """Before any stage: the `parallelism:` sizes must fit the launched processes, and a section that shards
    (dp_shard/tp/cp > 1) needs accelerators, since Accelerate starts a ParallelismConfig only there."""
    if section is None or state.num_processes <= 1:
        return
    try:
        config = parallelism_config(section, state.num_processes)
    except PipelineError as error:
        raise PipelineError(error.message, file=recipe_file, key=error.key, fix=error.fix) from None
    if config is not None and getattr(state.device, "type", "cpu") == "cpu":
        raise PipelineError("the `parallelism:` section shards the model (dp_shard/tp/cp > 1), which Accelerate runs "
                            "on GPUs only", file=recipe_file, key="parallelism",
                            fix="remove the section to train with DDP on CPU, or launch on GPUs")


def tensor_parallel_size(ctx: StageContext) -> int:
    """The recipe's `parallelism.tp` for this launch (1 with one process or no section)."""
    section, world_size = ctx.recipe.header.parallelism, ctx.state.num_processes
    if section is None or world_size <= 1:
        return 1
    return resolve_sizes(section, world_size)["tp"]


# ----------------------------------------------------------------------------------------------- rank agreement


def close_process_group() -> None:
    """Tear down torch.distributed (if this launch started it) so ranks exit together instead of one rank's gloo
    threads aborting when a peer has already gone."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(state, value: Any) -> list[Any]:
    """`value` from every rank, in rank order (a one-element list with one process)."""
    if state.num_processes <= 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def check_ranks_agree(state, what: str, value: Any, key: str | None = None) -> None:
    """Raise PipelineError on every rank when ranks computed different `value`s for `what`."""
    values = gather(state, value)
    if all(v == values[0] for v in values):
        return
    shown = "; ".join(f"rank {rank}: {_short(v)}" for rank, v in enumerate(values))
    raise PipelineError(f"ranks disagree on {what} ({shown})", key=key,
                        fix="every rank must see the same recipe, data files and output folder (a shared "
                            "filesystem), and run the same library versions")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else hashlib.sha256(text.encode()).hexdigest()[:16]


def files_digest(folder: Path) -> str:
    """sha256 over the names and bytes of an artifact's files (weights, tokenizer, config), as this rank sees them."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_digest(path).encode())
    return digest.hexdigest()


def weights_digest(model) -> str:
    """sha256 over a model's parameter names, shapes and values (for ranks holding whole, unsharded weights)."""
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = param.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
