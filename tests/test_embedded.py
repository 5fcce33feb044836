"""The embedded engine samples from the trainer's model and reports the trainer's own log-probs."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_rl.batching import encode, make_batch, token_logprobs
from lora_rl.config import LoRAConfig
from lora_rl.lora import inject_lora
from lora_rl.rollout import SamplingParams
from lora_rl.rollout.embedded import EmbeddedEngine, _top_p_filter
from lora_rl.tasks import format_prompt


def _engine(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = inject_lora(AutoModelForCausalLM.from_pretrained(folder), LoRAConfig(lora_rank=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    prompts = [encode(tokenizer, format_prompt(q)) for q in
               ("Tom has 3 apples and gets 4 more. How many apples does Tom have?", "What is 2+2?", "Hi")]
    return EmbeddedEngine(model, tokenizer), tokenizer, prompts


def test_sampled_logprobs_match_the_trainer_at_the_sampling_temperature(random_model_dir):
    engine, tokenizer, prompts = _engine(random_model_dir)
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.7, seed=3)
    completions = engine.generate(prompts, params)
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    batch = make_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions],
                       tokenizer.pad_token_id)
    with torch.no_grad():
        trainer, _ = token_logprobs(engine.model, batch, temperature=0.7)
    for row, c in enumerate(completions):
        start = len(prompts[c.prompt_index]) - 1  # left-padded KV-cache decode vs right-padded full forward
        torch.testing.assert_close(trainer[row, start:start + len(c.token_ids)], torch.tensor(c.logprobs),
                                   atol=2e-5, rtol=0)


def test_sampling_is_reproducible_per_seed_and_greedy_is_deterministic(random_model_dir):
    engine, _, prompts = _engine(random_model_dir)
    a = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=11))
    b = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=11))
    c = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10, seed=12))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    g1 = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=10, temperature=0.0, seed=1))
    g2 = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=10, temperature=0.0, seed=2))
    assert [x.token_ids for x in g1] == [x.token_ids for x in g2]


def test_completions_stop_at_eos_and_report_why(random_model_dir):
    engine, _, prompts = _engine(random_model_dir)
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    first = engine.generate(prompts, greedy)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 6 for c in first
               if not set(engine.eos_id) & set(c.token_ids))
    # Declare a token greedy decoding emits for prompt 0 to be EOS: that row must stop at its first occurrence.
    engine.eos_id = first[0].token_ids[1]
    stop_at = first[0].token_ids.index(engine.eos_id) + 1
    again = engine.generate(prompts, greedy)
    assert again[0].token_ids == first[0].token_ids[:stop_at] and again[0].finish_reason == "stop"
    for c in again:
        assert len(c.logprobs) == len(c.token_ids)
        assert (c.finish_reason == "stop") == (c.token_ids[-1] == engine.eos_id)
        assert engine.eos_id not in c.token_ids[:-1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _top_p_filter(probs, 0.7)  # 0.5 < 0.7, 0.5 + 0.3 crosses it: keep two tokens
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
    # A set that reaches p exactly is complete (as in Hugging Face and vLLM): the next token is not kept.
    assert torch.equal(_top_p_filter(torch.tensor([[0.5, 0.25, 0.25]]), 0.5), torch.tensor([[0.5, 0.0, 0.0]]))
    assert torch.equal(_top_p_filter(torch.tensor([[0.25] * 4]), 0.5), torch.tensor([[0.25, 0.25, 0.0, 0.0]]))


def test_the_generation_configs_end_of_turn_ids_stop_a_completion(random_model_dir):
    """An instruct model's end-of-turn token is often only in generation_config.eos_token_id (Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>): HF generate and vLLM stop there, and so must the embedded engine,
    or completions run on to max_new_tokens with junk after the answer."""
    engine, tokenizer, prompts = _engine(random_model_dir)
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    first = engine.generate(prompts, greedy)
    end_of_turn = first[0].token_ids[1]
    engine.model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    again = EmbeddedEngine(engine.model, tokenizer).generate(prompts, greedy)
    assert again[0].token_ids == first[0].token_ids[:first[0].token_ids.index(end_of_turn) + 1]
    assert again[0].finish_reason == "stop"


def _tiny(config_class, **settings):
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, **settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights: attention scores that a window or a soft cap changes
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return model


def test_a_sequence_past_a_sliding_window_is_refused():
    """The sampler's mask spans the whole sequence: past a sliding window it would sample from another model
    than the trainer scores (Mistral, Gemma 2/3, Qwen2 with use_sliding_window)."""
    from transformers import MistralConfig, Qwen2Config

    from lora_rl.rollout.base import RolloutError
    from lora_rl.rollout.embedded import sample

    model, prompts = _tiny(MistralConfig, sliding_window=8), [list(range(10, 14))]
    with pytest.raises(RolloutError, match=r"reach 20 tokens .* past the model's sliding attention window of 8 "
                                           r"tokens.*rollout.engine=vllm"):
        sample(model, prompts, SamplingParams(n=1, max_new_tokens=16, seed=0), eos_id=2, pad_id=0)
    inside = sample(model, prompts, SamplingParams(n=1, max_new_tokens=4, seed=0), eos_id=2, pad_id=0)
    batch = make_batch(prompts, [inside[0].token_ids], 0)
    with torch.no_grad():
        trainer, _ = token_logprobs(model, batch, temperature=1.0)
    torch.testing.assert_close(trainer[0, 3:3 + len(inside[0].token_ids)], torch.tensor(inside[0].logprobs),
                               atol=2e-5, rtol=0)
    qwen2 = _tiny(Qwen2Config, sliding_window=4, use_sliding_window=False)  # the window is off: no limit
    sample(qwen2, prompts, SamplingParams(n=1, max_new_tokens=16, seed=0), eos_id=2, pad_id=0)


def test_attention_soft_capping_applies_to_every_sampled_token():
    """Gemma 2 soft-caps its attention logits; the grouped decode attention did not, so every token after
    the first was sampled from another distribution than the trainer's (0.003-0.03 in log-prob here)."""
    from transformers import Gemma2Config

    from lora_rl.rollout.embedded import sample

    model = _tiny(Gemma2Config, head_dim=16, sliding_window=4096, attn_logit_softcapping=0.05)
    prompts = [list(range(10, 14)), list(range(20, 40))]
    completions = sample(model, prompts, SamplingParams(n=1, max_new_tokens=10, seed=0), eos_id=2, pad_id=0)
    batch = make_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions], 0)
    with torch.no_grad():
        trainer, _ = token_logprobs(model, batch, temperature=1.0)
    for row, c in enumerate(completions):
        start = len(prompts[c.prompt_index]) - 1
        torch.testing.assert_close(trainer[row, start:start + len(c.token_ids)], torch.tensor(c.logprobs),
                                   atol=2e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("merge", [False, True])
def test_cuda_graph_decoding_samples_what_eager_decoding_samples(random_model_dir, merge, monkeypatch):
    """On a GPU each generated token's forward replays one CUDA graph per rollout (counted), and the
    tokens and log-probs equal those of eager decoding, with the adapter merged or not."""
    from lora_rl.lora import merged_for_generation

    engine, _, prompts = _engine(random_model_dir)
    engine.model.cuda()
    params = SamplingParams(n=3, max_new_tokens=12, temperature=0.7, seed=3)
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: replays.append(1) or replay(g))
    out = {}
    for graphs in (False, True):
        engine.cuda_graphs = graphs
        with merged_for_generation(engine.model) if merge else contextlib.nullcontext():
            out[graphs] = engine.generate(prompts, params)
    assert len(replays) == 11  # one per generated token after the first, graphs only
    assert [c.token_ids for c in out[True]] == [c.token_ids for c in out[False]]
    for a, b in zip(out[True], out[False], strict=True):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_a_decode_forward_that_cannot_be_captured_names_the_switch(monkeypatch):
    """A capture failure (faked here: CPU machines have no CUDA graphs) stops with rollout.cuda_graphs
    and how to turn it off, not with the bare CUDA error."""
    from lora_rl.rollout import embedded

    class Stream:
        def wait_stream(self, other):
            pass

    class Capture:
        def __init__(self, graph):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    with pytest.raises(RuntimeError, match=r"rollout.cuda_graphs=true: .*stream is capturing.*rollout.cuda_graphs=false"):
        embedded._decode_runner(lambda: torch.zeros(2, 3), graphs=True)
