"""GRPO math: group-relative advantages, token-level loss normalisation, KL
estimators and the (decoupled) PPO clipped surrogate.

Everything here is a pure function over tensors; nothing knows about models,
optimisers or ranks, so it can be tested with hand-worked numbers and reused
by any trainer loop.

Shapes: B = sequences in a micro-batch, T = tokens per sequence (prompt +
completion, padded), V = vocabulary, N = prompts, G = samples per prompt.

Where this departs from the papers:

* Advantages (DeepSeekMath GRPO, Shao et al. 2024) are
  ``(r - mean(group)) / (std(group) + eps)`` with the *unbiased* sample std
  (``n - 1`` denominator), as in DeepSeekMath's reference and TRL.
  ``scale_std=False`` drops the division, as recommended by Dr. GRPO
  (Liu et al. 2025) to avoid up-weighting near-solved / near-failed groups.
  A group whose rewards are all equal gets exactly zero advantage, not
  ``0 / eps`` noise.
* The loss is a token-level mean over the *global* batch (DAPO, Yu et al. 2025),
  not GRPO's per-sequence mean followed by a mean over sequences: every valid
  token of the update weighs the same, whatever its sequence length and
  whichever micro-batch / rank it lands on. The caller passes the global valid
  token count, so summing the per-micro-batch losses gives the batch mean and
  gradient accumulation needs no rescaling.
* Clipping uses separate low/high bounds (DAPO "clip-higher").
* Off-policy rollouts are corrected as in decoupled PPO (AReaL, Fu et al. 2025):
  the trust region is taken around the *proximal* policy (the policy at the
  start of this update), and each token is re-weighted by the behaviour
  importance weight ``pi_prox / pi_behav`` (the rollout engine that sampled
  it), with tokens over a cap dropped.
* The KL penalty is not built in: ``kl_estimate`` returns per-token Schulman
  estimators that the trainer may add to the per-token loss (or to the reward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PolicyLossStats",
    "entropy_from_logits",
    "group_advantages",
    "kl_estimate",
    "masked_sum",
    "policy_loss",
    "token_mean",
]

# Log-ratios are clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] before exp():
# on tokens where two policies disagree wildly (e.g. a sampler bug, or a token
# the trainer assigns ~0 probability) the difference of log-probs can reach
# hundreds and exp() overflows to inf in float32 (> ~88.7), which then turns
# into NaN in the backward pass (0 * inf). e^20 ~ 4.9e8 is far outside any clip
# range or importance cap, so the clamp changes no value that matters.
LOG_RATIO_CLAMP = 20.0

KL_KINDS = ("k1", "k2", "k3")


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #


def group_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages, one per sample.

    ``rewards`` is ``[N*G]`` ordered group by group: samples ``i*G .. i*G+G-1``
    answer the same prompt. Returns ``[N*G]`` float32 advantages
    ``r - mean(group)``, divided by ``std(group) + eps`` when ``scale_std``
    (std is the unbiased sample std, ``n - 1`` denominator, like DeepSeekMath
    and TRL). Groups with all-equal rewards carry no learning signal and get
    exactly zero.
    """
    if group_size < 2:
        # One sample per prompt has no group baseline (and an undefined
        # unbiased std).
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"len(rewards)={rewards.numel()} is not divisible by group_size={group_size}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    grouped = rewards.detach().float().view(-1, group_size)  # [N, G]
    adv = grouped - grouped.mean(dim=1, keepdim=True)  # [N, G]
    if scale_std:
        std = grouped.std(dim=1, keepdim=True, unbiased=True)  # [N, 1]
        adv = adv / (std + eps)
    # Equal rewards: the mean of e.g. [0.1, 0.1, 0.1] is not exactly 0.1 in
    # float, and (tiny residual) / (0 + eps) would be O(1e-2) noise. Zero the
    # group explicitly (this also keeps eps=0 from dividing 0 by 0).
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # [N, 1]
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.reshape(-1)  # [N*G]


# --------------------------------------------------------------------------- #
# Masked reductions
# --------------------------------------------------------------------------- #


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is nonzero (scalar).

    Uses ``torch.where`` rather than ``x * mask`` so inf/NaN in masked
    positions (padding, prompt tokens) cannot leak into the sum: NaN * 0 = NaN.
    """
    if x.shape != mask.shape:
        raise ValueError(f"x shape {tuple(x.shape)} != mask shape {tuple(mask.shape)}")
    return torch.where(mask.bool(), x, torch.zeros_like(x)).sum()


def token_mean(x: Tensor, mask: Tensor, global_tokens: float | Tensor) -> Tensor:
    """Token-level mean over the *global* batch: ``sum(x * mask) / global_tokens``.

    ``global_tokens`` is the number of valid tokens across every micro-batch
    (and rank) of this optimiser step, so the per-micro-batch results sum to
    the mean over the whole batch. A count of 0 is treated as 1: an all-masked
    batch (e.g. every completion truncated away) must give loss 0, not 0/0 = NaN
    that would poison the weights.
    """
    if isinstance(global_tokens, Tensor):
        denom = global_tokens.detach().to(torch.float32).clamp_min(1.0)
    else:
        if global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {global_tokens}")
        denom = max(float(global_tokens), 1.0)
    return masked_sum(x, mask) / denom


def _local_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over this micro-batch's valid tokens, for logging stats (0 if none)."""
    count = mask.bool().sum().clamp_min(1)
    return masked_sum(x.float(), mask) / count


# --------------------------------------------------------------------------- #
# KL
# --------------------------------------------------------------------------- #


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate ``[B, T]`` of KL(pi || pi_ref) from samples of pi.

    Schulman's estimators ("Approximating KL divergence", 2020), with
    ``log_ratio = logp - ref_logp`` = log(pi / pi_ref):

    * ``k1 = log_ratio``: unbiased, high variance, can be negative per token.
    * ``k2 = 0.5 * log_ratio**2``: biased, low variance, >= 0.
    * ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased (E_pi[pi_ref/pi] = 1)
      and always >= 0 (since e^x >= 1 + x); the GRPO paper's choice.

    Computed in float32. Masked positions are not special-cased: reduce with
    ``token_mean`` / ``masked_sum``, which ignore them even if they are NaN.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")
    if logp.shape != ref_logp.shape:
        raise ValueError(
            f"logp shape {tuple(logp.shape)} != ref_logp shape {tuple(ref_logp.shape)}"
        )
    log_ratio = logp.float() - ref_logp.float()  # [B, T]
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    # k3: exp(-log_ratio) overflows for log_ratio < -88 in float32; clamp
    # (both uses, so the estimate stays exactly of the form e^-x - 1 + x >= 0).
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(-log_ratio) - 1.0 + log_ratio


# --------------------------------------------------------------------------- #
# Policy loss
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class PolicyLossStats:
    """Diagnostics of one ``policy_loss`` call: detached float32 scalars,
    averaged over this micro-batch's valid tokens (not the global count)."""

    clip_fraction: Tensor  # fraction of valid tokens where the clipped branch was taken
    importance_masked_fraction: Tensor  # fraction of valid tokens dropped by the behaviour cap
    mean_ratio: Tensor  # mean of pi / pi_prox over valid tokens


def policy_loss(
    logp: Tensor,
    proximal_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float,
    clip_high: float,
    global_tokens: float | Tensor,
    behaviour_logp: Tensor | None = None,
    importance_cap: float | None = None,
) -> tuple[Tensor, Tensor, PolicyLossStats]:
    """(Decoupled) PPO clipped surrogate, token-mean over the global batch.

    Args:
        logp: ``[B, T]`` current-policy log-probs of the taken tokens (with grad).
        proximal_logp: ``[B, T]`` log-probs under the policy at the start of this
            update; the trust region is centred here. Treated as constant.
        advantages: ``[B]`` per sequence or ``[B, T]`` per token.
        mask: ``[B, T]`` nonzero for completion tokens that count.
        clip_low, clip_high: ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        global_tokens: valid tokens in the whole update (see ``token_mean``).
        behaviour_logp: ``[B, T]`` log-probs under the policy that sampled the
            tokens (the rollout engine). If given, each token's loss is
            multiplied by ``w = pi_prox / pi_behav`` (no grad), as in AReaL.
        importance_cap: tokens with ``w > importance_cap`` are dropped (weight 0).
            They still count in ``global_tokens``: the denominator is fixed
            before the loss is computed (it is all-reduced across ranks up
            front), and dropping a stale token should shrink the step, not
            re-weight the remaining tokens. Ignored when ``behaviour_logp`` is
            None (on-policy, w == 1).

    Returns:
        ``(loss, per_token_loss, stats)``: the scalar loss to backprop, the
        ``[B, T]`` detached per-token loss (0 at masked / dropped tokens) and
        ``PolicyLossStats``.

    Per token, with ``ratio = exp(logp - proximal_logp)``::

        loss_t = w * max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))

    When ``proximal_logp == logp`` (first step on fresh rollouts) the ratio is 1
    with gradient ``ratio * dlogp``, so this is the vanilla policy gradient
    ``-A * grad logp / global_tokens``.
    """
    if not 0.0 < clip_low < 1.0:
        raise ValueError(f"clip_low must be in (0, 1), got {clip_low}")
    if not clip_high > 0.0:
        raise ValueError(f"clip_high must be > 0, got {clip_high}")
    if importance_cap is not None and not importance_cap > 0.0:
        raise ValueError(f"importance_cap must be > 0 or None, got {importance_cap}")
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("proximal_logp", proximal_logp), ("mask", mask)) + (
        (("behaviour_logp", behaviour_logp),) if behaviour_logp is not None else ()
    ):
        if t.shape != logp.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logp shape {tuple(logp.shape)}")
    if advantages.shape == logp.shape[:1]:
        advantages = advantages.unsqueeze(-1)  # [B, 1], broadcast over T
    elif advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, "
            f"got shape {tuple(advantages.shape)}"
        )

    valid = mask.bool()  # [B, T]
    zeros = torch.zeros(logp.shape, dtype=torch.float32, device=logp.device)
    # Replace masked positions *before* any arithmetic: padding log-probs can
    # be inf/NaN, and although the forward value would be discarded later,
    # the backward pass through exp()/max() would still produce 0 * NaN = NaN
    # gradients. torch.where sends exactly 0 gradient to unselected entries.
    logp_f = torch.where(valid, logp.float(), zeros)  # [B, T]
    prox_f = torch.where(valid, proximal_logp.detach().float(), zeros)  # [B, T]
    adv = torch.where(valid, advantages.detach().float(), zeros)  # [B, T]

    log_ratio = (logp_f - prox_f).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = -adv * ratio  # [B, T]
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    # Pick the branch explicitly instead of torch.maximum: maximum splits the
    # gradient 50/50 on ties, and an explicit flag is also the clip statistic.
    # Strict '>' so ratios inside the range (equal branches) count as unclipped.
    took_clip = clipped > unclipped  # [B, T]
    per_token = torch.where(took_clip, clipped, unclipped)  # [B, T]

    dropped = torch.zeros_like(valid)  # [B, T] bool
    if behaviour_logp is not None:
        behav_f = torch.where(valid, behaviour_logp.detach().float(), zeros)
        w = torch.exp((prox_f - behav_f).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # [B, T]
        if importance_cap is not None:
            dropped = valid & (w > importance_cap)
            w = torch.where(dropped, zeros, w)
        per_token = per_token * w

    per_token = torch.where(valid, per_token, zeros)  # [B, T]
    loss = token_mean(per_token, valid, global_tokens)

    with torch.no_grad():
        stats = PolicyLossStats(
            clip_fraction=_local_mean(took_clip.float(), valid),
            importance_masked_fraction=_local_mean(dropped.float(), valid),
            mean_ratio=_local_mean(ratio.detach(), valid),
        )
    return loss, per_token.detach(), stats


# --------------------------------------------------------------------------- #
# Entropy
# --------------------------------------------------------------------------- #


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy ``[B, T, V] -> [B, T]`` of softmax(logits), in nats.

    Upcast to float32: bf16 log_softmax over a 100k+ vocabulary loses most of
    the mass in the tail. Logits of -inf (banned tokens) contribute 0, not
    0 * -inf = NaN. Note this materialises a float32 ``[B, T, V]`` copy; call it
    per micro-batch (under ``torch.no_grad()`` when only logging).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)  # [B, T]
