"""Run by tests/test_fsdp.py under `torchrun --nproc_per_node 2` (gloo): load a model with the pipeline's loader
split by tensor parallelism (`models.load_causal_lm(..., tp_size=2)`), run a forward and backward pass on the same
batch on both ranks, and write `rank<N>.json` into the output folder with the loss, the whole model's loss and the
local shard shapes (one file per rank: printed lines of two processes can interleave).
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import models, schema


def main(path: str, out: str) -> None:
    dist.init_process_group("gloo")
    sharded = models.load_causal_lm(path, schema.ModelSection(path=path), tp_size=2)
    whole = models.load_causal_lm(path, schema.ModelSection(path=path))
    ids = torch.randint(0, whole.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = sharded(input_ids=ids, labels=ids).loss
    loss.backward()
    weight = sharded.model.layers[0].self_attn.q_proj.weight
    result = json.dumps({
        "rank": dist.get_rank(), "tp_size": getattr(sharded, "tp_size", None), "loss": loss.item(),
        "whole_loss": whole(input_ids=ids, labels=ids).loss.item(),
        "local_shape": list(weight.to_local().shape), "full_shape": list(weight.shape),
        "grad_finite": bool(torch.isfinite(weight.grad.full_tensor()).all())})
    (Path(out) / f"rank{dist.get_rank()}.json").write_text(result)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
