"""The Megatron backend (megatron-core + megatron-bridge LoRA) on the CPU, one gloo process.

Tiny Qwen2 (q/k/v bias, tied embeddings) and Llama models built from config: Hugging Face and Megatron
score padded batches alike, LoRA starts as a no-op, the exported PEFT adapter reproduces Megatron+LoRA in
HF+PEFT and in vLLM, GRPO through `lora_rl.trainer.train` improves reward, checkpoints resume exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from lora_rl.backends import adapter_lora, make_backend
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import ConfigError, load_config
from lora_rl.lora import hf_target_names, inject_lora, load_adapter, megatron_target_names

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.bridge") is None:
    pytest.skip("megatron-core + megatron-bridge are not installed (README: Megatron)", allow_module_level=True)

FAMILIES = {
    "qwen2": lambda: Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    """A randomly initialised tiny model of one family, saved as an HF folder."""
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(FAMILIES[request.param](), dtype=torch.float32)
    with torch.no_grad():  # non-zero q/k/v biases (Qwen2) so their conversion is checked too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return folder


def _engine(model_dir, *overrides):
    """A Megatron engine as `train()` builds it: the HF model only as the adapter's shape, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = load_config(None, ["backend.name=megatron", "rollout.engine=vllm", f"model.path={model_dir}",
                                "lora.lora_rank=8", "lora.lora_alpha=16", *overrides])
    with init_empty_weights(include_buffers=False):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    torch.manual_seed(0)
    return make_backend("megatron", model=inject_lora(shape, adapter_lora(config)), config=config,
                        base_model_path=Path(model_dir))


def _padded_batch(vocab: int):
    """Prompts and completions of different lengths: right padding inside the batch."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 7, 5)]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (6, 2, 9)]
    return make_batch(prompts, completions, pad_id=0)


def _hf_logprobs(model, batch):
    with torch.no_grad():
        return token_logprobs(model.eval(), batch, 1.0, chunked=False)[0]


def _randomise_adapter(engine, scale=0.05):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in engine.params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_hf_and_megatron_logprobs_match_and_lora_starts_as_a_no_op(family_dir):
    engine = _engine(family_dir)
    hf = AutoModelForCausalLM.from_pretrained(family_dir)
    batch = _padded_batch(hf.config.vocab_size)
    mask = batch.completion_mask.bool()
    ours = engine.logprobs(batch, 1.0, with_grad=False)[0]
    with engine.reference():
        base = engine.logprobs(batch, 1.0, with_grad=False)[0]
    assert (ours - _hf_logprobs(hf, batch))[mask].abs().max() < 1e-5  # Megatron == HF on every real token
    assert torch.equal(ours, base)  # LoRA B starts at zero: the adapter changes nothing
    _randomise_adapter(engine)
    moved = engine.logprobs(batch, 1.0, with_grad=False)[0]
    assert (moved - ours)[mask].abs().max() > 1e-3  # ...and the test would see it if it did
    with engine.reference():  # the reference policy is still the base model
        assert torch.equal(engine.logprobs(batch, 1.0, with_grad=False)[0], base)


def test_exported_adapter_reproduces_megatron_lora_in_hf_peft(family_dir, tmp_path):
    engine = _engine(family_dir)
    _randomise_adapter(engine)
    out = engine.save_adapter(tmp_path / "adapter")
    saved = json.loads((out / "adapter_config.json").read_text())
    targets = {t.rsplit(".", 1)[-1] for t in saved["target_modules"]}
    assert targets == set(hf_target_names(megatron_target_names(["all-linear"])))
    hf = load_adapter(AutoModelForCausalLM.from_pretrained(family_dir), out)
    batch = _padded_batch(hf.config.vocab_size)
    mask = batch.completion_mask.bool()
    ours = engine.logprobs(batch, 1.0, with_grad=False)[0]
    assert (ours - _hf_logprobs(hf, batch))[mask].abs().max() < 1e-5
