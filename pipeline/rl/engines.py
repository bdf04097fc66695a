"""Rollout engines: where an RL stage samples its responses. `HFEngine` runs transformers `generate` on the policy
in the trainer's process (the default, unchanged); `VLLMEngine` asks a vLLM server (started for the stage by
`pipeline.rl.vllm_server`, or already running at `rollout.url`) and keeps the server's weights equal to the
policy's: before sampling, `sync(policy, version)` pushes the policy when its version (the optimiser step) moved.

Weight sync, both ways (docs/online-rl.md#rollouts-on-vllm has the measured costs):
- `adapter`: a LoRA policy saves its adapter only; the server loads it under a new name, `policy-v<version>`, and
  every request names it, so no request can reach an older adapter;
- `merged`: the whole policy (a LoRA policy's adapter merged in, without touching the policy) is written as one
  safetensors file and reloaded into the served model in place; the prefix cache is dropped.
Under DDP every rank holds the same weights: rank 0 pushes them and the others wait at a barrier; each rank then
samples its own prompts from the one server. Under FSDP2 every rank gathers the shards (a collective) and rank 0
pushes the whole, merged weights (`sync: adapter` is refused there).

Built by `make_engine(ctx, ...)` in the ppo and grpo stages; nothing runs at import.
"""
from __future__ import annotations

import functools
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import parallel
from pipeline.errors import PipelineError, TrainingError
from pipeline.rl.vllm_client import VLLMClient
from pipeline.rl.vllm_server import ServerSpec, VLLMServer


@dataclass
class Sampled:
    """One sampled batch of B prompts: left-padded prompts (B, Q), responses padded to the length limit (B, R), and
    the sampling engine's log-probs of the sampled tokens (B, R; None for `hf`, whose are the trainer's own)."""

    query: torch.Tensor
    query_mask: torch.Tensor
    response: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None


class HFEngine:
    """transformers `generate` on the policy itself: nothing to sync, nothing to start."""

    name = "hf"

    def sync(self, policy, version: int) -> float:
        return 0.0

    def sample(self, policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, do_sample: bool, synced_gpus: bool = False,
               seeds: list[int] | None = None) -> Sampled:
        from pipeline.rl.rollout import sample

        query, query_mask, response = sample(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                                             temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                                             synced_gpus=synced_gpus)
        return Sampled(query, query_mask, response)

    def close(self) -> None:
        pass


def is_lora(policy) -> bool:
    return hasattr(policy, "peft_config") and hasattr(policy, "get_base_model")


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` whole: an FSDP2 shard (DTensor) is gathered from every rank, a collective each rank must call in the
    same order; any other tensor is returned as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def merged_weights(policy, keep: bool = True) -> dict[str, torch.Tensor]:
    """The policy's weights under their checkpoint names: a LoRA policy's base with each adapter's delta added
    (computed, not merged into the policy, which stays as it is). Tensors shared by two names (tied embeddings)
    are kept once. Under FSDP2 every rank calls it (each shard is gathered, in the same order on every rank) and
    only a rank with `keep` holds the result (the others get {})."""
    out: dict[str, torch.Tensor] = {}
    for name, compute in weight_sources(policy).items():
        value = compute().detach()
        if keep:
            out[name] = value.contiguous()
    return out


def weight_sources(policy) -> dict[str, Any]:
    """Checkpoint name -> a function computing that weight, in state-dict order, each shared tensor once."""
    if not is_lora(policy):
        return {k: functools.partial(whole, v) for k, v in unique(policy.state_dict(keep_vars=True)).items()}
    from peft.tuners.lora import LoraLayer

    base = policy.get_base_model()
    sources: dict[str, Any] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            sources[f"{name}.weight"] = functools.partial(merged_layer, module)
            if getattr(module.base_layer, "bias", None) is not None:
                sources[f"{name}.bias"] = functools.partial(whole, module.base_layer.bias)
    for key, value in unique(base.state_dict(keep_vars=True)).items():
        if "lora_" not in key and ".base_layer." not in key:
            sources.setdefault(key, functools.partial(whole, value))
    return sources


def unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (from `state_dict(keep_vars=True)`: the parameters themselves) with each tensor under its first name
    only: tied weights are one Parameter object."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        if id(value) not in seen:
            seen.add(id(value))
            out[key] = value
    return out


def merged_layer(module) -> torch.Tensor:
    """A LoRA layer's base weight plus its active adapters' deltas (gathered first where FSDP2 shards them)."""
    weight = whole(module.base_layer.weight).detach()
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if not any(is_dtensor(p) for p in module.parameters()):
        delta = sum(module.get_delta_weight(a) for a in adapters)
    else:
        delta = sum(sharded_delta(module, a) for a in adapters)
    return weight + delta.to(weight.dtype)


def is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def sharded_delta(module, adapter: str) -> torch.Tensor:
    """`module.get_delta_weight(adapter)` for a LoRA layer whose A and B FSDP2 shards: B @ A x scaling, gathered."""
    if module.use_dora.get(adapter):
        raise TrainingError("a DoRA adapter cannot be merged for the vLLM server under FSDP",
                            key="lora.use_dora", fix="turn DoRA off, or launch with DDP")
    delta = (whole(module.lora_B[adapter].weight) @ whole(module.lora_A[adapter].weight)) * module.scaling[adapter]
    return delta.T if module.fan_in_fan_out else delta


class Ranks:
    """This process's place among the stage's processes (torch.distributed when initialised)."""

    def __init__(self):
        dist = torch.distributed
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class VLLMEngine:
    """Samples from a vLLM server whose weights follow the policy. `server` is the one this stage started (rank 0
    only; None when using `rollout.url`, or on the other ranks)."""

    name = "vllm"

    def __init__(self, client: VLLMClient, sync_mode: str, dtype: torch.dtype, server: VLLMServer | None = None,
                 ranks: Ranks | None = None, scratch: Path | None = None, sharded: bool = False):
        self.client, self.sync_mode, self.dtype, self.server = client, sync_mode, dtype, server
        self.sharded = sharded  # FSDP2 shards the policy: every rank takes part in gathering merged weights
        self.ranks = ranks or Ranks()
        self.base_name = client.served_model()
        self.model_name = self.base_name
        self.version: int | None = None  # the policy version the server holds; None: not pushed yet
        self.scratch = scratch or Path(tempfile.mkdtemp(prefix="hf-pipeline-vllm-"))
        self.last_sync_s = 0.0

    def sync(self, policy, version: int | str) -> float:
        """Push the policy's weights when `version` (a step, or a phase such as "trained") differs from the
        server's; the seconds it took (0 if nothing)."""
        if version == self.version:
            return 0.0
        started = time.perf_counter()
        name = f"policy-v{version}"
        adapter = self.sync_mode == "adapter"
        if self.ranks.main or (self.sharded and not adapter):  # under FSDP2 every rank gathers the merged weights
            with self.explained_errors():
                if adapter:
                    self.push_adapter(policy, name)
                else:
                    self.push_merged(policy)
        self.ranks.barrier()
        self.model_name = name if adapter else self.base_name
        self.version = version
        self.last_sync_s = time.perf_counter() - started
        return self.last_sync_s

    def push_adapter(self, policy, name: str) -> None:
        folder = self.scratch / name
        policy.save_pretrained(str(folder), safe_serialization=True)
        self.client.load_adapter(name, str(folder))
        if self.model_name != self.base_name:  # the previous adapter: unloaded, its files removed
            self.client.unload_adapter(self.model_name)
            shutil.rmtree(self.scratch / self.model_name, ignore_errors=True)

    def push_merged(self, policy) -> None:
        from safetensors.torch import save_file

        with torch.no_grad():
            weights = {k: v.to(self.dtype) if v.is_floating_point() else v
                       for k, v in merged_weights(policy, keep=self.ranks.main).items()}
        if not self.ranks.main:
            return
        folder = self.scratch / "merged"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu() for k, v in weights.items()}, str(folder / "model.safetensors"))
        self.client.reload_weights(str(folder))

    def sample(self, policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float,
               top_k: int, top_p: float, do_sample: bool, synced_gpus: bool = False,
               seeds: list[int] | None = None) -> Sampled:
        from pipeline.rl.rollout import left_pad

        device = next(policy.parameters()).device
        completions = self.complete(prompt_ids, seeds or [None] * len(prompt_ids), max_tokens=max_new_tokens,
                                    temperature=temperature if do_sample else 0.0, top_k=top_k if do_sample else 0,
                                    top_p=top_p if do_sample else 1.0, stop_token_ids=[tokenizer.eos_token_id])
        query, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
        response = torch.full((len(prompt_ids), max_new_tokens), tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(prompt_ids), max_new_tokens))
        for row, completion in enumerate(completions):
            ids = completion.token_ids[:max_new_tokens]
            response[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[row, :len(ids)] = torch.tensor(completion.logprobs[:len(ids)])
        return Sampled(query, query_mask, response.to(device), logprobs.to(device))

    def complete(self, prompt_ids: list[list[int]], seeds: list[int | None], **settings: Any) -> list:
        """One completion (token ids and their log-probs) per prompt from the synced weights, prompt i drawn with
        seeds[i]; `settings`: max_tokens, temperature, top_k, top_p, stop_token_ids."""
        with self.explained_errors():
            return self.client.generate(prompt_ids, seeds, model=self.model_name, **settings)

    @contextmanager
    def explained_errors(self):
        """A failed request to the server this stage started names the error its log ends with (the server's
        HTTP 500 says only "EngineCore encountered an issue") and the log's path."""
        try:
            yield
        except TrainingError as error:
            cause = self.server.root_cause() if self.server is not None else None
            if cause is None:
                raise
            raise TrainingError(f"{error.message}; the server's log says: {cause}", key=error.key,
                                fix=f"read {self.server.spec.log_path}") from None

    def close(self) -> None:
        """Stop the started server and remove the synced weights (rank 0; the other ranks have neither)."""
        self.ranks.barrier()
        if self.server is not None:
            self.server.stop()
        if self.ranks.main:
            shutil.rmtree(self.scratch, ignore_errors=True)


def sync_mode(section, lora: bool, sharded: bool = False, on_gpu: bool = False) -> str:
    """`rollout.sync` resolved. auto: merged, except for a LoRA policy on a GPU that FSDP does not shard (adapter:
    only the adapter moves, and vLLM's GPU LoRA kernels sample near full speed). On CPU merged is the measured
    faster one (bench/rollout.py: an active adapter samples 2.3x slower there, and costs more than the merged
    reload saves); under FSDP the gathered weights are whole, an adapter is not."""
    if section.sync == "auto":
        return "adapter" if lora and on_gpu and not sharded else "merged"
    return section.sync


def server_dtype(section, precision: str) -> str:
    if section.dtype != "auto":
        return section.dtype
    return "bfloat16" if precision == "bf16" else "float32"


def serving_folder(policy, tokenizer, folder: Path, dtype: torch.dtype) -> str:
    """The starting policy as the folder the server loads: its merged weights in the server's dtype, its config and
    tokenizer. Served from here rather than from `model.path`, the server starts from exactly the trainer's
    weights whatever the path was (an adapter artifact, a GGUF file, a Hub revision)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    base = policy.get_base_model() if is_lora(policy) else policy
    base.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    with torch.no_grad():
        weights = {k: (v.to(dtype) if v.is_floating_point() else v).cpu() for k, v in merged_weights(policy).items()}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def context_length(policy, wanted: int) -> int:
    """`wanted` (the stage's train.max_length), at most the model's own position limit (vLLM refuses more)."""
    limit = getattr(policy.config, "max_position_embeddings", None)
    return min(wanted, int(limit)) if limit else wanted


def make_engine(ctx, policy, tokenizer, lora_rank: int | None, precision: str, max_model_len: int):
    """The stage's engine from its `rollout:` section: `HFEngine`, or a `VLLMEngine` on a server that rank 0
    starts (or on `rollout.url`). `lora_rank`: the policy's LoRA rank (None: a full policy)."""
    section = ctx.config.rollout
    if section.engine == "hf":
        return HFEngine()
    sharded = sharded_launch(ctx)
    if sharded and section.sync == "adapter":
        raise PipelineError("sync: adapter does not run under FSDP: the adapter's weights are sharded",
                            key=f"stages.{ctx.name}.rollout.sync",
                            fix="use sync: merged (auto picks it under FSDP: the gathered weights are merged)")
    mode = sync_mode(section, lora_rank is not None, sharded, on_gpu=torch.cuda.is_available())
    dtype = server_dtype(section, precision)
    ranks, server, url = Ranks(), None, section.url
    scratch = Path(ctx.work_dir) / "vllm"  # the serving folder and synced weights (rank 0's); a rerun starts afresh
    if ranks.main:
        shutil.rmtree(scratch, ignore_errors=True)
    try:
        if url is None and ranks.main:
            spec = ServerSpec(model=serving_folder(policy, tokenizer, scratch / "start", getattr(torch, dtype)),
                              python=section.python, log_path=Path(ctx.work_dir) / "vllm-server.log",
                              key=f"stages.{ctx.name}.rollout", dtype=dtype,
                              max_model_len=section.max_model_len or context_length(policy, max_model_len),
                              lora_rank=lora_rank if mode == "adapter" else None, kv_cache_gb=section.kv_cache_gb,
                              gpu_memory_utilization=section.gpu_memory_utilization,
                              threads=section.threads or torch.get_num_threads(),
                              seed=ctx.seed, start_timeout=section.start_timeout,
                              server_args=list(section.server_args))
            server = VLLMServer(spec)
            try:
                url = server.start()
            except BaseException:
                ranks.broadcast(None)  # the other ranks stop too instead of waiting for a URL
                raise
        url = ranks.broadcast(url)
        if url is None:
            raise TrainingError("the vLLM server did not start on rank 0", key=f"stages.{ctx.name}.rollout",
                                fix="read rank 0's error and vllm-server.log in the stage's work folder")
        return VLLMEngine(VLLMClient(url), mode, getattr(torch, dtype), server=server, ranks=ranks, scratch=scratch,
                          sharded=sharded)
    except BaseException:
        if server is not None:
            server.stop()
        if ranks.main:
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def sharded_launch(ctx) -> bool:
    """Whether this launch shards the stage's models (FSDP over more than one process)."""
    return ctx.state.num_processes > 1 and parallel.sharding_in_launch(ctx.recipe.header.parallelism) == "FSDP"


def step_seeds(seed: int, step: int, count: int, rank: int = 0, world: int = 1) -> list[int]:
    """Per-prompt sampling seeds of one step: distinct across prompts, steps and ranks, the same on a rerun (so a
    resumed stage draws what an uninterrupted one would)."""
    base = (seed * 1_000_003 + step * 10_007) % (2 ** 31 - 1)
    return [(base + (rank + i * world) * 7919) % (2 ** 31 - 1) for i in range(count)]
