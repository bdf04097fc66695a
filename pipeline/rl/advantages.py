"""Pure tensor maths for PPO advantages: masked statistics, whitening, per-token KL-penalised rewards and GAE.

Every function takes tensors of shape (batch, response_length) and a 0/1 `mask` of valid response tokens, and
returns new tensors; no state, no model. Used by `pipeline.rl.trainer`; tested by tests/test_rl_math.py.
Nothing runs at import.
"""
from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all entries, or along `dim`). `count` replaces the divisor (the
    mask's sum) over all entries: pieces of a batch divided by the whole batch's count sum to the batch's mean."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1; Bessel-corrected (n / (n - 1)) when `unbiased`."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count > 1:
            variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over the masked entries; the mean is added back when `shift_mean` is False."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of `mask` (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).amax(dim=1)


def kl_penalty_rewards(kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                       kl_coef: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every valid token, plus the sequence score on its last valid token."""
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over valid tokens: (advantages, returns = advantages + values).

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after the
    last valid token (masked positions contribute nothing and get advantage 0).
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
