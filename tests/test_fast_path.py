"""The fast training path against plain PEFT on the CPU: adapters in the model dtype and the sliced
log-prob head must give the same log-probs and gradients as peft's defaults with full logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import lora_rl.batching
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import LoRAConfig
from lora_rl.lora import inject_lora


def _models(model_dir):
    torch.manual_seed(0)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    ours = inject_lora(AutoModelForCausalLM.from_pretrained(model_dir), LoRAConfig(lora_rank=8, lora_alpha=16))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same non-zero adapter in both
        for (name, p), (_, q) in zip(plain.named_parameters(), ours.named_parameters(), strict=True):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
                q.copy_(p)
    return plain, ours


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sliced_head_matches_plain_peft(random_model_dir, temperature, monkeypatch):
    plain, ours = _models(random_model_dir)
    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 7 * plain.config.vocab_size)  # 7-token slices
    batch = make_batch([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14, 15, 16, 17, 18]], 0)
    out = {}
    for name, model, chunked in (("plain", plain, False), ("ours", ours, True)):
        logp, entropy = token_logprobs(model, batch, temperature, with_entropy=True, chunked=chunked)
        (logp * batch.completion_mask).sum().backward()
        grads = {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
        out[name] = (logp.detach(), entropy, grads)
    # Stated tolerance: float32 on the CPU, slices change only the summation order of nothing but the head.
    torch.testing.assert_close(out["ours"][0], out["plain"][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out["ours"][1], out["plain"][1], atol=1e-6, rtol=0)
    assert sorted(out["ours"][2]) == sorted(out["plain"][2]) and len(out["ours"][2]) > 0
    for name, grad in out["plain"][2].items():
        torch.testing.assert_close(out["ours"][2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_small_logits_skip_the_slices(random_model_dir, monkeypatch):
    """Below one slice the plain path runs (no recompute cost); above it, the sliced head."""
    _, ours = _models(random_model_dir)
    calls = []
    monkeypatch.setattr(lora_rl.batching, "_chunked_token_logprobs", lambda *a: calls.append(1) or (None, None))
    batch = make_batch([[5, 6, 7]], [[8, 9]], 0)
    token_logprobs(ours, batch)
    assert calls == []
    monkeypatch.setattr(lora_rl.batching, "_CHUNK_ELEMENTS", 2)
    token_logprobs(ours, batch)
    assert calls == [1]


def test_generation_with_the_adapter_merged_leaves_the_base_exact(random_model_dir):
    """Merged sampling gives the same tokens and log-probs, and the frozen base comes back bit for bit."""
    from lora_rl.lora import merged_for_generation
    from lora_rl.rollout.base import SamplingParams
    from lora_rl.rollout.embedded import sample

    _, ours = _models(random_model_dir)
    ours = ours.to(torch.bfloat16)  # where an unmerge by subtraction would leave rounding in the base
    base = {n: p.detach().clone() for n, p in ours.named_parameters() if "lora_" not in n}
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=3)
    plain = sample(ours, [[5, 6, 7]], params, eos_id=2, pad_id=0)
    with merged_for_generation(ours):
        merged = sample(ours, [[5, 6, 7]], params, eos_id=2, pad_id=0)
    for a, b in zip(plain, merged, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=0.05, rtol=0)
    for name, p in ours.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name]), name
