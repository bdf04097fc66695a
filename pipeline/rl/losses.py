"""Pure tensor maths for PPO losses: KL estimators, the clipped policy and value losses, entropy from logits, and
the fixed / adaptive KL-coefficient controllers.

Shapes are (batch, response_length) with a 0/1 `mask` of valid response tokens. Used by `pipeline.rl.trainer`;
tested by tests/test_rl_math.py. Nothing runs at import.
"""
from __future__ import annotations

from typing import Literal

import torch

from pipeline.rl.advantages import masked_mean


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                kind: Literal["k1", "k2", "k3"] = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled-token log-probs (Schulman's k1/k2/k3).

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r, where log r = logp - ref_logp.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float, count: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate: (loss, clip fraction, approx-KL = mean((logp - old)^2) / 2), all masked means.

    Every term is per token, so with `count` = the whole minibatch's valid tokens the results of its pieces (rows
    split into micro-batches) sum to the minibatch's. `weights` (B, R), when given, multiply each token's
    surrogate term (`truncated_importance_weights`)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else per_token * weights, mask, count=count)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask, count=count)
    approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask, count=count)
    return loss, clip_fraction.detach(), approx_kl.detach()


def truncated_importance_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Per-token truncated importance weights min(pi_old(y) / pi_sampler(y), cap) = min(exp(old - sampler), cap),
    without gradient: the correction for responses sampled by another engine (vLLM) than the one that computes
    the trainer's log-probs, whose numbers differ slightly (TRL's and verl's truncated importance sampling)."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap).detach()


def logprob_mismatch(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) over valid tokens of |trainer log-prob - sampler log-prob| of the sampled tokens."""
    gap = (old_logprobs - sampler_logprobs).abs() * mask
    count = mask.sum().clamp(min=1)
    return (gap.sum() / count).item(), gap.max().item() if gap.numel() else 0.0


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)) and its clip fraction (`count`
    as in `policy_loss`)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask, count=count)
    clip_fraction = masked_mean((clipped_error > unclipped_error).float(), mask, count=count)
    return loss, clip_fraction.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last axis: logsumexp(z) - sum(softmax(z) * z)."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.'s proportional controller: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
