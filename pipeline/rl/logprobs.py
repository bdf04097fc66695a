"""Pure tensor maths for per-token log-probs and entropy at any vocabulary size, without full-vocabulary
log-softmax tensors: log p(y) = z_y - logsumexp(z) on the sampled token y, entropy = logsumexp(z) - sum softmax(z) z,
with z = logits / temperature, computed in float32 over chunks of token positions so the float32 temporaries hold at
most `chunk_elements` values whatever the batch, length and vocabulary.

Under autograd each chunk is recomputed in the backward pass (activation checkpointing), so no chunk's float32
temporaries are kept either: the only vocabulary-sized tensor alive is the caller's logits (in the model's dtype).
Used by `pipeline.rl.rollout.policy_forward`; tested by tests/test_rl_math.py. Nothing runs at import.
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 23  # 8M float32 values (32 MiB) per temporary: 170 positions at a 49,152-token vocabulary


def chunk_positions(vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """How many token positions one chunk holds so that a float32 (positions, vocab) temporary stays within
    `chunk_elements` values (at least one position)."""
    return max(1, chunk_elements // max(1, vocab_size))


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk, unchunked: (log softmax(z)[token], entropy of softmax(z)) per position, z = logits / temperature
    in float32. `logits` is (..., vocab), `tokens` (...); both results have the shape of `tokens`.

    Shifted by the row maximum (s = z - max z <= 0) so a peaked distribution's entropy does not lose its digits
    to cancellation: entropy = log sum exp(s) - sum exp(s) s / sum exp(s)."""
    shifted = _scaled(logits, temperature)
    shifted = shifted - shifted.amax(-1, keepdim=True)
    weights = torch.exp(shifted)
    total = weights.sum(-1)
    log_total = torch.log(total)
    logprobs = shifted.gather(-1, tokens[..., None]).squeeze(-1) - log_total
    entropy = log_total - (weights * shifted).sum(-1) / total
    return logprobs, entropy


def selected_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """One chunk: log softmax(logits / temperature)[token] in float32, without the entropy."""
    z = _scaled(logits, temperature)
    return z.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in float32 (no copy for float32 logits at temperature 1)."""
    z = logits.float()
    return z / temperature if temperature != 1.0 else z


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False, entropy_grad: bool = True,
                   chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-prob of `tokens` under softmax(logits / temperature), and its entropy when `with_entropy`.

    `logits` is (batch, length, vocab) in any dtype, `tokens` (batch, length). Positions are processed in chunks
    of `chunk_positions(vocab, chunk_elements)`; with autograd on, each chunk is checkpointed (recomputed in the
    backward pass). `entropy_grad=False` returns the entropy detached (cheaper backward when it is only logged).
    Results are float32 of shape (batch, length); values equal the unchunked `logprobs_and_entropy`.
    """
    batch, length, vocab = logits.shape
    flat, flat_tokens = logits.reshape(batch * length, vocab), tokens.reshape(batch * length)
    step = chunk_positions(vocab, chunk_elements)
    grad = torch.is_grad_enabled() and logits.requires_grad
    logprob_parts, entropy_parts = [], []
    for start in range(0, flat.shape[0], step):
        part, part_tokens = flat[start:start + step], flat_tokens[start:start + step]
        if with_entropy:
            lp, ent = _chunk(logprobs_and_entropy, grad, part, part_tokens, temperature)
            entropy_parts.append(ent if entropy_grad else ent.detach())
        else:
            lp = _chunk(selected_logprobs, grad, part, part_tokens, temperature)
        logprob_parts.append(lp)
    if not logprob_parts:  # no positions at all
        empty = logits.new_zeros((batch, length), dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    logprobs = torch.cat(logprob_parts).reshape(batch, length)
    return logprobs, (torch.cat(entropy_parts).reshape(batch, length) if with_entropy else None)


def _chunk(fn, grad: bool, logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """`fn(logits, tokens, temperature)`, checkpointed when autograd records (so its float32 temporaries are
    recomputed in the backward pass instead of kept)."""
    if not grad:
        return fn(logits, tokens, temperature)
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, logits, tokens, temperature, use_reentrant=False)
