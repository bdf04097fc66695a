"""PPO rollouts: tokenise prompts once, sample responses with the KV cache from left-padded batches, cut them at
the first EOS or stop string, compute per-token log-probs (LM head on response positions only, chunked float32
maths in `pipeline.rl.logprobs`) and values over length-grouped micro-batches (`per_row`), and score responses with
the reward model plus rule rewards (and a penalty for a missing EOS).

Called by `pipeline.rl.trainer` and `pipeline.stages.ppo` at run time; nothing runs at import.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from pipeline.eval import measures
from pipeline.rl import rewards as rule_lib
from pipeline.rl.logprobs import token_logprobs


@dataclass
class Experience:
    """What PPO attaches to a sampled batch before updating on it. Every tensor is float (B, R): B episodes, R
    response positions; positions past an episode's `response_mask` hold 0."""

    old_logprobs: torch.Tensor  # (B, R) log pi_old(y_t): the sampling policy's, the importance ratio's denominator
    values: torch.Tensor  # (B, R) the critic's V(s_t) at sampling, the clipped value loss's anchor
    advantages: torch.Tensor  # (B, R) GAE advantages, whitened over the batch's response tokens
    returns: torch.Tensor  # (B, R) the value targets: GAE advantages (before whitening) + values
    kl: torch.Tensor  # (B, R) per-token KL estimate to the reference (`kl_estimator`)
    rewards: torch.Tensor  # (B, R) per-token rewards: -kl_coef * kl, plus the score on the last token (whitened under
    # `whiten_rewards`)

    def select(self, index: torch.Tensor) -> "Experience":
        """The rows `index` of every tensor."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


@dataclass
class Rollout:
    """One batch of B sampled episodes: left-padded prompts of Q tokens and responses of R tokens."""

    query: torch.Tensor  # (B, Q) prompt token ids, left-padded
    query_mask: torch.Tensor  # (B, Q) 1 on prompt tokens, 0 on padding
    response: torch.Tensor  # (B, R) sampled token ids, padded after the first EOS / stop string
    response_mask: torch.Tensor  # (B, R) 1 on tokens up to and including the first EOS / stop string
    has_eos: torch.Tensor  # (B,) bool: the response ended before the length limit
    texts: list[str]  # B decoded responses, without special tokens, cut at a stop string
    rows: list[dict[str, Any]]  # B data rows the prompts came from (their `answer` etc. for rule rewards)
    scores: torch.Tensor | None = None  # (B,) float: reward model + rules - missing-EOS penalty, once scored
    experience: Experience | None = None  # PPO's per-token tensors, once attached (`PPOTrainer.collect`)
    sampler_logprobs: torch.Tensor | None = None  # (B, R) the sampling engine's log-probs of the response tokens
    # (vLLM's; None when the trainer's own `generate` sampled them)


def encode_prompts(tokenizer, rows: list[dict[str, Any]]) -> list[list[int]]:
    """Token ids of each row's chat prompt with the generation prompt (tokenised once, reused every step)."""
    return [tokenizer(measures.render(tokenizer, row["prompt"])[0], add_special_tokens=False)["input_ids"]
            for row in rows]


def left_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences], device=device)
    return ids, mask


def stop_index(tokenizer, tokens: list[int], stop_strings: list[str]) -> int | None:
    """Index of the token that completes the first stop string in `tokens`, or None."""
    if not stop_strings or not any(s in tokenizer.decode(tokens) for s in stop_strings):
        return None
    for end in range(1, len(tokens) + 1):
        if any(s in tokenizer.decode(tokens[:end]) for s in stop_strings):
            return end - 1
    return None


def truncate(response: torch.Tensor, eos_id: int, pad_id: int, tokenizer=None,
             stop_strings: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep tokens up to and including the first EOS (or stop string); pad after it. Returns
    (response, mask, ended) where `ended` says whether the response finished before the length limit."""
    is_eos = response == eos_id
    length = response.shape[1]
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
    if stop_strings:
        for row in range(response.shape[0]):
            found = stop_index(tokenizer, response[row, :int(first[row])].tolist(), stop_strings)
            if found is not None:
                first[row] = found
    positions = torch.arange(length, device=response.device).expand_as(response)
    mask = (positions <= first[:, None]).long()
    ended = first < length
    return torch.where(mask.bool(), response, torch.full_like(response, pad_id)), mask, ended


def sample(policy, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
           synced_gpus: bool = False) -> tuple[torch.Tensor, ...]:
    """(query, query_mask, raw response) sampled in one batch with the KV cache. `synced_gpus` keeps every rank
    stepping until all are done, which a sharded (FSDP) policy needs: each step's forward gathers weights from all."""
    from transformers import GenerationConfig

    device = next(policy.parameters()).device
    query, query_mask = left_pad(prompt_ids, tokenizer.pad_token_id, device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                              temperature=temperature if do_sample else None, top_k=top_k if do_sample else None,
                              top_p=top_p if do_sample else None, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if synced_gpus:
        unshard_root(policy)
    with torch.no_grad():  # not inference_mode: FSDP2 reuses the gathered weights in training
        out = policy.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                              synced_gpus=synced_gpus)
    response = out[:, query.shape[1]:]
    if response.shape[1] < max_new_tokens:
        pad = torch.full((response.shape[0], max_new_tokens - response.shape[1]), tokenizer.pad_token_id,
                         dtype=response.dtype, device=device)
        response = torch.cat([response, pad], 1)
    return query, query_mask, response


def unshard_root(model) -> None:
    """Gather an FSDP2 root's own parameters (final norm, and embeddings unless wrapped apart) before generating:
    a LoRA policy generates through its base model, below the root, so the root's pre-forward never gathers them.
    The wrapped layers gather themselves. A no-op for other modules."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.unshard()


def rollout(policy, tokenizer, rows: list[dict[str, Any]], prompt_ids: list[list[int]], cfg,
            do_sample: bool = True, synced_gpus: bool = False, engine=None,
            seeds: list[int] | None = None) -> Rollout:
    """Sample, truncate and decode one batch of episodes (`cfg` is the stage's `PpoStage`) with `engine` (a
    `pipeline.rl.engines` engine; None: transformers `generate` on the policy). `seeds`: one per prompt, for
    engines that take them (vLLM); `generate` draws from the global RNG."""
    from pipeline.rl.engines import HFEngine

    sampled = (engine or HFEngine()).sample(policy, tokenizer, prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                            do_sample=do_sample, synced_gpus=synced_gpus, seeds=seeds)
    response, mask, ended = truncate(sampled.response, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer,
                                     cfg.stop_strings)
    texts = decode(tokenizer, response, mask, cfg.stop_strings)
    sampler = None if sampled.sampler_logprobs is None else sampled.sampler_logprobs * mask
    return Rollout(sampled.query, sampled.query_mask, response, mask, ended, texts, rows, sampler_logprobs=sampler)


def decode(tokenizer, response: torch.Tensor, mask: torch.Tensor, stop_strings: list[str]) -> list[str]:
    """Response texts without special tokens, cut at the first stop string."""
    texts = tokenizer.batch_decode((response * mask).tolist(), skip_special_tokens=True)
    for stop in stop_strings:
        texts = [t.split(stop)[0] + stop if stop in t else t for t in texts]
    return texts


def sequence_inputs(batch: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of query + response (left padding aware)."""
    ids = torch.cat([batch.query, batch.response], 1)
    attention = torch.cat([batch.query_mask, batch.response_mask.to(batch.query_mask.dtype)], 1)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return ids, attention, positions


def policy_forward(model, batch: Rollout, temperature: float, with_entropy: bool = False,
                   entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of the response tokens (and the entropy of each next-token distribution).

    Logits are computed for the response positions only (`logits_to_keep`), kept in the model's dtype, and reduced
    in float32 chunks by `pipeline.rl.logprobs.token_logprobs`: no full-vocabulary log-softmax is materialised.
    `entropy_grad=False` returns the entropy detached (when it is only logged)."""
    ids, attention, positions = sequence_inputs(batch)
    length = batch.response.shape[1]
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                   **keep_last(model, length + 1)).logits
    logits = logits[:, -(length + 1):-1]  # the position before each response token predicts it
    return token_logprobs(logits, batch.response, temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)


def keep_last(model, count: int) -> dict[str, int]:
    """`{"logits_to_keep": count}` when the model's forward takes it (every transformers causal LM does), so only
    the last `count` positions go through the LM head; `{}` for a model without it (all positions computed).
    Looks through DDP (`.module`) and PEFT (`get_base_model`) wrappers to the model class."""
    import inspect

    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return {"logits_to_keep": count} if "logits_to_keep" in inspect.signature(type(inner).forward).parameters else {}


def trim_left_padding(batch: Rollout) -> Rollout:
    """The same episodes without the query columns that are padding in every row (a micro-batch of short prompts
    need not attend over the longest prompt's padding); results are unchanged, positions come from the mask."""
    used = batch.query_mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else batch.query.shape[1] - 1
    if first == 0:
        return batch
    return replace(batch, query=batch.query[:, first:], query_mask=batch.query_mask[:, first:])


def select(batch: Rollout, index: list[int]) -> Rollout:
    """The rows `index` of a rollout (tensors and lists)."""
    idx = torch.tensor(index, device=batch.query.device)
    return Rollout(batch.query[idx], batch.query_mask[idx], batch.response[idx], batch.response_mask[idx],
                   batch.has_eos[idx], [batch.texts[i] for i in index], [batch.rows[i] for i in index],
                   None if batch.scores is None else batch.scores[idx],
                   None if batch.experience is None else batch.experience.select(idx),
                   None if batch.sampler_logprobs is None else batch.sampler_logprobs[idx])


def micro_batches(batch: Rollout, size: int) -> list[tuple[list[int], Rollout]]:
    """Rows grouped by prompt length into micro-batches of at most `size` (similar lengths share padding), each
    trimmed of its all-padding columns: (row indices, micro-batch) pairs covering every row once (a single
    micro-batch keeps the rows in their order)."""
    if size >= len(batch.texts):  # one micro-batch: the rows as they are
        return [(list(range(len(batch.texts))), trim_left_padding(batch))]
    lengths = batch.query_mask.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [order[start:start + size] for start in range(0, len(order), max(1, size))]
    return [(group, trim_left_padding(select(batch, group))) for group in groups]


def per_row(fn, batch: Rollout, size: int):
    """`fn(micro_batch)` over micro-batches of at most `size` episodes (see `micro_batches`), its per-episode
    outputs (a tensor, or a tuple of tensors / None, with one row per episode) reassembled in the batch's row order.
    The reassembly is a gather, so gradients flow back to each micro-batch's forward."""
    parts = micro_batches(batch, size)
    outputs = [fn(part) for _, part in parts]
    order = [i for group, _ in parts for i in group]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))

    def join(pieces):
        if pieces[0] is None:
            return None
        return torch.cat(pieces)[inverse.to(pieces[0].device)]

    if isinstance(outputs[0], tuple):
        return tuple(join([out[k] for out in outputs]) for k in range(len(outputs[0])))
    return join(outputs)


def logprobs(model, batch: Rollout, cfg) -> torch.Tensor:
    """Per-token log-probs of the batch's responses under `model` (at the sampling temperature), computed in
    micro-batches of `forward_batch_size` episodes."""
    return per_row(lambda part: policy_forward(model, part, cfg.temperature)[0], batch, cfg.forward_batch_size)


def reference_logprobs(policy, reference, batch: Rollout, cfg) -> torch.Tensor:
    """`logprobs` under the frozen reference: `reference` for full fine-tuning, or, when it is None (LoRA), the
    policy itself with its adapter disabled (one copy of the weights)."""
    if reference is not None:
        return logprobs(reference, batch, cfg)
    with policy.disable_adapter():
        return logprobs(policy, batch, cfg)


def score(reward_model, tokenizer, batch: Rollout, cfg, reward_tokenizer=None) -> torch.Tensor:
    """Reward-model score + rule rewards, minus `missing_eos_penalty` where the response hit the length limit.

    The response text is rendered in the chat template exactly as the reward model saw its training pairs (with
    the reward model's own tokenizer when it differs)."""
    device = batch.response.device
    total = torch.zeros(len(batch.texts), device=device)
    if reward_model is not None:
        completions = [[{"role": "assistant", "content": t}] for t in batch.texts]
        prompts = [row["prompt"] for row in batch.rows]
        values = measures.reward_scores(reward_model, reward_tokenizer or tokenizer, prompts, completions,
                                       batch_size=cfg.forward_batch_size)
        total += torch.tensor(values, device=device)
    if cfg.rewards:
        total += torch.tensor(rule_lib.rule_rewards(cfg.rewards, batch.texts, batch.rows), device=device)
    if cfg.missing_eos_penalty is not None:
        total -= cfg.missing_eos_penalty * (~batch.has_eos).float()
    return total
