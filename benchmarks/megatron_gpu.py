"""Megatron backend (megatron-core + megatron-bridge LoRA) checks and GRPO-update speed, 1 GPU then tensor parallel 2.

For each process count (one torchrun each; tensor parallel = process count), every rank:
1. checks, on tiny random Qwen2 and Llama models in float32: HF vs Megatron log-probs on a padded batch,
   LoRA at init changes nothing, a random adapter exported as PEFT reproduces Megatron+LoRA in HF+PEFT,
   four GRPO updates on a fixed rewarded batch raise the expected reward, and with tensor parallel 2 the
   exported adapter equals tp=1's before and after those updates (the same random adapter is sliced as
   Megatron shards it);
2. times the GRPO update (`trainer.grpo_update`: proximal + reference recompute, clipped loss, backward,
   AdamW) on a random-init model of `--shape` in bfloat16, r=16 all-linear; with one process also the
   FSDP2 engine on the same model and batch, as the baseline on the same card.

It installs nothing. On the GPU machine (no network), with the Python 3.12 wheels carried in wheels/:

    pip install --no-deps wheels/*.whl -t /tmp/pkgs
    PYTHONPATH=$PWD:/tmp/pkgs python3 benchmarks/megatron_gpu.py --out $OUT

On a CPU (gloo, float32) it runs with `--shape tiny --seq 64` for a dry run of the same code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import SHAPES  # noqa: E402

CHECK_FAMILIES = ("qwen2", "llama")
# float32 on both sides; CPU runs agree within 1e-6, GPU kernels may order sums differently.
TOLERANCE = 1e-4


def _write_model(family: str, shape: dict, folder: Path, dtype) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if (folder / "config.json").exists():
        return folder
    config_class = Qwen2Config if family == "qwen2" else LlamaConfig
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config_class(**shape, max_position_embeddings=4096), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # Qwen2's q/k/v biases: non-zero so their conversion is checked
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


def _engine(folder: Path, tp: int, dtype: str, *overrides: str):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_rl.backends import adapter_lora
    from lora_rl.backends.megatron import MegatronEngine
    from lora_rl.config import load_config
    from lora_rl.lora import inject_lora

    config = load_config(None, ["backend.name=megatron", "rollout.engine=vllm", f"model.path={folder}",
                                f"model.dtype={dtype}", f"backend.tensor_parallel={tp}", *overrides])
    with init_empty_weights(include_buffers=False):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    torch.manual_seed(0)
    return MegatronEngine(inject_lora(shape, adapter_lora(config)), config, folder)


def _same_adapter_for_any_tp(engine) -> None:
    """A random adapter that is the same function whatever the tensor-parallel size: each tensor is drawn
    at its full (tp=1) shape from a seed of its name, and each rank keeps its own slice the way Megatron
    shards it - contiguous chunks along `partition_dim`, except linear_fc1's LoRA B, whose gate and up
    halves are chunked separately (each rank holds [gate_r; up_r])."""
    import zlib

    import torch

    tp, rank = engine.tp_size, engine.tp_rank
    with torch.no_grad():
        for name, p in engine.megatron.named_parameters():
            if not p.requires_grad:
                continue
            sharded = tp > 1 and getattr(p, "tensor_model_parallel", False)
            dim = getattr(p, "partition_dim", 0)
            shape = [n * tp if sharded and i == dim else n for i, n in enumerate(p.shape)]
            full = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.05
            if sharded and "linear_fc1.adapter.linear_out" in name and dim == 0:
                full = torch.cat([half.chunk(tp, 0)[rank] for half in full.chunk(2, 0)])
            elif sharded:
                full = full.chunk(tp, dim)[rank]
            p.copy_(full)


def _adapter_gap(a: Path, b: Path) -> float:
    """Max |difference| between two PEFT adapter folders with the same tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    if x.keys() != y.keys():
        return float("inf")
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _checks(family: str, folder: Path, tp: int, work: Path) -> dict:
    """Max |delta log-prob| over completion tokens for each invariant, and the expected-reward rise."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_rl import distributed, grpo
    from lora_rl.batching import make_batch, token_logprobs
    from lora_rl.lora import load_adapter
    from lora_rl.trainer import grpo_update

    device = distributed.device()
    engine = _engine(folder, tp, "float32", "lora.lora_rank=8", "lora.lora_alpha=16", "train.lr=1e-2",
                     "train.micro_batch_size=4", "grpo.minibatches=2", "rollout.prompts_per_step=2",
                     "rollout.group_size=4")
    g = torch.Generator().manual_seed(3)
    vocab = engine.vocab
    prompts = [torch.randint(3, vocab, (5,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(3, vocab, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (8,), generator=g)]
    batch = make_batch([prompts[i // 4] for i in range(8)], completions, pad_id=0).to(device)
    mask = batch.completion_mask.bool()

    def gap(a, b):
        return float((a - b)[mask].abs().max())

    def hf_logprobs(model):
        with torch.no_grad():
            return token_logprobs(model.to(device).eval(), batch, 1.0, chunked=False)[0]

    out = {"family": family}
    lora_on = engine.logprobs(batch, 1.0, with_grad=False)[0]
    with engine.reference():
        base = engine.logprobs(batch, 1.0, with_grad=False)[0]
    out["hf_vs_megatron"] = gap(base, hf_logprobs(AutoModelForCausalLM.from_pretrained(folder)))
    out["lora_init_change"] = gap(lora_on, base)
    _same_adapter_for_any_tp(engine)
    adapter = engine.save_adapter(work / f"adapter-{family}-tp{tp}")
    peft = load_adapter(AutoModelForCausalLM.from_pretrained(folder), adapter)
    out["export_hf_peft_vs_megatron"] = gap(engine.logprobs(batch, 1.0, with_grad=False)[0], hf_logprobs(peft))
    out["adapter_moved_logprobs"] = gap(engine.logprobs(batch, 1.0, with_grad=False)[0], base)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0], device=device)
    advantages = grpo.group_advantages(rewards, 4, scale_std=True)

    def expected_reward():
        # Each completion's mean token log-prob, softmaxed within its group (length-normalised so the
        # shortest completion does not take all the weight).
        m = batch.completion_mask
        logp = (engine.logprobs(batch, 1.0, with_grad=False)[0] * m).sum(-1) / m.sum(-1)
        return float((torch.softmax(logp.view(2, 4), -1) * rewards.view(2, 4)).sum(-1).mean())

    out["expected_reward_before"] = expected_reward()
    out["grad_norms"] = []
    for _ in range(4):
        behaviour = engine.logprobs(batch, 1.0, with_grad=False)[0]
        out["grad_norms"].append(grpo_update(engine, batch, behaviour, advantages, engine.config)["grad_norm"])
    out["expected_reward_after"] = expected_reward()
    engine.save_adapter(work / f"adapter-{family}-tp{tp}-trained")  # compared across tensor-parallel sizes
    out["ok"] = (out["hf_vs_megatron"] < TOLERANCE and out["lora_init_change"] == 0.0
                 and out["export_hf_peft_vs_megatron"] < TOLERANCE and out["adapter_moved_logprobs"] > 10 * TOLERANCE
                 and out["expected_reward_after"] > out["expected_reward_before"])
    return out


def _timed(engine, config, batch, behaviour, advantages, steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds per GRPO update and peak GiB on this device."""
    import torch

    from lora_rl.trainer import grpo_update

    cuda = torch.cuda.is_available()
    times = []
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        grpo_update(engine, batch, behaviour, advantages, config)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return sorted(times[warmup:])[steps // 2], peak


def _speed(args, tp: int, work: Path) -> list[dict]:
    import torch

    from lora_rl import distributed
    from lora_rl.batching import make_batch

    device = distributed.device()
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    folder = work / f"speed-{args.shape}"
    if distributed.is_main():
        _write_model("qwen2", SHAPES[args.shape], folder, getattr(torch, dtype))
    distributed.barrier()
    common = ["lora.lora_rank=16", "lora.lora_alpha=32", f"train.micro_batch_size={args.micro}",
              "rollout.group_size=4", f"rollout.prompts_per_step={max(1, args.batch // 4)}"]
    g = torch.Generator().manual_seed(0)  # the same batch on every rank: tensor-parallel ranks share it
    vocab = SHAPES[args.shape]["vocab_size"]
    half = args.seq // 2
    batch = make_batch([torch.randint(0, vocab, (half,), generator=g).tolist() for _ in range(args.batch)],
                       [torch.randint(0, vocab, (half,), generator=g).tolist() for _ in range(args.batch)], 0).to(device)
    behaviour = torch.full(batch.completion_mask.shape, -12.0, device=device)
    advantages = torch.randn(args.batch, generator=g).to(device)
    rows = []
    engine = _engine(folder, tp, dtype, *common)
    step_s, peak = _timed(engine, engine.config, batch, behaviour, advantages, args.steps, args.warmup)
    rows.append({"engine": f"megatron tp={tp}", "median_step_s": step_s, "peak_gib_per_device": peak,
                 "trainable_params_per_rank": sum(p.numel() for p in engine.params)})
    del engine
    gc.collect()
    if tp == 1 and args.fsdp2_baseline:
        from transformers import AutoModelForCausalLM

        from lora_rl.backends.fsdp2 import FSDP2Engine
        from lora_rl.config import load_config
        from lora_rl.lora import inject_lora

        if device.type == "cuda":
            torch.cuda.empty_cache()
        config = load_config(None, [f"model.path={folder}", f"model.dtype={dtype}", *common])
        model = inject_lora(AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)), config.lora)
        fsdp2 = FSDP2Engine(model.to(device), config, folder)
        step_s, peak = _timed(fsdp2, config, batch, behaviour, advantages, args.steps, args.warmup)
        rows.append({"engine": "fsdp2 (1 process)", "median_step_s": step_s, "peak_gib_per_device": peak,
                     "trainable_params_per_rank": sum(p.numel() for p in fsdp2.params)})
    for r in rows:
        r.update(shape=args.shape, dtype=dtype, batch=args.batch, seq=args.seq,
                 tokens_per_s=args.batch * args.seq / r["median_step_s"])
    return rows


def worker(args) -> None:
    import torch

    from lora_rl import distributed
    from lora_rl.backends import megatron_compat

    d = distributed.init()
    distributed.ensure_group()
    tp = d.world
    work = Path(args.work)
    checks = []
    for family in CHECK_FAMILIES:
        folder = work / f"check-{family}"
        if d.main:
            # Non-default RoPE base and norm epsilon, so a converter that drops them fails the parity check.
            _write_model(family, {**SHAPES["tiny"], "rope_theta": 50000.0, "rms_norm_eps": 1e-5}, folder, torch.float32)
        distributed.barrier()
        checks.append(_checks(family, folder, tp, work))
    speed = _speed(args, tp, work) if args.shape != "none" else []
    if d.main:
        mc = megatron_compat.load()
        result = {"tensor_parallel": tp, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "megatron_bridge": mc.bridge_version,
                  "checks": checks, "speed": speed}
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown()


def _print(results: list[dict]) -> None:
    first = results[0]
    print(f"Megatron LoRA on {first['device']} (torch {first['torch']}, megatron-bridge {first['megatron_bridge']})")
    print("checks, float32 tiny models: max |delta log-prob| over completion tokens; expected reward of a fixed "
          "rewarded batch before -> after 4 GRPO updates; max |delta| of the exported adapter against tp=1")
    print(f"{'tp':>3} {'family':>7} {'HF vs Megatron':>15} {'LoRA init':>10} {'PEFT export':>12} {'reward':>14} "
          f"{'adapter vs tp=1 after 4 updates':>32} {'pass':>5}")
    for r in results:
        for c in r["checks"]:
            print(f"{r['tensor_parallel']:>3} {c['family']:>7} {c['hf_vs_megatron']:>15.2e} "
                  f"{c['lora_init_change']:>10.2e} {c['export_hf_peft_vs_megatron']:>12.2e} "
                  f"{c['expected_reward_before']:>6.3f} -> {c['expected_reward_after']:.3f} "
                  f"{c.get('vs_tp1_after_update', float('nan')):>32.2e} {'yes' if c['ok'] else 'NO':>5}")
    speed = [s for r in results for s in r["speed"]]
    if speed:
        s0 = speed[0]
        print(f"GRPO update, {s0['shape']} shape (random init), r=16 all-linear, {s0['dtype']}, "
              f"{s0['batch']} x {s0['seq']} tokens per step (the same batch on every tensor-parallel rank)")
        print(f"{'engine':>18} {'s/step':>8} {'tokens/s':>10} {'peak GiB/device':>16}")
        for s in speed:
            print(f"{s['engine']:>18} {s['median_step_s']:>8.3f} {s['tokens_per_s']:>10.0f} "
                  f"{s['peak_gib_per_device']:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for megatron_gpu.json")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (= processes)")
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=[*sorted(SHAPES), "none"],
                        help="model shape for the speed runs (none: checks only)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fsdp2-baseline", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--work", help="scratch folder for model folders and adapters (default: a new temp folder)")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # set for the torchrun workers
    args = parser.parse_args()
    if args.result:
        worker(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Model folders and adapters go to scratch space, not --out: only the JSON result should travel back.
    work = Path(args.work or tempfile.mkdtemp(prefix="megatron-gpu-"))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    results = []
    for tp in args.tp:
        part = work / f"tp{tp}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}", __file__,
                   "--out", args.out, "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--fsdp2-baseline" if args.fsdp2_baseline else "--no-fsdp2-baseline",
                   "--work", str(work), "--result", str(part)]
        run = subprocess.run(command, env=env)
        if run.returncode != 0:
            print(f"tensor parallel {tp}: the workers failed (exit {run.returncode}); see their output above")
            results.append({"tensor_parallel": tp, "failed": run.returncode})
            continue
        results.append(json.loads(part.read_text()))
    done = [r for r in results if "failed" not in r]
    base = next((r for r in done if r["tensor_parallel"] == 1), None)
    for r in done:  # the same adapter before and after the same updates, whatever the tensor-parallel size
        for c in r["checks"] if base is not None and r is not base else []:
            tp, family = r["tensor_parallel"], c["family"]
            c["vs_tp1_before_update"] = _adapter_gap(work / f"adapter-{family}-tp{tp}", work / f"adapter-{family}-tp1")
            c["vs_tp1_after_update"] = _adapter_gap(work / f"adapter-{family}-tp{tp}-trained",
                                                    work / f"adapter-{family}-tp1-trained")
            first = next(b for b in base["checks"] if b["family"] == family)["grad_norms"][0]
            c["first_grad_norm_vs_tp1"] = abs(c["grad_norms"][0] / first - 1)
            # From the same adapter the first gradient must agree to rounding. After 4 AdamW steps rounding
            # differences are amplified on near-zero gradient entries (AdamW divides by their size), so the
            # adapters then agree to about 1% of how far they moved, not to rounding.
            c["ok"] = (c["ok"] and c["vs_tp1_before_update"] == 0.0 and c["first_grad_norm_vs_tp1"] < TOLERANCE
                       and c["vs_tp1_after_update"] < 5e-3)  # the updates moved each entry by ~0.07
    if done:
        _print(done)
    (out / "megatron_gpu.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'megatron_gpu.json'}")
    passed = all(c["ok"] for r in done for c in r["checks"])
    sys.exit(0 if len(done) == len(results) and passed else 1)


if __name__ == "__main__":
    main()
