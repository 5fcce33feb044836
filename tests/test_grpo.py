"""Tests for lora_rl.grpo against numbers worked by hand (arithmetic in comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_rl.grpo import (
    PolicyLossStats,
    entropy_from_logits,
    group_advantages,
    kl_estimate,
    masked_sum,
    policy_loss,
    token_mean,
)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        atol=atol,
        rtol=1e-5,
    )


# --------------------------------------------------------------------------- #
# group_advantages
# --------------------------------------------------------------------------- #


def test_group_advantages_unbiased_std():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    adv = group_advantages(rewards, 4)
    # group 1: mean 0.5, deviations ±0.5, unbiased var = 4 * 0.25 / 3 = 1/3,
    # std = sqrt(1/3) = 0.577350 -> 0.5 / 0.577350 = 0.866025 (eps 1e-6 negligible)
    # group 2: all equal -> exactly 0
    close(adv, [0.866025, -0.866025, -0.866025, 0.866025, 0, 0, 0, 0])
    assert adv.dtype == torch.float32
    assert torch.equal(adv[4:], torch.zeros(4))


def test_group_advantages_skewed_group():
    # [0, 0, 0, 3]: mean 0.75, deviations -.75 x3, 2.25; squares .5625 x3 + 5.0625
    # = 6.75; unbiased var 6.75 / 3 = 2.25, std 1.5 -> [-.5, -.5, -.5, 1.5]
    close(group_advantages(torch.tensor([0.0, 0, 0, 3]), 4), [-0.5, -0.5, -0.5, 1.5])


def test_group_advantages_no_std_scaling():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    # r - mean only: group 1 mean 0.5 -> ±0.5
    close(group_advantages(rewards, 4, scale_std=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])


def test_group_advantages_constant_group_exactly_zero():
    # 0.1 is not representable: mean([.1,.1,.1]) can differ from .1 by an ulp,
    # which / (0 + eps) would be noise; must be exactly 0 and never NaN (eps=0).
    for eps in (1e-6, 0.0):
        adv = group_advantages(torch.full((6,), 0.1), 3, eps=eps)
        assert torch.equal(adv, torch.zeros(6))


def test_group_advantages_int_and_bool_rewards():
    close(group_advantages(torch.tensor([True, False]), 2, scale_std=False), [0.5, -0.5])
    close(group_advantages(torch.tensor([2, 0]), 2, scale_std=False), [1.0, -1.0])


@pytest.mark.parametrize(
    "rewards, group_size, match",
    [
        (torch.zeros(4), 1, "group_size"),
        (torch.zeros(4), 0, "group_size"),
        (torch.zeros(7), 4, "not divisible"),
        (torch.zeros(2, 4), 4, "rewards must be 1-D"),
    ],
)
def test_group_advantages_bad_sizes(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


# --------------------------------------------------------------------------- #
# masked_sum / token_mean
# --------------------------------------------------------------------------- #


def test_token_mean_micro_batches_sum_to_batch_mean():
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # valid values 1, 2, 4: sum 7, count 3 -> 7/3
    close(token_mean(x, mask, 3), 7 / 3)
    # split rows into micro-batches: 3/3 + 4/3 = 7/3
    mb0 = token_mean(x[:1], mask[:1], 3)
    mb1 = token_mean(x[1:], mask[1:], torch.tensor(3))
    close(mb0, 1.0)
    close(mb1, 4 / 3)
    close(mb0 + mb1, 7 / 3)


def test_token_mean_all_masked_is_zero():
    x = torch.tensor([[float("nan"), float("inf")]])
    mask = torch.zeros(1, 2)
    for g in (0, 0.0, torch.tensor(0)):
        out = token_mean(x, mask, g)
        assert out.item() == 0.0


def test_masked_sum_ignores_nan_and_rejects_shape_mismatch():
    x = torch.tensor([1.0, float("nan"), -float("inf"), 2.0])
    assert masked_sum(x, torch.tensor([1, 0, 0, 1])).item() == 3.0
    with pytest.raises(ValueError, match="mask shape"):
        masked_sum(x, torch.ones(3))
    with pytest.raises(ValueError, match="global_tokens"):
        token_mean(x, torch.ones(4), -1)


# --------------------------------------------------------------------------- #
# kl_estimate
# --------------------------------------------------------------------------- #


def test_kl_estimators_hand_values():
    # log_ratio = logp - ref = [0.5, -1.0, 0.0]
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref = torch.tensor([[-1.5, -1.0, -0.3]])
    close(kl_estimate(logp, ref, "k1"), [[0.5, -1.0, 0.0]])
    # k2 = 0.5 * lr^2: 0.125, 0.5, 0
    close(kl_estimate(logp, ref, "k2"), [[0.125, 0.5, 0.0]])
    # k3 = e^-lr - 1 + lr: e^-0.5 - 0.5 = 0.606531 - 0.5 = 0.106531;
    # e^1 - 1 - 1 = 0.718282; e^0 - 1 + 0 = 0
    close(kl_estimate(logp, ref, "k3"), [[0.106531, 0.718282, 0.0]])


def test_k3_nonnegative_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 128, generator=g) * 5
    ref = torch.randn(64, 128, generator=g) * 5
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_k3_finite_at_extreme_log_ratios():
    logp = torch.tensor([100.0, -100.0])
    ref = torch.zeros(2)
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.isfinite(k3).all()
    # clamped to ±20: e^-20 - 1 + 20 = 19.000000002; e^20 - 1 - 20 = 485165174.4
    close(k3[0], 19.0)
    torch.testing.assert_close(k3[1], torch.tensor(485165174.4), rtol=1e-6, atol=0)


def test_k3_gradient_is_finite_and_matches_hand_value():
    # d k3 / d logp = 1 - e^-lr; at lr = 0.5: 1 - 0.606531 = 0.393469
    logp = torch.tensor([0.5], requires_grad=True)
    kl_estimate(logp, torch.zeros(1), "k3").sum().backward()
    close(logp.grad, [0.393469])


def test_kl_unknown_kind_and_shape_mismatch():
    with pytest.raises(ValueError, match=r"k1.*k2.*k3.*'k4'"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="ref_logp shape"):
        kl_estimate(torch.zeros(2), torch.zeros(3), "k1")


# --------------------------------------------------------------------------- #
# policy_loss
# --------------------------------------------------------------------------- #

CLIP_LOW, CLIP_HIGH = 0.2, 0.28  # ratio range [0.8, 1.28]


def _hand_batch():
    """2x3 batch; proximal log-probs are -1 everywhere, logp = -1 + log_ratio.

    row 0, A = +1:
      t0 lr 0.1  ratio e^.1  = 1.105171 in range     loss -1.105171  grad -1.105171/5 = -0.221034
      t1 lr 0.5  ratio e^.5  = 1.648721 > 1.28, A>0  clipped: -1.28  grad 0
      t2 masked, logp NaN                            loss 0          grad 0
    row 1, A = -2:
      t0 lr -0.5 ratio e^-.5 = 0.606531 < 0.8, A<0   unclipped 2*.606531 = 1.213061,
                                                     clipped 2*0.8 = 1.6 -> max = 1.6, clipped, grad 0
      t1 lr 0.0  ratio 1                             loss 2          grad 2*1/5 = 0.4
      t2 lr 0.3  ratio e^.3  = 1.349859 > 1.28, A<0  unclipped 2.699718 > clipped 2.56
                                                     -> NOT clipped (pessimistic max), grad 2*1.349859/5 = 0.539944
    valid tokens 5; sum = -1.105171 - 1.28 + 1.6 + 2 + 2.699718 = 3.914547; loss = 0.782909
    clip_fraction 2/5 = 0.4
    mean_ratio (1.105171 + 1.648721 + 0.606531 + 1 + 1.349859) / 5 = 5.710282 / 5 = 1.142056
    """
    log_ratio = torch.tensor([[0.1, 0.5, 0.0], [-0.5, 0.0, 0.3]])
    prox = torch.full((2, 3), -1.0)
    logp = (prox + log_ratio).clone()
    logp[0, 2] = float("nan")
    prox[0, 2] = float("-inf")
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    return logp, prox, adv, mask


def test_policy_loss_hand_example():
    logp, prox, adv, mask = _hand_batch()
    loss, per_token, stats = policy_loss(
        logp, prox, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=5
    )
    close(loss, 0.782909)
    close(per_token, [[-1.105171, -1.28, 0.0], [1.6, 2.0, 2.699718]])
    assert not per_token.requires_grad
    assert isinstance(stats, PolicyLossStats)
    close(stats.clip_fraction, 0.4)
    close(stats.importance_masked_fraction, 0.0)
    close(stats.mean_ratio, 1.142056)

    loss.backward()
    assert torch.isfinite(logp.grad).all()  # the NaN padding token did not leak
    close(logp.grad, [[-0.221034, 0.0, 0.0], [0.0, 0.4, 0.539944]])


def test_policy_loss_per_token_advantages_match_per_sequence():
    logp, prox, adv, mask = _hand_batch()
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=5)
    loss_seq, _, _ = policy_loss(logp, prox, adv, mask, **kw)
    # [B, T] advantages; a NaN under the mask must not leak either
    adv_tok = adv[:, None].expand(2, 3).clone()
    adv_tok[0, 2] = float("nan")
    loss_tok, _, _ = policy_loss(logp, prox, adv_tok, mask, **kw)
    close(loss_tok, loss_seq)
    close(loss_tok, 0.782909)


def test_policy_loss_global_tokens_scales_micro_batch():
    # Same batch as one of two equal micro-batches: global count 10 halves it.
    logp, prox, adv, mask = _hand_batch()
    loss, _, _ = policy_loss(
        logp, prox, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
        global_tokens=torch.tensor(10),
    )
    close(loss, 3.914547 / 10)


def test_policy_loss_on_policy_is_vanilla_policy_gradient():
    # First step: proximal == logp, ratio == 1 everywhere.
    logp = torch.tensor([[-0.7, -1.2], [-2.0, float("nan")]], requires_grad=True)
    prox = logp.detach().clone()
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([0.5, -1.5])
    loss, _, stats = policy_loss(
        logp, prox, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=3
    )
    # token advantages 0.5, 0.5, -1.5: mean -0.5/3 = -0.166667, loss = +0.166667
    close(loss, 1 / 6)
    close(stats.clip_fraction, 0.0)
    close(stats.mean_ratio, 1.0)
    loss.backward()
    # grad = -A * ratio / 3 = [[-1/6, -1/6], [0.5, 0]]
    close(logp.grad, [[-1 / 6, -1 / 6], [0.5, 0.0]])


def test_policy_loss_decoupled_behaviour_weights_and_cap():
    # On-policy w.r.t. proximal (ratio 1), A = +1 on 3 valid tokens.
    # behaviour weight w = exp(prox - behav); behav = prox - ln w for w = [1, 2, 0.5]
    prox = torch.tensor([[-1.0, -1.0, -1.0]])
    behav = prox - torch.log(torch.tensor([[1.0, 2.0, 0.5]]))
    mask = torch.ones(1, 3)
    adv = torch.tensor([1.0])
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=3)

    # no cap: per token -A * 1 * w = [-1, -2, -0.5]; loss -3.5/3 = -1.166667
    logp = prox.clone().requires_grad_(True)
    loss, per_token, stats = policy_loss(logp, prox, adv, mask, behaviour_logp=behav, **kw)
    close(per_token, [[-1.0, -2.0, -0.5]])
    close(loss, -3.5 / 3)
    close(stats.importance_masked_fraction, 0.0)
    loss.backward()
    close(logp.grad, [[-1 / 3, -2 / 3, -0.5 / 3]])  # -A * w / 3

    # cap 1.5: the w = 2 token is dropped but still counts in global_tokens:
    # per token [-1, 0, -0.5]; loss -1.5/3 = -0.5; dropped 1/3
    logp = prox.clone().requires_grad_(True)
    loss, per_token, stats = policy_loss(
        logp, prox, adv, mask, behaviour_logp=behav, importance_cap=1.5, **kw
    )
    close(per_token, [[-1.0, 0.0, -0.5]])
    close(loss, -0.5)
    close(stats.importance_masked_fraction, 1 / 3)
    loss.backward()
    close(logp.grad, [[-1 / 3, 0.0, -0.5 / 3]])


def test_policy_loss_cap_ignored_without_behaviour():
    logp, prox, adv, mask = _hand_batch()
    loss, _, stats = policy_loss(
        logp, prox, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=5,
        importance_cap=1.5,
    )
    close(loss, 0.782909)
    close(stats.importance_masked_fraction, 0.0)


def test_policy_loss_all_masked_is_zero_not_nan():
    logp = torch.full((2, 2), float("nan"), requires_grad=True)
    loss, per_token, stats = policy_loss(
        logp, torch.zeros(2, 2), torch.ones(2), torch.zeros(2, 2),
        clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=0,
    )
    assert loss.item() == 0.0
    assert torch.equal(per_token, torch.zeros(2, 2))
    assert stats.clip_fraction.item() == 0.0 and stats.mean_ratio.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 2))


def test_policy_loss_extreme_ratio_gives_finite_gradient():
    # log_ratio 200 would overflow exp() in float32 without the clamp.
    logp = torch.tensor([[199.0, 0.0]], requires_grad=True)
    prox = torch.tensor([[-1.0, 0.0]])
    for a in (1.0, -1.0):
        loss, _, _ = policy_loss(
            logp, prox, torch.tensor([a]), torch.ones(1, 2),
            clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=2,
        )
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(clip_low=0.0), "clip_low"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_high=0.0), "clip_high"),
        (dict(importance_cap=0.0), "importance_cap"),
    ],
)
def test_policy_loss_bad_hyperparameters(kwargs, match):
    args = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=1) | kwargs
    with pytest.raises(ValueError, match=match):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), **args)


def test_policy_loss_bad_shapes():
    kw = dict(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, global_tokens=1)
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, torch.zeros(3), z, **kw)
    with pytest.raises(ValueError, match="proximal_logp"):
        policy_loss(z, torch.zeros(2, 2), torch.zeros(2), z, **kw)
    with pytest.raises(ValueError, match="behaviour_logp"):
        policy_loss(z, z, torch.zeros(2), z, behaviour_logp=torch.zeros(3), **kw)


# --------------------------------------------------------------------------- #
# entropy_from_logits
# --------------------------------------------------------------------------- #


def test_entropy_uniform_is_log_v():
    # uniform over V = 7: H = -sum (1/7) ln(1/7) = ln 7 = 1.945910
    logits = torch.full((2, 3, 7), 3.0, dtype=torch.bfloat16)
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3) and h.dtype == torch.float32
    close(h, torch.full((2, 3), math.log(7)))


def test_entropy_with_banned_tokens_and_one_hot():
    # two live tokens of equal logit, rest -inf: H = ln 2 = 0.693147 (no NaN)
    logits = torch.tensor([[[0.0, 0.0, -float("inf"), -float("inf")]]])
    close(entropy_from_logits(logits), [[math.log(2)]])
    # near one-hot: H ~ 0
    close(entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])), [[0.0]])


def test_a_non_finite_minibatch_gradient_norm_is_the_step_s_grad_norm():
    """Two minibatches, the second skipped for a NaN norm: the step's grad_norm said 1.0 (Python's max ignores
    a NaN after the first element) while skipped_updates said 1."""
    import torch

    from lora_rl.config import load_config
    from lora_rl.trainer import UpdateTerms, update_stats

    config = load_config(None, [])
    mask = torch.ones(2, 3)
    terms = UpdateTerms(mask=mask, proximal=torch.zeros(2, 3), behaviour=torch.zeros(2, 3), reference=None,
                        advantages=torch.zeros(2))
    for norms in ([1.0, float("nan")], [float("nan"), 1.0]):
        out = update_stats({"loss": 0.0}, norms, terms, config)
        assert math.isnan(out["grad_norm"]) and out["skipped_updates"] == 1
    assert update_stats({"loss": 0.0}, [1.0, float("inf")], terms, config)["grad_norm"] == float("inf")
    assert update_stats({"loss": 0.0}, [1.0, 2.0], terms, config)["grad_norm"] == 2.0
