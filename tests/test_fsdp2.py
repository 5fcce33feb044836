"""FSDP2 across two gloo processes: a sharded update equals the unsharded one, and only the adapter
is gathered."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM

from lora_rl import distributed
from lora_rl.backends.fsdp2 import FSDP2Engine, decoder_layers, initial_tensor
from lora_rl.batching import make_batch
from lora_rl.config import load_config
from lora_rl.lora import inject_lora
from lora_rl.metrics import without_timings
from lora_rl.models import empty_model, has_dropout, load_model
from lora_rl.trainer import grpo_update, reuses_training_logprobs


QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(3, 8, (8,), generator=g)]
    completions = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (8,), generator=g)]
    batch = make_batch(prompts, completions, pad_id=0)
    behaviour = torch.randn(batch.completion_mask.shape, generator=g) * 0.01 - 2.0
    advantages = torch.randn(8, generator=g)
    return batch, behaviour, advantages


def _one_step(model_dir, rank: int, world: int, *overrides: str) -> dict:
    torch.manual_seed(0)
    config = load_config(None, ["lora.lora_rank=4", "train.micro_batch_size=2", "grpo.minibatches=2",
                                "rollout.prompts_per_step=4", "rollout.group_size=4", "train.max_grad_norm=0.05",
                                *overrides])
    model = inject_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, config.model.dtype)),
                        config.lora)
    with torch.no_grad():  # non-zero lora_B so every adapter weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    engine = FSDP2Engine(model, config, model_dir)
    batch, behaviour, advantages = _inputs(model.config.vocab_size)
    # Each rank holds every world-th sequence of each minibatch: together they are the global batch.
    rows = torch.cat([torch.arange(start + rank, start + 4, world) for start in (0, 4)])
    stats = grpo_update(engine, batch.select(rows), behaviour[rows], advantages[rows], config)
    with torch.no_grad():
        logits = engine.model(input_ids=batch.input_ids[:2]).logits  # a collective forward under sharding
    return {"state": engine.trainable_state(), "grad_norm": stats["grad_norm"], "logits": logits, "engine": engine,
            "stats": stats}


def _join(rank: int, world: int, port: int) -> None:
    """Become rank `rank` of a gloo group on loopback, as torchrun would set it up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init()


def _worker(rank: int, world: int, port: int, model_dir, out_path, chunk: int = 0) -> None:
    _join(rank, world, port)
    if chunk:  # force the sliced output head, which tiny models never reach on their own
        import lora_rl.batching

        lora_rl.batching._CHUNK_ELEMENTS = chunk
    try:
        result = _one_step(model_dir, rank, world)
        result.pop("engine").save_adapter(out_path.parent / "adapter")  # collective: gather, rank 0 writes
        if rank == 0:
            torch.save(result, out_path)
    finally:
        distributed.shutdown()
    del result
    distributed.release_groups()
    _write_gloo_threads(out_path.parent, rank)


def test_sharded_step_matches_unsharded(random_model_dir, tmp_path):
    expected = _one_step(random_model_dir, rank=0, world=1)
    expected.pop("engine")
    mp.spawn(_worker, args=(2, _free_port(), random_model_dir, tmp_path / "sharded.pt"), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    _assert_no_gloo_threads(tmp_path)
    # Only the adapter is gathered: exactly the trainable tensors, no base weight.
    assert sorted(sharded["state"]) == sorted(expected["state"])
    assert all("lora_" in name for name in sharded["state"])
    assert sharded["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    for name, tensor in expected["state"].items():
        torch.testing.assert_close(sharded["state"][name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_sliced_head_under_sharding_matches_plain_logprobs(random_model_dir, tmp_path):
    """The chunked log-prob head (slices of 5 tokens, inside FSDP2's root forward, recomputed in backward)
    against plain [B, T, V] log-probs without sharding: the same update."""
    expected = _one_step(random_model_dir, 0, 1, "train.chunked_logprobs=false")
    expected.pop("engine")
    vocab = AutoModelForCausalLM.from_pretrained(random_model_dir).config.vocab_size
    mp.spawn(_worker, args=(2, _free_port(), random_model_dir, tmp_path / "sharded.pt", 5 * vocab), nprocs=2,
             join=True)
    sliced = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert sliced["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    # The frozen head forms its gradient in the forward and scales it after the GEMM, not before: only
    # rounding moves, and Adam's first step divides by the gradient's own size, so entries with small
    # gradients differ by up to ~1e-6 after it (2.5e-6 for one entry of 128 on an AVX2-only AMD EPYC).
    for name, tensor in expected["state"].items():
        torch.testing.assert_close(sliced["state"][name], tensor, atol=5e-6, rtol=1e-5, msg=lambda m: name + m)


def test_one_minibatch_takes_the_proximal_logprobs_from_the_training_pass(random_model_dir, monkeypatch):
    """With one minibatch the update scores each micro-batch once (with grad) instead of twice, and ends
    where the separate no-grad proximal pass (grpo.recompute_proximal) ends."""
    passes = []
    scored = FSDP2Engine.logprobs

    def counted(self, batch, temperature, with_grad, with_entropy=False):
        passes.append(with_grad)
        return scored(self, batch, temperature, with_grad, with_entropy)

    monkeypatch.setattr(FSDP2Engine, "logprobs", counted)
    one = ("grpo.minibatches=1", "grpo.log_kl=false")
    reused = _one_step(random_model_dir, 0, 1, *one)
    reused_passes, passes[:] = list(passes), []
    recomputed = _one_step(random_model_dir, 0, 1, *one, "grpo.recompute_proximal=true")
    assert reused_passes == [True] * 4  # 8 rows in micro-batches of 2
    assert passes == [False] * 4 + [True] * 4
    for key in ("loss", "grad_norm", "logprob_diff", "clip_fraction", "importance_masked_fraction"):
        assert reused["stats"][key] == pytest.approx(recomputed["stats"][key], rel=1e-6, abs=1e-9), key
    for name, tensor in recomputed["state"].items():
        torch.testing.assert_close(reused["state"][name], tensor, atol=1e-7, rtol=1e-6, msg=name)


def test_proximal_logprobs_are_scored_apart_where_the_policy_moves_or_drops_inputs(random_model_dir):
    assert reuses_training_logprobs(load_config(None, []))
    for overrides in (["grpo.minibatches=2"], ["lora.lora_dropout=0.1"], ["grpo.recompute_proximal=true"]):
        assert not reuses_training_logprobs(load_config(None, overrides)), overrides
    # A model's own dropout makes the training pass inexact too: the engine says so, and grpo_update asks it.
    model = AutoModelForCausalLM.from_pretrained(random_model_dir)
    assert not has_dropout(model)
    model.config.attention_dropout = 0.1
    assert has_dropout(model)
    lora = inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir),
                       load_config(None, ["lora.lora_dropout=0.1"]).lora)
    assert has_dropout(lora)
    assert not FSDP2Engine(AutoModelForCausalLM.from_pretrained(random_model_dir), load_config(None, []),
                           random_model_dir).drops_inputs


def test_activation_checkpointing_gives_the_same_update(random_model_dir):
    plain = _one_step(random_model_dir, 0, 1)
    checkpointed = _one_step(random_model_dir, 0, 1, "backend.activation_checkpointing=true")
    assert all(layer.gradient_checkpointing for layer in decoder_layers(checkpointed.pop("engine").model))
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)
    for name, tensor in plain["state"].items():
        torch.testing.assert_close(checkpointed["state"][name], tensor, atol=1e-7, rtol=1e-6, msg=name)


def test_gathered_adapter_reproduces_the_sharded_trainer_logits(random_model_dir, tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), random_model_dir, tmp_path / "sharded.pt"), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(random_model_dir), tmp_path / "adapter")
    batch, _, _ = _inputs(reloaded.config.vocab_size)
    with torch.no_grad():
        logits = reloaded(input_ids=batch.input_ids[:2]).logits
    torch.testing.assert_close(logits, sharded["logits"], atol=1e-5, rtol=1e-5)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "Z"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lora_rl.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_process_run_learns_and_survives_sigkill(warm_model_dir, tmp_path):
    shared = [f"model.path={warm_model_dir}", "run.progress=false", "rollout.prompts_per_step=16",
              "rollout.group_size=8", "rollout.max_new_tokens=12", "task.difficulty=1", "eval.size=0",
              "lora.lora_rank=8", "run.checkpoint_every=12", "--nproc", "2"]
    common = [*shared, "train.lr=5e-3"]
    full = _cli(str(QUICKSTART), f"run.output_dir={tmp_path / 'full'}", "run.steps=36", *common)
    assert full.returncode == 0, full.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 37))  # rank 0 alone writes, once per step
    # Learning, against a control run whose learning rate is too small to move the adapter (as in
    # test_trainer): the reward climbs within the run's first few steps, at a pace that depends on the
    # CPU's rounding, so the run's own first steps were no baseline (0.125 -> 0.206 on an AMD EPYC).
    control = _cli(str(QUICKSTART), f"run.output_dir={tmp_path / 'control'}", "run.steps=8", *shared, "train.lr=1e-9")
    assert control.returncode == 0, control.stderr[-2000:]
    lines = (tmp_path / "control" / "metrics.jsonl").read_text().splitlines()
    base = [json.loads(line)["reward_mean"] for line in lines]
    last = [r["reward_mean"] for r in records[-8:]]
    standard_error = (statistics.variance(base) / len(base) + statistics.variance(last) / len(last)) ** 0.5
    rise = statistics.mean(last) - statistics.mean(base)
    assert rise > max(0.1, 4 * standard_error), (base, last)
    # The same run, killed (SIGKILL, every rank) once its step-12 checkpoint exists, then resumed.
    victim = subprocess.Popen([sys.executable, "-m", "lora_rl.cli", "train", str(QUICKSTART),
                               f"run.output_dir={tmp_path / 'part'}", "run.steps=36", *common],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "part" / "checkpoints" / "step_000012" / "meta.json").exists():
        assert victim.poll() is None and time.monotonic() < deadline, "run ended before its step-12 checkpoint"
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill the whole process tree, at once.
    tree = _descendants(victim.pid) + [victim.pid]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    while any(Path(f"/proc/{pid}").exists() and "Z" not in _state(pid) for pid in tree):
        time.sleep(0.05)
    resumed = _cli(str(QUICKSTART), f"run.output_dir={tmp_path / 'part'}", "run.steps=36", "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    read = lambda d: [without_timings(json.loads(line))  # noqa: E731
                      for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "part") == read(tmp_path / "full")


def _meta_worker(rank: int, world: int, port: int, model_dir, out_path) -> None:
    _join(rank, world, port)
    try:
        config = load_config(None, ["lora.lora_rank=4"])
        model, _, _ = load_model(str(model_dir), empty=True)
        assert all(p.is_meta for p in model.parameters())
        engine = FSDP2Engine(inject_lora(model, config.lora), config, model_dir)
        ids = torch.tensor([[5, 6, 7, 9, 11]])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits
            # The reference in the same process: CPU GEMMs round differently with a different thread count,
            # and the workers run with fewer threads than the test process.
            expected = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids).logits
        if rank == 0:
            torch.save((logits, expected), out_path)
    finally:
        distributed.shutdown()


def test_meta_device_start_materialises_the_same_model(random_model_dir, tmp_path):
    mp.spawn(_meta_worker, args=(2, _free_port(), random_model_dir, tmp_path / "logits.pt"), nprocs=2, join=True)
    logits, expected = torch.load(tmp_path / "logits.pt", weights_only=True)
    # LoRA B starts at zero, so the sharded, meta-started model must reproduce the base model exactly.
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def _random_init_worker(rank: int, world: int, port: int, model_dir, out_path) -> None:
    _join(rank, world, port)
    try:
        config = load_config(None, ["lora.lora_rank=4"])
        model = empty_model(AutoConfig.from_pretrained(model_dir))
        engine = FSDP2Engine(inject_lora(model, config.lora), config, None)  # no base folder: random weights
        state = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(state, out_path)
    finally:
        distributed.shutdown()
    del engine, model, state
    distributed.release_groups()


def _write_gloo_threads(folder: Path, rank: int) -> None:
    """Record this process's threads that belong to a gloo process group (Linux names them)."""
    names = [p.read_text().strip() for p in Path("/proc/self/task").glob("*/comm")]
    (folder / f"threads{rank}.json").write_text(json.dumps([n for n in names if "gloo" in n]))


def _assert_no_gloo_threads(folder: Path) -> None:
    """No gloo thread outlives shutdown once the engine is gone: torch.distributed's caches held the
    group into interpreter teardown (see distributed.release_groups)."""
    for rank in range(2):
        assert json.loads((folder / f"threads{rank}.json").read_text()) == [], rank


def test_random_meta_init_is_the_same_model_for_any_process_count(random_model_dir, tmp_path):
    """Random-init benchmark shapes (no weights to read): the sharded model gathered from two ranks is
    exactly the seeded per-tensor init a single process draws, so a shape's numbers do not depend on
    how many devices it was spread over."""
    mp.spawn(_random_init_worker, args=(2, _free_port(), random_model_dir, tmp_path / "state.pt"), nprocs=2,
             join=True)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    hf_config = AutoConfig.from_pretrained(random_model_dir)
    std = hf_config.initializer_range
    assert hf_config.tie_word_embeddings  # the tied head gets the embeddings' values, as a loaded model has
    for name, tensor in state.items():
        hf_name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        hf_name = "model.embed_tokens.weight" if hf_name == "lm_head.weight" else hf_name
        expected = initial_tensor(hf_name, tensor.shape, 0, torch.device("cpu"), std)
        torch.testing.assert_close(tensor, expected, atol=0, rtol=0, msg=name)
    weights = [t for n, t in state.items() if n.endswith("mlp.up_proj.base_layer.weight")]
    assert len(weights) == 2 and not torch.equal(*weights)  # each layer draws its own weights
    assert abs(float(weights[0].std()) - std) < 0.2 * std
    assert all(float(t.abs().sum()) == 0 for n, t in state.items() if "lora_B" in n)
    # No gloo-thread check here (the training workers above keep it): after this worker builds the
    # engine (with or without get_model_state_dict) one LoRA parameter's DTensor stays referenced from
    # C++ (one reference no Python object accounts for), and its mesh keeps the group alive. Whether
    # it happens moved with unrelated changes (a new config field was enough); the cause inside torch
    # was not found.


def _torchrun(root: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Two gloo processes under torchrun. Run again once, and only once, when a rank died of "terminate
    called without an active exception": a C++ abort with no Python traceback that hit this benchmark
    once in about 60 runs. Its likely cause, process groups torn down during interpreter finalization,
    is now removed (distributed.release_groups), but no rerun of ours ever reproduced the abort, so the
    guard stays. Any other failure, or the same one twice, fails the test."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(root)})
        if done.returncode == 0 or "terminate called without an active exception" not in done.stderr:
            break
    return done


def test_sharded_update_benchmark_runs_a_recipe_on_two_processes(tmp_path):
    """benchmarks/sharded_update.py (the 72B-on-4-GPUs measurement) end to end, on a tiny shape and gloo."""
    shape = tmp_path / "shape"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}))
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.json"
    bench = str(root / "benchmarks" / "sharded_update.py")
    done = _torchrun(root, [bench, str(root / "examples" / "qwen2.5_72b_lora_4gpu.yaml"), f"model.path={shape}",
                            "model.dtype=float32", "lora.lora_rank=4", "--seq", "32", "--steps", "2", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["devices"] == 2 and row["sequences_per_device"] == 8 and row["activation_checkpointing"]
    assert row["use_lora"] and row["trainable_params"] < row["params"] / 10
    assert len(row["update_times_s"]) == 3 and all(t > 0 for t in row["update_times_s"])
    assert row["full_finetune_predicted_gib"] > row["predicted_gib"]
    # The 4 -> 8 GPU comparison of the 8-GPU recipe: scaling efficiency against an earlier result.
    again = _torchrun(root, [bench, str(root / "examples" / "qwen2.5_72b_lora_8gpu.yaml"), f"model.path={shape}",
                             "model.dtype=float32", "lora.lora_rank=4", "--seq", "32", "--steps", "1", "--batch", "8",
                             "--baseline", str(out), "--out", str(tmp_path / "scaled.json")])
    assert again.returncode == 0, again.stderr[-3000:]
    scaled = json.loads((tmp_path / "scaled.json").read_text())
    assert scaled["baseline"]["tokens_per_s"] == row["tokens_per_s"]
    assert scaled["scaling_efficiency"] == pytest.approx(scaled["tokens_per_s"] / row["tokens_per_s"])


def _bf16_resume_worker(rank: int, world: int, port: int, model_dir, folder, out_path) -> None:
    _join(rank, world, port)
    try:
        overrides = ("model.dtype=bfloat16", "train.lr=1e-5")
        engine = _one_step(model_dir, rank, world, *overrides)["engine"]
        engine.save_state(folder)  # collective: each rank writes its shards of the adapter and the masters
        fresh = _one_step(model_dir, rank, world, *overrides, "train.lr=1e-3")["engine"]  # same shapes, other state
        fresh.load_state(folder)
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        report = []
        for p, q in zip(engine.params, fresh.params, strict=True):
            saved, loaded = engine.optimizer.state[p], fresh.optimizer.state[q]
            report.append((p.dtype, loaded["master"].dtype,
                           torch.equal(local(saved["master"]), local(loaded["master"])),
                           torch.equal(local(saved["exp_avg_sq"]), local(loaded["exp_avg_sq"])),
                           torch.equal(local(p.detach()), local(q.detach())),
                           torch.equal(local(p.detach()), local(saved["master"]).to(p.dtype))))
        if rank == 0:
            torch.save(report, out_path)
    finally:
        distributed.shutdown()


def test_bf16_sharded_checkpoint_keeps_float32_masters(random_model_dir, tmp_path):
    """train.master_weights under FSDP2: bf16 shards, float32 masters and moments in the sharded
    optimizer state, restored exactly by a resume."""
    mp.spawn(_bf16_resume_worker, args=(2, _free_port(), random_model_dir, tmp_path / "ckpt", tmp_path / "r.pt"),
             nprocs=2, join=True)
    report = torch.load(tmp_path / "r.pt", weights_only=False)
    assert report and all(row == (torch.bfloat16, torch.float32, True, True, True, True) for row in report), report


def _changed_or_damaged_resume_worker(rank: int, world: int, port: int, run_dir, out_path) -> None:
    _join(rank, world, port)
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_rl.config import ConfigError
    from lora_rl.trainer import _load_checkpoint

    config = load_config(None, ["lora.lora_rank=4", "rollout.prompts_per_step=4", "rollout.group_size=2"])

    def engine(layers: int) -> FSDP2Engine:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        return FSDP2Engine(inject_lora(model, config.lora), config, None)

    def resume(layers: int) -> str:
        try:
            _load_checkpoint([checkpoint], engine(layers))
            return "loaded"
        except ConfigError as err:  # a CheckpointException (a BaseException) went past this as a traceback
            return str(err)

    checkpoint = Path(run_dir) / "checkpoints" / "step_000001"
    try:
        engine(2).save_state(checkpoint / "backend")  # collective: each rank writes its shards
        if rank == 0:
            torch.save({}, checkpoint / "state.pt")
            (checkpoint / "meta.json").write_text(json.dumps({"step": 1}))
        distributed.barrier()
        report = [resume(3)]  # model.path now holds a deeper model
        if rank == 0:
            for shard in (checkpoint / "backend").glob("*.distcp"):
                shard.write_bytes(b"")  # cut to nothing after it was written
        distributed.barrier()
        report.append(resume(2))
        if rank == 0:
            torch.save(report, out_path)
    finally:
        distributed.shutdown()


def test_a_sharded_resume_names_a_changed_model_or_a_damaged_checkpoint(tmp_path):
    """torch.distributed.checkpoint reports both as a CheckpointException, a BaseException: `--nproc N --resume`
    printed a traceback from every rank, where one process names the changed model or the folder to delete."""
    mp.spawn(_changed_or_damaged_resume_worker, args=(2, _free_port(), tmp_path / "run", tmp_path / "r.pt"),
             nprocs=2, join=True)
    changed, damaged = torch.load(tmp_path / "r.pt")
    assert "layers.2" in changed and "the model in model.path is not the one the run trained" in changed, changed
    assert "it was damaged after it was written. Delete that folder" in damaged, damaged


def test_mode_switches_walk_the_model_only_when_the_mode_changes(random_model_dir):
    """The engine sets train mode for the gradient pass and eval mode for scoring, walking the module tree
    only on a change (a LoRA model's walk cost ~10 ms of host time per forward on the GPU machine). A
    loaded model is in eval mode under peft's train-mode wrapper: the first switch must still reach it."""
    config = load_config(None, ["lora.lora_rank=4", "lora.lora_dropout=0.1"])
    engine = FSDP2Engine(inject_lora(AutoModelForCausalLM.from_pretrained(random_model_dir), config.lora), config,
                         random_model_dir)
    model = engine.model
    assert model.training and not model.base_model.model.training  # a mixed tree under a train-mode root
    batch = make_batch([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], 0)
    engine.logprobs(batch, 1.0, with_grad=True)
    assert all(m.training for m in model.modules())  # LoRA dropout and checkpointing see train mode
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    dropout.training = False  # marks whether the next call walks the tree
    engine.logprobs(batch, 1.0, with_grad=True)
    assert not dropout.training  # same mode: no walk
    engine.logprobs(batch, 1.0, with_grad=False)
    assert not any(m.training for m in model.modules())  # scoring is exact
    model.train()  # a switch from outside, at the root, is seen
    dropout.training = False
    engine.logprobs(batch, 1.0, with_grad=False)
    assert not any(m.training for m in model.modules())
    engine.logprobs(batch, 1.0, with_grad=True)
    assert dropout.training
