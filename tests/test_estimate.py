"""The memory estimator against measured peaks: CPU runs here, the GPU anchors of FIELD_NOTES section 6."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from transformers import AutoModelForCausalLM, LlamaConfig

from lora_rl.config import ConfigError, LoRAConfig, load_config
from lora_rl.estimate import (ModelShape, estimate_for_config, estimate_memory, lora_params, saved_per_token,
                              training_options)
from lora_rl.lora import inject_lora, trainable_parameters
from lora_rl.models import model_config

QWEN_1_5B = ModelShape(hidden_size=1536, layers=28, heads=12, kv_heads=2, head_dim=128, intermediate_size=8960,
                       vocab_size=151936, tied=True)
QWEN_7B = ModelShape(hidden_size=3584, layers=28, heads=28, kv_heads=4, head_dim=128, intermediate_size=18944,
                     vocab_size=152064, tied=False)
QWEN_0_5B = ModelShape(hidden_size=896, layers=24, heads=14, kv_heads=2, head_dim=64, intermediate_size=4864,
                       vocab_size=151936, tied=True)


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_match_real_models(tied):
    cfg = LlamaConfig(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=352, vocab_size=1000, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg)
    shape = ModelShape.from_config(cfg)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    for targets in (["all-linear"], ["q_proj", "v_proj"], ["down_proj"]):
        peft_model = inject_lora(AutoModelForCausalLM.from_config(cfg), LoRAConfig(lora_rank=8,
                                                                                   target_modules=tuple(targets)))
        assert lora_params(shape, 8, targets) == trainable_parameters(peft_model), targets
    with pytest.raises(ConfigError, match=r"\['lm_head'\] are not decoder linear layers"):
        lora_params(shape, 16, ["lm_head"])


@pytest.mark.parametrize(("shape", "kwargs", "measured_gib"), [
    # FIELD_NOTES section 6: one H100, batch 8 x 1024 (LoRA with bf16 adapters, as lora-rl keeps them).
    (QWEN_1_5B, dict(use_lora=False, micro_batch_size=8), 44.8),
    (QWEN_1_5B, dict(micro_batch_size=8), 37.8),
    # 7B shape, activation checkpointing, batch 4 x 1024 (plain-PEFT fp32 adapters: our estimate is low).
    (QWEN_7B, dict(use_lora=False, micro_batch_size=4, activation_checkpointing=True), 58.3),
    (QWEN_7B, dict(micro_batch_size=4, activation_checkpointing=True), 29.6),
    # Our own 2 x H200 FSDP2 benchmark (benchmarks/results/fsdp2_scaling_h200x2_qwen2.5-0.5b.json).
    (QWEN_0_5B, dict(micro_batch_size=4), 14.1),
    (QWEN_0_5B, dict(micro_batch_size=4, devices=2), 13.9),
])
def test_estimate_within_20_percent_of_gpu_measurements(shape, kwargs, measured_gib):
    # These runs materialised the logits (no chunking) and kept AdamW's state in bf16 (no master weights).
    estimate = estimate_memory(shape, dtype="bfloat16", seq_len=1024, chunked_logprobs=False, master_weights=False,
                               **kwargs)
    assert abs(estimate.total_gib / measured_gib - 1) < 0.20, (estimate.total_gib, measured_gib)


@pytest.mark.parametrize(("shape", "kwargs", "measured_gib"), [
    # benchmarks/results/train_step_h200_{1.5b_master_graphs,1.5b_budget_B,0.5b_master_graphs}.json: one H200,
    # 8 x 1024 tokens in one micro-batch, lora-rl's defaults (compiled layers, sliced log-prob head, float32
    # masters for full fine-tuning). Full fine-tuning is estimated ~5% high: the gradients it counts are
    # held at the peak when micro-batches accumulate, and a single micro-batch never holds them all.
    # LoRA's rows at budget 1 predate train.fused_mlp (which keeps no silu(gate)*up).
    (QWEN_1_5B, dict(use_lora=False, memory_budget=1.0), 37.5),
    (QWEN_1_5B, dict(memory_budget=1.0, fused_mlp=False), 19.7),
    (QWEN_1_5B, dict(use_lora=False, master_weights=False, memory_budget=1.0), 26.2),
    (QWEN_1_5B, dict(use_lora=False), 32.4),  # the default budget, 0.9
    (QWEN_1_5B, dict(), 14.5),
    (QWEN_1_5B, dict(), 13.9),  # with train.fused_mlp: train_step_h200_1.5b_fusedmlp3.json
    (QWEN_0_5B, dict(use_lora=False, memory_budget=1.0), 15.2),
    (QWEN_0_5B, dict(memory_budget=1.0, fused_mlp=False), 9.4),
])
def test_compiled_estimate_within_8_percent_of_gpu_measurements(shape, kwargs, measured_gib):
    estimate = estimate_memory(shape, dtype="bfloat16", micro_batch_size=8, seq_len=1024, compiled=True, **kwargs)
    assert abs(estimate.total_gib / measured_gib - 1) < 0.08, (estimate.total_gib, measured_gib)


_SAVED = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from lora_rl.backends.fsdp2 import compile_layers
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import LoRAConfig
from lora_rl.fused_lora import fuse_lora
from lora_rl.lora import inject_lora

class Recorder(torch.nn.Module):
    # Counts what one compiled decoder layer saves for its backward: the bytes of each distinct tensor.
    def __init__(self, layer, params):
        super().__init__()
        self.layer, self.params, self.saved = layer, params, {}

    def forward(self, *args, **kwargs):
        def pack(t):
            if t.data_ptr() not in self.params:
                self.saved[t.data_ptr()] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return self.layer(*args, **kwargs)

model_dir, budget, out = sys.argv[1], float(sys.argv[2]), {}
batch = make_batch([[5, 6, 7, 8, 9, 10, 11, 12]] * 4, [[13, 14, 15, 16, 17, 18, 19, 20]] * 4, 0)
for kind in ("lora", "full"):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "lora":
        model = inject_lora(model, LoRAConfig(lora_rank=4))
        fuse_lora(model)
    compile_layers(model, graphs=2, memory_budget=budget)
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    # The second layer: the first one's input needs no gradient under LoRA, so it saves less.
    layers[1] = recorder = Recorder(layers[1], {p.data_ptr() for p in model.parameters()})
    model.train()
    logp, _ = token_logprobs(model, batch, 1.0, chunked=False, compiled=True)
    (logp * batch.completion_mask).sum().backward()
    out[kind] = sum(recorder.saved.values()) / batch.input_ids.numel()
print(json.dumps(out))
"""


@pytest.mark.parametrize("budget", [1.0, 0.9])
def test_compiled_activation_count_is_what_a_compiled_layer_saves(random_model_dir, budget):
    """The estimator's per-token count for compiled layers against the tensors torch.compile's partitioner
    makes one decoder layer save (float32 on the CPU; the GPU keeps the same set, see the test above).
    Each budget compiles in its own process: layers of the same structure share one compiled graph."""
    run = subprocess.run([sys.executable, "-c", _SAVED, str(random_model_dir), str(budget)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    shape = ModelShape.from_config(model_config(str(random_model_dir)))
    for kind, rank in (("lora", 4), ("full", 0)):
        counted = 4 * saved_per_token(shape, compiled=True, memory_budget=budget, adapter_rank=rank)  # float32
        # Not counted: the attention's log-sum-exp and the norms' 1/rms, a few floats per token.
        assert 0.97 < counted / measured[kind] <= 1.0, (kind, counted, measured[kind])


def test_estimate_moves_the_right_way():
    base = dict(dtype="bfloat16", micro_batch_size=4, seq_len=1024, chunked_logprobs=False)
    lora, full = estimate_memory(QWEN_7B, **base), estimate_memory(QWEN_7B, use_lora=False, **base)
    assert full.total_gib - lora.total_gib > 40  # gradients and AdamW moments of 7.6B parameters
    # float32 masters and moments: 12 bytes per parameter instead of two bf16 moments' 4
    pure = estimate_memory(QWEN_7B, use_lora=False, master_weights=False, **base)
    assert full.trainable_gib - pure.trainable_gib == pytest.approx(8 * QWEN_7B.total_params() / 2 ** 30)
    assert estimate_memory(QWEN_7B, rank=64, **base).total_gib > lora.total_gib
    assert estimate_memory(QWEN_7B, devices=4, **base).weights_gib < lora.weights_gib / 3
    assert estimate_memory(QWEN_7B, activation_checkpointing=True, **base).activations_gib < lora.activations_gib / 5
    assert estimate_memory(QWEN_7B, cpu_offload=True, devices=2, **base).weights_gib < 1
    assert estimate_memory(QWEN_7B, **{**base, "chunked_logprobs": True}).logits_gib < lora.logits_gib / 8


_MEASURE = r"""
import json, os, resource, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from lora_rl.backends.fsdp2 import FSDP2Engine
from lora_rl.batching import make_batch
from lora_rl.config import load_config
from lora_rl.lora import inject_lora
from lora_rl.trainer import grpo_update
use_lora, shape = sys.argv[1] == "lora", json.loads(sys.argv[2])
torch.manual_seed(0)
# The resident memory now, not the peak so far: imports can peak above where they settle (0.93 against 0.41 GiB
# in a process started after the Megatron and multi-LoRA tests), which would hide that much of the update's peak.
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30  # GiB
cfg = LlamaConfig(**shape, max_position_embeddings=512)
config = load_config(None, [f"lora.use_lora={use_lora}", "train.micro_batch_size=8", "rollout.prompts_per_step=2",
                            "rollout.group_size=4", "grpo.log_kl=false", f"train.chunked_logprobs={sys.argv[3]}"])
model = AutoModelForCausalLM.from_config(cfg)
if use_lora:
    model = inject_lora(model, config.lora)
engine = FSDP2Engine(model, config, ".")
half = 128
prompts = [torch.randint(0, cfg.vocab_size, (half,)).tolist() for _ in range(8)]
batch = make_batch(prompts, prompts, pad_id=0)
for _ in range(2):  # the second update is the steady state: AdamW moments exist before its backward
    grpo_update(engine, batch, torch.full(batch.completion_mask.shape, -9.0), torch.randn(8), config)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before))
"""


@pytest.mark.parametrize(("use_lora", "chunked"), [(True, True), (False, True), (True, False)])
def test_estimate_within_30_percent_of_a_cpu_run(use_lora, chunked):
    """Peak RSS growth of one real GRPO update in a fresh process (float32, 8 x 256 tokens)."""
    shape = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1408, vocab_size=16000, tie_word_embeddings=False)
    out = subprocess.run([sys.executable, "-c", _MEASURE, "lora" if use_lora else "full", json.dumps(shape),
                          str(chunked).lower()],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = float(out.stdout.strip().splitlines()[-1])
    model_shape = ModelShape(hidden_size=512, layers=6, heads=8, kv_heads=4, head_dim=64, intermediate_size=1408,
                             vocab_size=16000, tied=False)
    estimate = estimate_memory(model_shape, use_lora=use_lora, dtype="float32", micro_batch_size=8, seq_len=256,
                               chunked_logprobs=chunked)
    assert abs(estimate.total_gib / measured - 1) < 0.30, (estimate.as_dict(), measured)


def test_estimate_for_a_run_config():
    config = load_config(None, ["model.path=tiny-arith", "lora.lora_rank=8"])
    estimate = estimate_for_config(config)
    assert estimate.trainable_params == lora_params(ModelShape.from_config(model_config("tiny-arith")), 8,
                                                    ["all-linear"])
    assert 0 < estimate.total_gib < 1


@pytest.mark.parametrize("gpus", [4, 8])
def test_the_72b_recipes_fit_80gb_cards_with_lora_and_full_finetuning_does_not(gpus, capsys):
    """examples/qwen2.5_72b_lora_{4,8}gpu.yaml carry Qwen2.5-72B's real shape; the CLI says what fits."""
    from pathlib import Path

    from lora_rl.cli import main

    recipe = Path(__file__).resolve().parents[1] / "examples" / f"qwen2.5_72b_lora_{gpus}gpu.yaml"
    config = load_config(str(recipe), [])
    assert config.rollout.prompts_per_step * config.rollout.group_size == 4 * gpus  # 4 sequences per GPU
    shape = ModelShape.from_config(model_config(config.model.path))
    assert 72e9 < shape.total_params() < 73.5e9  # Qwen2.5-72B: 72.7B parameters
    assert main(["estimate", str(recipe), "--devices", str(gpus), "--seq-len", "1024", "--gib-per-device", "80"]) == 0
    lora_line, full_line = [line for line in capsys.readouterr().out.splitlines()
                            if line.startswith(("LoRA", "full"))]
    assert "yes:" in lora_line and float(lora_line.split()[-4]) < 80
    # Full fine-tuning holds bf16 weights and gradients plus float32 masters and moments (16 bytes a
    # parameter): ~280 GiB a card on 4, ~146 on 8. (With pure bf16 AdamW, 8 cards would squeeze it in.)
    assert float(full_line.split("over by ")[1]) > (200 if gpus == 4 else 60)


def test_megatron_holds_the_whole_model_per_process_and_forms_plain_logits():
    """train() runs Megatron with tensor_parallel=1, data parallel: every process holds the whole base
    model, its adapters and their optimizer state, and Megatron's log-probs go through full logits."""
    recipe = "examples/qwen2.5_72b_lora_4gpu.yaml"  # Qwen2.5-72B's shape, bf16
    fsdp2 = estimate_for_config(load_config(recipe), devices=4, seq_len=1024)
    megatron = estimate_for_config(load_config(recipe, ["backend.name=megatron", "rollout.engine=vllm"]), devices=4,
                                   seq_len=1024)
    assert megatron.weights_gib == pytest.approx(megatron.total_params * 2 / 2 ** 30)
    assert megatron.weights_gib > 3 * fsdp2.weights_gib
    plain = estimate_for_config(load_config(recipe, ["train.chunked_logprobs=false"]), devices=4, seq_len=1024)
    assert megatron.logits_gib == plain.logits_gib > fsdp2.logits_gib
    assert megatron.trainable_gib == pytest.approx(4 * fsdp2.trainable_gib)


def test_megatron_targets_count_what_megatron_trains():
    """A q_proj target adapts Megatron's fused linear_qkv (q, k and v); Megatron names are counted too."""
    shape = ModelShape.from_config(model_config("tiny-arith"))
    qv = ["model.path=tiny-arith", "lora.lora_rank=8", "lora.target_modules=[q_proj,v_proj]"]
    assert estimate_for_config(load_config(None, qv)).trainable_params == lora_params(shape, 8, ["q_proj", "v_proj"])
    assert estimate_for_config(load_config(None, [*qv, "backend.name=megatron", "rollout.engine=vllm"])).trainable_params == \
        lora_params(shape, 8, ["q_proj", "k_proj", "v_proj"])
    names = ["model.path=tiny-arith", "lora.lora_rank=8", "lora.target_modules=[linear_qkv,linear_fc1]"]
    assert estimate_for_config(load_config(None, [*names, "backend.name=megatron", "rollout.engine=vllm"])).trainable_params == \
        lora_params(shape, 8, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])


def test_the_micro_batch_is_at_most_a_minibatch():
    """grpo.minibatches splits each rank's batch before the micro-batches (trainer.grpo_update)."""
    one = load_config("examples/quickstart.yaml", ["train.micro_batch_size=64"])
    four = load_config("examples/quickstart.yaml", ["train.micro_batch_size=64", "grpo.minibatches=4"])
    batch = one.rollout.prompts_per_step * one.rollout.group_size
    assert training_options(one)["micro_batch_size"] == min(64, batch)
    assert training_options(four)["micro_batch_size"] == min(64, batch // 4)
    assert estimate_for_config(four).activations_gib < estimate_for_config(one).activations_gib


def test_a_device_count_the_batch_does_not_split_over_is_refused(capsys):
    """`train --nproc 3` refuses 16 prompts per step; the estimate for 3 devices must not count a run that
    cannot start (it split 128 sequences into 42 per device, which no run does)."""
    from lora_rl.cli import main

    config = load_config("examples/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"rollout.prompts_per_step=16 does not split over 3 processes"):
        estimate_for_config(config, devices=3)
    assert main(["estimate", "examples/quickstart.yaml", "--devices", "3"]) == 2
    assert "use a multiple of 3" in capsys.readouterr().err
    assert estimate_for_config(config, devices=4).total_gib > 0


def test_no_reshard_after_forward_keeps_the_whole_model_gathered():
    base = dict(dtype="bfloat16", devices=4, seq_len=1024)
    resharded = estimate_memory(QWEN_7B, **base)
    kept = estimate_memory(QWEN_7B, reshard_after_forward=False, **base)
    assert kept.weights_gib == pytest.approx(resharded.weights_gib - 2 * QWEN_7B.layer_params() * 2 / 2 ** 30
                                             + QWEN_7B.total_params() * 2 / 2 ** 30)


def test_fused_layouts_names_are_counted_with_their_fused_shapes():
    """Phi-3 fuses q, k, v (qkv_proj) and gate, up (gate_up_proj): one adapter on each fused layer."""
    h, r = QWEN_7B.hidden_size, 8
    qkv_out = (QWEN_7B.heads + 2 * QWEN_7B.kv_heads) * QWEN_7B.head_dim
    assert lora_params(QWEN_7B, r, ["qkv_proj"]) == QWEN_7B.layers * r * (h + qkv_out)
    assert lora_params(QWEN_7B, r, ["gate_up_proj", "down_proj"]) == \
        QWEN_7B.layers * r * (h + 2 * QWEN_7B.intermediate_size + QWEN_7B.intermediate_size + h)


def test_all_linear_on_a_fused_layout_counts_the_fused_layers():
    """all-linear on Phi-3 adapts its four linears (qkv_proj, o_proj, gate_up_proj, down_proj), not seven:
    counting q, k, v, gate and up apart put the adapter 21% high here (19% on Phi-3-mini's shape)."""
    from transformers import Phi3Config

    cfg = Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=160, vocab_size=500, pad_token_id=0)
    shape = ModelShape.from_config(cfg)
    assert shape.total_params() == sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    for targets in (["all-linear"], ["qkv_proj"], ["gate_up_proj", "down_proj"]):
        peft_model = inject_lora(AutoModelForCausalLM.from_config(cfg), LoRAConfig(lora_rank=8,
                                                                                   target_modules=tuple(targets)))
        assert lora_params(shape, 8, targets) == trainable_parameters(peft_model), targets
    # train.fused_mlp fuses separate gate_proj/up_proj/down_proj only: Phi-3's MLP keeps silu(gate)*up
    assert saved_per_token(shape, compiled=True, memory_budget=1.0, adapter_rank=8) == \
        saved_per_token(shape, compiled=True, memory_budget=1.0, adapter_rank=8, fused_mlp=False)
    assert saved_per_token(shape, compiled=True, memory_budget=1.0, adapter_rank=8) - \
        saved_per_token(shape, compiled=True, memory_budget=1.0, adapter_rank=0) == 4 * 8  # four adapters


def test_a_model_that_transforms_its_logits_is_counted_with_plain_logits(monkeypatch):
    """Gemma-2's softcapping and Cohere's (or a scaled Granite's) logit scale act on the head's output, which
    the sliced head cannot see: lora_rl.batching runs those models' plain logits whatever
    train.chunked_logprobs says, so the estimate must count them (at Gemma-2's 256k vocabulary, 8 x 1024
    tokens, 29 GiB against the 0.9 GiB of one slice)."""
    import transformers

    from lora_rl import batching

    monkeypatch.setattr(batching, "_CHUNK_ELEMENTS", 1000)  # slice even a tiny batch
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, vocab_size=500)
    for cfg in (transformers.Gemma2Config(**common, head_dim=16), transformers.CohereConfig(**common),
                transformers.GraniteConfig(**common, logits_scaling=8.0), transformers.GraniteConfig(**common),
                transformers.Gemma3TextConfig(**common, head_dim=16), LlamaConfig(**common)):
        model = AutoModelForCausalLM.from_config(cfg)
        batching.token_logprobs(model, batching.make_batch([[5, 6, 7]] * 2, [[8, 9]] * 2, 0), 1.0, chunked=True)
        plain = getattr(model, "_lora_rl_transforms_logits", False)
        shape = ModelShape.from_config(cfg)
        chunked, full = (estimate_memory(shape, seq_len=4096, chunked_logprobs=flag) for flag in (True, False))
        assert (chunked.logits_gib == full.logits_gib) == plain, type(cfg).__name__
    assert plain is False  # Llama: sliced


def test_the_fused_mlp_is_counted_where_train_fused_mlp_fuses_it():
    """train.fused_mlp fuses SiLU-gated MLPs with separate gate, up and down linears only: Gemma's GELU MLPs
    (and Phi-3's fused gate_up_proj) keep silu(gate)*up's place among the saved activations, a fifth of a
    Gemma-2-2B layer's at compile_memory_budget=1."""
    import transformers

    from lora_rl.fused_mlp import fuse_mlp

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=160, vocab_size=500)
    for cfg in (LlamaConfig(**common), transformers.Qwen2Config(**common),
                transformers.GemmaConfig(**common, head_dim=16), transformers.Gemma2Config(**common, head_dim=16),
                transformers.Phi3Config(**common, pad_token_id=0)):
        fused = fuse_mlp(inject_lora(AutoModelForCausalLM.from_config(cfg), LoRAConfig(lora_rank=8))) > 0
        shape = ModelShape.from_config(cfg)
        with_fused, without = (saved_per_token(shape, compiled=True, memory_budget=1.0, adapter_rank=8, fused_mlp=flag)
                               for flag in (True, False))
        assert (with_fused < without) == fused, type(cfg).__name__


def test_a_decoder_without_a_gated_mlp_is_refused():
    """GPT-NeoX has hidden_size, intermediate_size... but a two-layer MLP: counting gate, up and down
    would put its parameters 25% high."""
    from transformers import GPTNeoXConfig

    with pytest.raises(ConfigError, match="GPTNeoXConfig has a two-layer MLP"):
        ModelShape.from_config(GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=256, vocab_size=1000))
