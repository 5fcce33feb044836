"""The embedded engine samples from the trainer's model and reports the trainer's own log-probs."""

from __future__ import annotations

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
    engine, tokenizer, prompts = _engine(random_model_dir)
    eos = tokenizer.eos_token_id
    # Make EOS by far the likeliest token: every completion is [EOS], finished by "stop".
    with torch.no_grad():
        engine.model.get_output_embeddings().weight[eos] *= 0
        engine.model.get_output_embeddings().weight[eos] += 50 * engine.model.get_input_embeddings().weight.std()
    out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, temperature=0.0))
    for c in out:
        assert c.finish_reason == "stop" and c.token_ids[-1] == eos and len(c.logprobs) == len(c.token_ids)
    engine2, _, prompts2 = _engine(random_model_dir)
    long = engine2.generate(prompts2, SamplingParams(n=1, max_new_tokens=3, temperature=1.0))
    for c in long:
        assert (c.finish_reason == "length") == (eos not in c.token_ids)
        assert len(c.token_ids) <= 3


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _top_p_filter(probs, 0.7)  # 0.5 < 0.7, 0.5 + 0.3 crosses it: keep two tokens
    assert torch.equal(kept, torch.tensor([[0.5, 0.3, 0.0, 0.0]]))
