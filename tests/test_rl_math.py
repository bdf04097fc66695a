"""Hand-computed checks of PPO's pure maths (pipeline.rl.advantages / pipeline.rl.losses).

Run: .venv/bin/python -m pytest tests/test_rl_math.py -q
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.rl import advantages as adv
from pipeline.rl import logprobs as lp
from pipeline.rl import losses

MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_masked_mean_and_var():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    assert adv.masked_mean(x, MASK).item() == pytest.approx(2.0)  # (1 + 3) / 2; 100 is masked out
    # deviations -1, +1 -> biased var 1, unbiased 1 * 2 / 1 = 2
    assert adv.masked_var(x, MASK, unbiased=False).item() == pytest.approx(1.0)
    assert adv.masked_var(x, MASK).item() == pytest.approx(2.0)
    rows = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    assert adv.masked_mean(rows, torch.tensor([[1, 0], [1, 1]]), dim=1).tolist() == pytest.approx([1.0, 6.0])


def test_masked_mean_pieces_over_the_whole_count_sum_to_the_mean():
    x, mask = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, 9.0]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    count = mask.sum()  # 5 valid entries: mean (1 + 3 + 5 + 7 + 9) / 5 = 5
    pieces = [adv.masked_mean(x[i:i + 1], mask[i:i + 1], count=count) for i in range(2)]
    assert [p.item() for p in pieces] == pytest.approx([4 / 5, 21 / 5])
    assert sum(pieces).item() == pytest.approx(adv.masked_mean(x, mask).item()) == pytest.approx(5.0)


def test_loss_pieces_sum_to_the_minibatch_loss():
    generator = torch.Generator().manual_seed(0)
    new, old, advantages, values, returns = (torch.randn(4, 5, generator=generator) for _ in range(5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    whole_pg = losses.policy_loss(new, old, advantages, mask, 0.2)
    whole_vf = losses.value_loss(values, old, returns, mask, 0.2)
    count = mask.sum()
    rows = ([0, 3], [1], [2])
    pg = [losses.policy_loss(new[r], old[r], advantages[r], mask[r], 0.2, count) for r in rows]
    vf = [losses.value_loss(values[r], old[r], returns[r], mask[r], 0.2, count) for r in rows]
    for k in range(3):
        assert sum(p[k] for p in pg).item() == pytest.approx(whole_pg[k].item())
    for k in range(2):
        assert sum(v[k] for v in vf).item() == pytest.approx(whole_vf[k].item())


def test_masked_whiten():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    out = adv.masked_whiten(x, MASK, eps=0.0)
    s = math.sqrt(2.0)  # unbiased std of {1, 3}
    assert out.tolist()[0] == pytest.approx([-1 / s, 1 / s, 0.0])
    kept = adv.masked_whiten(x, MASK, shift_mean=False, eps=0.0)
    assert kept.tolist()[0] == pytest.approx([2 - 1 / s, 2 + 1 / s, 0.0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 5.0]])  # reward after the mask must be ignored
    values = torch.tensor([[0.5, 0.2, 9.0]])
    gamma, lam = 0.9, 0.8
    # t=1: delta = 1 + 0.9*0 - 0.2 = 0.8; A1 = 0.8
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32; A0 = -0.32 + 0.9*0.8*0.8 = 0.256
    a, r = adv.gae(rewards, values, MASK, gamma, lam)
    assert a.tolist()[0] == pytest.approx([0.256, 0.8, 0.0])
    assert r.tolist()[0] == pytest.approx([0.756, 1.0, 0.0])


def test_gae_gamma_one_lam_one_is_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.zeros(1, 3)
    a, _ = adv.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert a.tolist()[0] == pytest.approx([6.0, 5.0, 3.0])


def test_kl_penalty_rewards_score_on_last_token():
    kl = torch.tensor([[0.2, 0.4, 0.6], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = adv.kl_penalty_rewards(kl, torch.tensor([2.0, -1.0]), mask, kl_coef=0.5)
    # row 0: -0.1, -0.2 + 2 (last valid token is index 1), 0 (masked)
    # row 1: -0.05, -0.05, -0.05 - 1
    assert out.tolist()[0] == pytest.approx([-0.1, 1.8, 0.0])
    assert out.tolist()[1] == pytest.approx([-0.05, -0.05, -1.05])


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log r = 0.5
    assert losses.kl_estimate(logp, ref, "k1").item() == pytest.approx(0.5)
    assert losses.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.125)  # 0.5^2 / 2
    assert losses.kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) - 1 + 0.5)
    with pytest.raises(ValueError):
        losses.kl_estimate(logp, ref, "k9")


def test_policy_loss_clipping():
    old = torch.zeros(1, 3)
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    loss, clip_fraction, approx_kl = losses.policy_loss(new, old, advantages, torch.ones(1, 3), clip_range=0.2)
    # token 0: ratio 1.5, A=+1 -> max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: ratio 0.5, A=+1 -> max(-0.5, -0.8) = -0.5 (not clipped)
    # token 2: ratio 1.1, A=-2 -> max(2.2, 2.2) = 2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert approx_kl.item() == pytest.approx(expected_kl)


def test_policy_loss_gradient_flows_only_unclipped():
    new = torch.tensor([[math.log(1.5), math.log(0.9)]], requires_grad=True)
    loss, _, _ = losses.policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2)
    loss.backward()
    # clipped token has zero gradient; the other: d(-ratio/2)/dlogp = -0.9/2
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.45])


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[math.log(0.5), math.log(0.9), math.log(0.2)]])
    sampler = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.4)]])
    weights = losses.truncated_importance_weights(old, sampler, cap=2.0)
    # ratios pi_old / pi_vllm: 1.0, 3.0 -> truncated to 2.0, 0.5 (kept: only the top is truncated)
    assert weights.tolist()[0] == pytest.approx([1.0, 2.0, 0.5])
    assert not weights.requires_grad


def test_importance_weights_scale_each_tokens_surrogate():
    new = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    advantages = torch.tensor([[1.0, 1.0, -2.0]])
    weights = torch.tensor([[2.0, 1.0, 0.5]])
    loss, _, _ = losses.policy_loss(new, torch.zeros(1, 3), advantages, torch.ones(1, 3), 0.2, weights=weights)
    # the per-token terms of test_policy_loss_clipping (-1.2, -0.5, 2.2) times 2, 1, 0.5
    assert loss.item() == pytest.approx((-2.4 - 0.5 + 1.1) / 3)


def test_logprob_mismatch_over_valid_tokens_only():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    sampler = torch.tensor([[-1.1, -2.0, -9.0], [-1.3, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the 6.0 gap sits on padding
    mean, largest = losses.logprob_mismatch(old, sampler, mask)
    assert mean == pytest.approx((0.1 + 0.0 + 0.3 + 0.0) / 4)
    assert largest == pytest.approx(0.3)


def test_value_loss_by_hand():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, clip_fraction = losses.value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: unclipped (1-2)^2 = 1; clipped V=0.2 -> (0.2-2)^2 = 3.24 -> 3.24
    # token 1: unclipped (0.1-1)^2 = 0.81; clipped V=0.1 (inside) -> 0.81
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.81) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_entropy_from_logits():
    uniform = torch.zeros(1, 4)
    assert losses.entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    two = torch.tensor([[math.log(3.0), 0.0]])  # probs 3/4, 1/4
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert losses.entropy_from_logits(two).item() == pytest.approx(expected)


def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # probs 3/4, 1/4
    logp, entropy = lp.logprobs_and_entropy(logits, torch.tensor([1]))
    assert logp.item() == pytest.approx(math.log(0.25))
    assert entropy.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # temperature 2 halves the logits: z = (log(3)/2, 0) -> probs sqrt(3)/(1+sqrt(3)), 1/(1+sqrt(3))
    logp, entropy = lp.logprobs_and_entropy(logits, torch.tensor([0]), temperature=2.0)
    p = math.sqrt(3) / (1 + math.sqrt(3))
    assert logp.item() == pytest.approx(math.log(p))
    assert entropy.item() == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    uniform = lp.selected_logprobs(torch.zeros(2, 4), torch.tensor([0, 3]))
    assert uniform.tolist() == pytest.approx([-math.log(4)] * 2)


def test_chunk_positions():
    assert lp.chunk_positions(49152, 1 << 23) == 170  # 8,388,608 // 49,152
    assert lp.chunk_positions(512, 1 << 23) == 16384
    assert lp.chunk_positions(10, 5) == 1  # at least one position


def naive_logprobs(logits, tokens, temperature):
    """The unchunked reference: full-vocabulary float32 log-softmax, gather, entropy from the logits."""
    z = logits.float() / temperature
    return torch.log_softmax(z, -1).gather(-1, tokens[..., None]).squeeze(-1), losses.entropy_from_logits(z)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [1, 3 * 50, 10 ** 9])  # one position, 3 positions, everything at once
def test_chunked_logprobs_equal_naive(temperature, chunk_elements):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=generator) * 4
    tokens = torch.randint(0, 50, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])  # padded and empty responses
    tokens = torch.where(mask.bool(), tokens, torch.full_like(tokens, 7))  # pad id after the end
    logp, entropy = lp.token_logprobs(logits, tokens, temperature, with_entropy=True, chunk_elements=chunk_elements)
    want_logp, want_entropy = naive_logprobs(logits, tokens, temperature)
    assert torch.allclose(logp * mask, want_logp * mask, atol=1e-5)
    assert torch.allclose(entropy * mask, want_entropy * mask, atol=1e-5)
    assert torch.allclose(logp, want_logp, atol=1e-5) and torch.allclose(entropy, want_entropy, atol=1e-5)
    assert adv.masked_mean(entropy, mask).item() == pytest.approx(adv.masked_mean(want_entropy, mask).item(), abs=1e-5)
    only_logp, none = lp.token_logprobs(logits, tokens, temperature, chunk_elements=chunk_elements)
    assert none is None and torch.allclose(only_logp, want_logp, atol=1e-5)


def test_chunked_logprobs_in_bfloat16_match_float32_maths():
    logits = (torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(1)) * 3).bfloat16()
    tokens = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(2))
    logp, entropy = lp.token_logprobs(logits, tokens, with_entropy=True, chunk_elements=60)
    want_logp, want_entropy = naive_logprobs(logits, tokens, 1.0)  # the bf16 values, upcast
    assert logp.dtype == torch.float32 and torch.allclose(logp, want_logp, atol=1e-5)
    assert torch.allclose(entropy, want_entropy, atol=1e-5)


def test_chunked_logprobs_gradients_equal_naive():
    base = torch.randn(2, 6, 40, generator=torch.Generator().manual_seed(3))
    tokens = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(4))
    weights = torch.rand(2, 6, generator=torch.Generator().manual_seed(5))
    chunked = base.clone().requires_grad_(True)
    logp, entropy = lp.token_logprobs(chunked, tokens, 0.8, with_entropy=True, chunk_elements=5 * 40)
    ((logp * weights).sum() - 0.1 * entropy.sum()).backward()
    naive = base.clone().requires_grad_(True)
    want_logp, want_entropy = naive_logprobs(naive, tokens, 0.8)
    ((want_logp * weights).sum() - 0.1 * want_entropy.sum()).backward()
    assert torch.allclose(chunked.grad, naive.grad, atol=1e-5)
    detached = base.clone().requires_grad_(True)
    logp, entropy = lp.token_logprobs(detached, tokens, 0.8, with_entropy=True, entropy_grad=False,
                                      chunk_elements=5 * 40)
    assert not entropy.requires_grad and logp.requires_grad


def test_chunked_logprobs_of_no_positions():
    logp, entropy = lp.token_logprobs(torch.zeros(2, 0, 8), torch.zeros(2, 0, dtype=torch.long), with_entropy=True)
    assert logp.shape == entropy.shape == (2, 0)


def test_kl_controllers():
    fixed = losses.FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    ctl = losses.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2 -> 0.1 * (1 + 0.2 * 10 / 100) = 0.102
    assert ctl.value == pytest.approx(0.102)
    ctl.update(5.4, 50)  # error 5.4/6 - 1 = -0.1 -> 0.102 * (1 - 0.1 * 0.5) = 0.0969
    assert ctl.value == pytest.approx(0.0969)
    restored = losses.AdaptiveKLController(1.0, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == pytest.approx(0.0969)
