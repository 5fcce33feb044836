"""The Megatron backend (megatron-core + megatron-bridge LoRA) on the CPU, one gloo process.

Tiny Qwen2 (q/k/v bias, tied embeddings), Llama and Qwen3 (q/k norms) models built from config: Hugging Face and Megatron
score padded batches alike, LoRA starts as a no-op, the exported PEFT adapter reproduces Megatron+LoRA in
HF+PEFT and in vLLM (inside `lora_rl.trainer.train`), GRPO updates raise expected reward, checkpoints resume
exactly.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from lora_rl.backends import adapter_lora, make_backend
from lora_rl.batching import make_batch, token_logprobs
from lora_rl.config import ConfigError, load_config
from lora_rl.lora import hf_target_names, inject_lora, load_adapter, megatron_target_names

if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.bridge") is None:
    pytest.skip("megatron-core + megatron-bridge are not installed (README: Megatron)", allow_module_level=True)

# Non-default RoPE base and norm epsilon: a converter that drops either (megatron-bridge 0.3.1 misses
# transformers 5's rope_parameters) fails the parity test.
FAMILIES = {
    "qwen2": lambda: Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-5),
    "llama": lambda: LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=False, rope_theta=100000.0, rms_norm_eps=1e-5),
    # Qwen3: q/k norms, an explicit head_dim, no q/k/v biases.
    "qwen3": lambda: Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                                 tie_word_embeddings=True, rope_theta=50000.0, rms_norm_eps=1e-5),
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


def _rewarded_batch(vocab: int):
    """A fixed rollout batch: 2 prompts x 4 completions with rewards, and its group advantages."""
    from lora_rl import grpo

    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, vocab, (5,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 7, (8,), generator=g)]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    batch = make_batch([prompts[i // 4] for i in range(8)], completions, pad_id=0)
    return batch, rewards, grpo.group_advantages(rewards, 4, scale_std=True)


def test_grpo_updates_raise_expected_reward(family_dir):
    """A few GRPO updates on a fixed batch: rewarded completions become likelier, unrewarded ones less likely,
    so the expected reward over each group's completions (weighted by their per-token probability) goes up."""
    from lora_rl.trainer import grpo_update

    engine = _engine(family_dir, "train.lr=1e-2", "train.micro_batch_size=4", "grpo.minibatches=2",
                     "rollout.prompts_per_step=2", "rollout.group_size=4")
    batch, rewards, advantages = _rewarded_batch(engine.vocab)
    mask = batch.completion_mask

    def sequence_logprobs():  # mean token log-prob per completion [B]: length-normalised
        return (engine.logprobs(batch, 1.0, with_grad=False)[0] * mask).sum(-1) / mask.sum(-1)

    def expected_reward(logp):  # within each group: the completions' probabilities, renormalised
        return float((torch.softmax(logp.view(2, 4), -1) * rewards.view(2, 4)).sum(-1).mean())

    before = sequence_logprobs()
    for _ in range(4):
        behaviour = engine.logprobs(batch, 1.0, with_grad=False)[0]  # on-policy, as if just sampled
        stats = grpo_update(engine, batch, behaviour, advantages, engine.config)
        assert stats["skipped_updates"] == 0 and stats["grad_norm"] > 0
    after = sequence_logprobs()
    assert expected_reward(after) > expected_reward(before) + 0.05, (expected_reward(before), expected_reward(after))
    assert bool(((after - before) * advantages > 0).all())  # every completion moved the way its advantage says


def test_checkpoint_resume_restores_adapter_and_optimizer(family_dir, tmp_path):
    """Save after one update, run a second; a fresh engine loaded from the checkpoint repeats the second exactly."""
    from lora_rl.trainer import grpo_update

    overrides = ("train.micro_batch_size=4", "grpo.minibatches=2", "rollout.prompts_per_step=2", "rollout.group_size=4")
    batch, _, advantages = _rewarded_batch(320)
    behaviour = torch.full(batch.completion_mask.shape, -2.0)
    first = _engine(family_dir, *overrides)
    grpo_update(first, batch, behaviour, advantages, first.config)
    first.save_state(tmp_path / "ckpt")
    grpo_update(first, batch, behaviour, advantages, first.config)
    second = _engine(family_dir, *overrides)
    second.load_state(tmp_path / "ckpt")
    grpo_update(second, batch, behaviour, advantages, second.config)
    a, b = first.trainable_state(), second.trainable_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # AdamW moments came back too
    assert first.optimizer.state_dict()["state"].keys() == second.optimizer.state_dict()["state"].keys()
    with pytest.raises(ConfigError, match="resume with the backend.tensor_parallel it was saved with"):
        second.load_state(tmp_path / "elsewhere")
    # A checkpoint whose adapter does not fit this model (the model folder changed under the run).
    (saved,) = (tmp_path / "ckpt").glob("megatron-tp*.pt")
    state = torch.load(saved, weights_only=True)
    name = next(iter(state["trainable"]))
    torch.save({**state, "trainable": {**state["trainable"], name: torch.zeros(3, 3)}}, saved)
    with pytest.raises(ConfigError, match=r"holds .* of shape \[3, 3\], but this model's is .*not the one the run "
                                          r"trained"):
        second.load_state(tmp_path / "ckpt")
    # A model with more adapted tensors than the checkpoint (more layers): each saved tensor fits, and only
    # the optimizer's state failed, reported as a damaged checkpoint.
    torch.save({**state, "trainable": {k: v for k, v in state["trainable"].items() if k != name}}, saved)
    with pytest.raises(ConfigError, match=rf"holds no {re.escape(name)} \(1 of this model's trainable tensors are "
                                          r"not in it\): the model in model.path is not the one the run trained"):
        second.load_state(tmp_path / "ckpt")


_STEP = ("train.micro_batch_size=2", "grpo.minibatches=2", "rollout.prompts_per_step=2", "rollout.group_size=4",
         "train.max_grad_norm=0.01")


def _one_update(model_dir, rank: int, world: int, *overrides) -> dict:
    """One GRPO update from a random non-zero adapter; this rank holds every world-th row of each minibatch."""
    from lora_rl.trainer import grpo_update

    engine = _engine(model_dir, *_STEP, *overrides)
    _randomise_adapter(engine)
    batch, _, advantages = _rewarded_batch(engine.vocab)
    behaviour = torch.full(batch.completion_mask.shape, -2.0)
    rows = torch.cat([torch.arange(start + rank, start + 4, world) for start in (0, 4)])
    stats = grpo_update(engine, batch.select(rows), behaviour[rows], advantages[rows], engine.config)
    return {"state": engine.trainable_state(), "grad_norm": stats["grad_norm"],
            "recompute": engine.megatron.config.recompute_granularity}


def _data_parallel_worker(rank: int, world: int, port: int, model_dir, out_path) -> None:
    import os

    from lora_rl import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init()
    try:
        result = _one_update(model_dir, rank, world)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        distributed.shutdown()


def test_data_parallel_update_matches_one_process(family_dir, tmp_path):
    """Two gloo processes, each with half of every minibatch: the adapter's gradients are summed over the
    data-parallel ranks, so the update (with a binding grad-norm clip) equals the one-process update."""
    import socket

    import torch.multiprocessing as mp

    expected = _one_update(family_dir, 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_data_parallel_worker, args=(2, port, family_dir, tmp_path / "dp.pt"), nprocs=2, join=True)
    got = torch.load(tmp_path / "dp.pt", weights_only=True)
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5) and expected["grad_norm"] > 0.01
    for name, tensor in expected["state"].items():
        torch.testing.assert_close(got["state"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Megatron's recompute saves CUDA RNG states")
def test_activation_checkpointing_gives_the_same_update(family_dir):
    plain = _one_update(family_dir, 0, 1)
    recomputed = _one_update(family_dir, 0, 1, "backend.activation_checkpointing=true")
    assert (plain["recompute"], recomputed["recompute"]) == (None, "full")
    assert recomputed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    for name, tensor in plain["state"].items():
        torch.testing.assert_close(recomputed["state"][name], tensor, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")
def test_activation_checkpointing_on_the_cpu_is_refused(family_dir):
    with pytest.raises(ConfigError, match="backend.activation_checkpointing=true with Megatron needs CUDA"):
        _engine(family_dir, "backend.activation_checkpointing=true")


@pytest.mark.parametrize(("targets", "megatron", "trained"), [
    (["all-linear"], ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
     ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (["q_proj"], ["linear_qkv"], ("q_proj", "k_proj", "v_proj")),  # coarser: the fused layer is adapted whole
    (["up_proj", "down_proj"], ["linear_fc1", "linear_fc2"], ("gate_proj", "up_proj", "down_proj")),
    (["linear_proj", "o_proj"], ["linear_proj"], ("o_proj",)),  # both vocabularies, one layer
])
def test_target_modules_in_either_vocabulary(targets, megatron, trained):
    assert megatron_target_names(targets) == megatron
    assert hf_target_names(megatron) == trained


def test_megatron_refusals_name_the_fix(family_dir):
    with pytest.raises(ConfigError, match="mbridge has no LoRA path"):
        load_config(None, ["backend.name=megatron", "backend.bridge=mbridge", "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match=r"\['lm_head'\] have no Megatron layer"):
        megatron_target_names(["lm_head"])
    with pytest.raises(ConfigError, match="tensor-parallel ranks need the same ones"):
        _engine(family_dir, "backend.tensor_parallel=2")
    with pytest.raises(ConfigError, match="backend.tensor_parallel=2 is for backend.name=megatron"):
        load_config(None, ["backend.tensor_parallel=2"])
    from lora_rl.backends.megatron import check_parallel

    with pytest.raises(ConfigError, match="does not divide the 3 processes"):
        check_parallel(2, 3, "0.6.2")
    with pytest.raises(ConfigError, match=r"lora.lora_rank=4 is not a multiple of backend.tensor_parallel=8: .* "
                                          r"Use lora.lora_rank=8"):
        check_parallel(8, 8, "0.6.2", lora_rank=4)
    check_parallel(8, 8, "0.6.2", lora_rank=4, targets=("linear_proj", "linear_fc2"))  # row-parallel: not split
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="gives wrong results there"):
            check_parallel(2, 2, "0.3.1")
        check_parallel(2, 2, "0.6.2")  # exact there: allowed


def test_train_with_vllm_rollouts_serves_the_megatron_adapter(vllm_warm_model_dir, tmp_path):
    """train() with backend.name=megatron and the in-process vLLM engine: after every sync vLLM scores the
    sampled tokens as Megatron+LoRA does - the exported adapter reproduces the trainer in vLLM."""
    from lora_rl.trainer import train

    out = tmp_path / "run"
    config = load_config(None, [f"model.path={vllm_warm_model_dir}", f"run.output_dir={out}", "run.progress=false",
                                "backend.name=megatron", "rollout.engine=vllm", "rollout.prompts_per_step=8",
                                "rollout.group_size=4", "rollout.max_new_tokens=12", "task.difficulty=1",
                                "eval.size=0", "lora.lora_rank=8", "run.steps=3", "train.lr=2e-3"])
    summary = train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    for r in records:
        assert 0 < r["sync_bytes"] < 200_000  # only the PEFT adapter travels
        assert r["sync_logprob_diff"] < 1e-4  # vLLM serves exactly the adapter Megatron just trained
        assert r["logprob_diff"] < 1e-4  # vLLM behaviour log-probs == Megatron's proximal ones (fp32)
    assert any(r["grad_norm"] > 0 for r in records)  # the adapter did move, so the check above had work to do
    assert summary["steps_done"] == 3 and (Path(summary["adapter_dir"]) / "adapter_model.safetensors").is_file()


def test_shutdown_releases_megatrons_process_groups(family_dir):
    """megatron-core's parallel state kept the groups built on the default group alive after
    distributed.shutdown(), and with them their gloo threads (the likely cause of a rare abort at exit)."""
    import gc
    import weakref

    import torch.distributed as dist

    from lora_rl import distributed

    engine = _engine(family_dir)
    world = weakref.ref(dist.group.WORLD)
    del engine
    distributed.shutdown()
    gc.collect()
    assert world() is None
