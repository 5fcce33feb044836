"""Supervised warm-start: a short next-token fit on (prompt, solution) pairs.

RL needs a policy that is sometimes right; a randomly initialised tiny model never is. The loss
covers solution tokens only (and the EOS that ends them), so the model learns to answer and stop.
"""

from __future__ import annotations

import math
import random

import torch
from tqdm.auto import tqdm

from lora_rl.batching import encode, make_batch, token_logprobs


def supervised_warmstart(model, tokenizer, pairs: list[tuple[str, str]], *, steps: int, batch_size: int,
                         lr: float, seed: int, progress: bool = True, desc: str = "warm-start") -> list[float]:
    """Fit `model` in place on prompt -> solution pairs; returns the loss per step."""
    if steps == 0:
        return []
    rng = random.Random(seed)
    encoded = [(encode(tokenizer, p), encode(tokenizer, s) + [tokenizer.eos_token_id]) for p, s in pairs]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # Linear warm-up then cosine decay: a short run still ends at a low, stable loss.
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        chosen = rng.sample(encoded, min(batch_size, len(encoded)))
        batch = make_batch([p for p, _ in chosen], [c for _, c in chosen], tokenizer.pad_token_id)
        logp, _ = token_logprobs(model, batch)
        loss = -(logp * batch.completion_mask).sum() / batch.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
