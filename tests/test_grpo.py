"""GRPO math: advantages, KL estimators, aggregation, clipped policy loss."""
import math

import pytest
import torch

from aesformer.grpo import (
    aggregate,
    entropy_from_logits,
    group_advantages,
    kl_loss,
    kl_penalty,
    masked_entropy,
    policy_loss,
    token_logprobs,
)

torch.set_num_threads(1)


def test_group_advantages_hand_computed():
    adv = group_advantages([1, 2, 3, 4, 0, 0, 0, 0], 4)
    # group 1: mean 2.5, Bessel std sqrt(5/3) = 1.2909944; group 2 identical → zeros
    s = math.sqrt(5 / 3)
    expected = torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert adv[0].item() == pytest.approx(-1.161895, abs=1e-5)
    assert not torch.isnan(adv).any()


def test_group_advantages_mean_only_and_bad_sizes():
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 1.0]), 3, scale=False)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 4 - 5 / 3, -5 / 3, 1 - 5 / 3]))
    assert torch.equal(group_advantages([0.3, 0.9], 1), torch.zeros(2))
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages([1, 2, 3], 4)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, -1.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.5]))
    # k3: exp(ref-logp) - (ref-logp) - 1 → e^-1 + 1 - 1 = 0.367879, e^1 - 1 - 1 = 0.718282
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.allclose(k3, torch.tensor([math.exp(-1), math.e - 2]), atol=1e-6)
    assert torch.equal(kl_penalty(logp, ref, "low_var_kl"), k3)
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(2))


def test_k3_is_clamped():
    # ref - logp = 30 → clamped to 20 → e^20 - 21, then clamped to 10
    assert kl_penalty(torch.tensor([-40.0]), torch.tensor([-10.0]), "k3").item() == 10.0
    # ref - logp = -30 → clamped to -20 → e^-20 + 20 - 1 ≈ 19 → clamped to 10
    assert kl_penalty(torch.tensor([-10.0]), torch.tensor([-40.0]), "k3").item() == 10.0
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")


def test_aggregate_token_mean_and_seq_mean_token_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(16 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 10) / 2)
    assert aggregate(values, mask, "token-mean", normalizer=8).item() == pytest.approx(16 / 8)
    assert aggregate(values, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="seq-sum"):
        aggregate(values, mask, "seq-sum")


def test_policy_loss_gradient_on_policy_equals_minus_advantage_logprob_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.2, 0.4])

    logp = token_logprobs(logits, labels)
    loss, metrics = policy_loss(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, logits)

    logp2 = token_logprobs(logits, labels)
    reference = -(adv[:, None] * logp2 * mask).sum() / mask.sum()
    (grad_ref,) = torch.autograd.grad(reference, logits)

    assert torch.allclose(grad, grad_ref, atol=1e-6)
    assert loss.item() == pytest.approx(-(adv[:, None] * mask).sum().item() / 9, abs=1e-6)
    assert metrics == {"clip_frac": 0.0, "dual_clip_frac": 0.0, "approx_kl": 0.0}


def _per_token_loss(ratio: float, advantage: float, **clip) -> tuple[float, float, dict]:
    """Loss and d loss / d logp of one token with the given ratio and advantage."""
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(1, 1), torch.tensor([advantage]), torch.ones(1, 1), **clip)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


# The released clipping: ε_low 0.2, ε_high 0.3 (ratio kept in [0.8, 1.3]), dual clip 3.0.
@pytest.mark.parametrize("ratio, advantage, loss, grad, clipped, dual", [
    # A > 0, ratio above 1 + ε_high: the clipped ratio 1.3 is taken, no gradient
    (1.5, 1.0, -1.3, 0.0, 1.0, 0.0),
    # A > 0, ratio inside the range: -A·ρ, gradient -A·ρ
    (1.1, 1.0, -1.1, -1.1, 0.0, 0.0),
    # A > 0, ratio below 1 - ε_low: max(-0.5, -0.8) keeps the unclipped -0.5
    (0.5, 1.0, -0.5, -0.5, 0.0, 0.0),
    # A < 0, ratio below 1 - ε_low: max(0.5, 0.8) takes the clipped 0.8, no gradient
    (0.5, -1.0, 0.8, 0.0, 1.0, 0.0),
    # A < 0, ratio above 1 + ε_high but under the dual clip: max(1.5, 1.3) = 1.5, gradient -A·ρ
    (1.5, -1.0, 1.5, 1.5, 0.0, 0.0),
    # A < 0, ratio past the dual clip: min(4.0, 3·|A|) = 3.0, no gradient
    (4.0, -1.0, 3.0, 0.0, 0.0, 1.0),
    # A = -2, ratio 2.5: 5.0 is under the cap 6.0, dual clip inactive
    (2.5, -2.0, 5.0, 5.0, 0.0, 0.0),
    # A > 0 and a huge ratio: the dual clip only applies to negative advantages
    (4.0, 1.0, -1.3, 0.0, 1.0, 0.0),
])
def test_policy_loss_clip_branches_hand_computed(ratio, advantage, loss, grad, clipped, dual):
    got_loss, got_grad, m = _per_token_loss(ratio, advantage)
    assert got_loss == pytest.approx(loss, abs=1e-5)
    assert got_grad == pytest.approx(grad, abs=1e-5)
    assert m["clip_frac"] == clipped and m["dual_clip_frac"] == dual


def test_policy_loss_without_dual_clip_keeps_the_large_negative_term():
    # A = -1, ratio 4: max(4.0, 1.3) = 4.0, and its gradient -A·ρ = 4.0
    for off in (None, 0):
        loss, grad, m = _per_token_loss(4.0, -1.0, dual_clip=off)
        assert loss == pytest.approx(4.0, abs=1e-5) and grad == pytest.approx(4.0, abs=1e-5)
        assert m["dual_clip_frac"] == 0.0


def test_policy_loss_symmetric_clip_when_high_is_none():
    # ε_high = ε_low = 0.2: ratio 1.25 is clipped to 1.2 for A > 0
    loss, grad, m = _per_token_loss(1.25, 1.0, clip_ratio_low=0.2, clip_ratio_high=None)
    assert loss == pytest.approx(-1.2, abs=1e-5) and grad == 0.0 and m["clip_frac"] == 1.0
    # with the released ε_high 0.3 the same token is inside the range
    loss, grad, m = _per_token_loss(1.25, 1.0)
    assert loss == pytest.approx(-1.25, abs=1e-5) and m["clip_frac"] == 0.0


def test_policy_loss_mixes_branches_in_a_token_mean_and_reports_fractions():
    old = torch.zeros(1, 4)
    # ratios 1.5 (A>0: clipped to 1.3), 1.1 (A>0), 0.5 (A<0: clipped to 0.8), 4.0 (A<0: dual cap 3.0)
    logp = torch.log(torch.tensor([[1.5, 1.1, 0.5, 4.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 4))
    assert loss.item() == pytest.approx((-1.3 - 1.1 + 0.8 + 3.0) / 4, abs=1e-5)
    assert m["clip_frac"] == pytest.approx(0.5) and m["dual_clip_frac"] == pytest.approx(0.25)
    assert m["approx_kl"] == pytest.approx(-math.log(1.5 * 1.1 * 0.5 * 4.0) / 4, abs=1e-6)


def test_policy_loss_rejects_impossible_clip_settings():
    args = (torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(*args, dual_clip=0.5)
    with pytest.raises(ValueError, match="low"):
        policy_loss(*args, clip_ratio_low=1.0)


def test_kl_loss_is_masked_token_mean_of_k3():
    logp = torch.tensor([[-1.0, -2.0, -5.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert kl_loss(logp, ref, mask).item() == pytest.approx((math.exp(-1) + math.e - 2) / 2, abs=1e-6)


def test_token_logprobs_matches_log_softmax_and_ignores_negative_labels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[0, 6, 3], [2, -100, 5]])
    got = token_logprobs(logits, labels)
    full = torch.log_softmax(logits, -1)
    assert torch.allclose(got[0], full[0, [0, 1, 2], [0, 6, 3]], atol=1e-6)
    assert got[1, 1].item() == 0.0 and got.shape == (2, 3)


def test_entropy_of_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 4, 8)
    assert torch.allclose(entropy_from_logits(logits), torch.full((2, 4), math.log(8)))
    assert masked_entropy(logits, torch.ones(2, 4)).item() == pytest.approx(math.log(8))


def test_grpo_loss_of_micro_batches_adds_up_to_the_mini_batchs_loss():
    from aesformer.grpo import grpo_loss, kl_loss, policy_loss

    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    old = logp + 0.05 * torch.randn(4, 5)
    ref = logp + 0.1 * torch.randn(4, 5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 5)
    mask[1, 3:] = 0
    mask[3, 4:] = 0
    kw = dict(kl_coef=0.01, kl_estimator="low_var_kl", clip_ratio_low=0.2, clip_ratio_high=0.3, dual_clip=3.0)
    for mode in ("token-mean", "seq-mean-token-mean"):
        whole, _ = grpo_loss(logp, old, ref, adv, mask, mode=mode, batch_tokens=float(mask.sum()),
                             batch_sequences=4, sequences=4, **kw)
        parts = sum(grpo_loss(logp[i:i + 2], old[i:i + 2], ref[i:i + 2], adv[i:i + 2], mask[i:i + 2], mode=mode,
                              batch_tokens=float(mask.sum()), batch_sequences=4, sequences=2, **kw)[0]
                    for i in (0, 2))
        assert torch.allclose(whole, parts, atol=1e-6), mode
        pg, _ = policy_loss(logp, old, adv, mask, 0.2, 0.3, 3.0, mode=mode)
        assert torch.allclose(whole, pg + 0.01 * kl_loss(logp, ref, mask, "low_var_kl", mode=mode), atol=1e-6)
