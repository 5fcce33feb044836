"""backend.cuda_graphs: layers replayed as CUDA graphs train exactly as the compiled layers do (GPU),
and the option refuses the combinations it cannot serve (CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora_rl.config import ConfigError, load_config


def test_cuda_graphs_refuse_activation_checkpointing():
    with pytest.raises(ConfigError, match=r"backend.cuda_graphs=True replays whole layers.*activation_checkpointing"):
        load_config(None, ["backend.cuda_graphs=true", "backend.activation_checkpointing=true"])


def test_cuda_graphs_are_ignored_on_the_cpu(random_model_dir):
    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.lora import inject_lora

    config = load_config(None, ["backend.cuda_graphs=true", "lora.lora_rank=4"])
    engine = FSDP2Engine(inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir), config.lora), config,
                         random_model_dir)
    assert engine.graphed is None


def _batches(vocab: int):
    from lora_rl.batching import make_batch

    g = torch.Generator().manual_seed(0)
    # Two shapes: the second update captures anew. Two micro-batches per update: gradients accumulate.
    for length in (9, 13):
        prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 6, (4,), generator=g)]
        completions = [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(4)]
        batch = make_batch(prompts, completions, pad_id=0)
        yield batch, torch.full(batch.completion_mask.shape, -2.0), torch.randn(4, generator=g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("use_lora", [True, False])
def test_graphed_updates_equal_the_compiled_ones(random_model_dir, use_lora):
    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.lora import inject_lora
    from lora_rl.trainer import grpo_update

    runs = []
    for graphs in (False, True):
        config = load_config(None, [f"backend.cuda_graphs={graphs}", f"lora.use_lora={use_lora}", "lora.lora_rank=4",
                                    "model.dtype=bfloat16", "train.micro_batch_size=2", "rollout.prompts_per_step=2",
                                    "rollout.group_size=2", "train.lr=1e-3", "grpo.log_kl=false"])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(random_model_dir, dtype=torch.bfloat16).cuda()
        if use_lora:
            model = inject_lora(model, config.lora)
            with torch.no_grad():  # non-zero lora_B: every adapter tensor gets a gradient
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        engine = FSDP2Engine(model, config, random_model_dir)
        assert (engine.graphed is not None) == graphs
        norms = []
        for batch, behaviour, advantages in _batches(model.config.vocab_size):
            norms.append(grpo_update(engine, batch, behaviour.cuda(), advantages.cuda(), config)["grad_norm"])
        if graphs:  # every layer of every training forward (2 micro-batches, 2 updates) replayed a graph
            assert engine.graphed.captures == 2
            assert engine.graphed.replays == 4 * model.config.num_hidden_layers
        runs.append((norms, {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}))
    (plain_norms, plain), (graphed_norms, graphed) = runs
    assert graphed_norms == pytest.approx(plain_norms, rel=1e-3)
    for name, tensor in plain.items():
        torch.testing.assert_close(graphed[name], tensor, atol=0, rtol=0, msg=name)
