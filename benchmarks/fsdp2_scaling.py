"""FSDP2 LoRA GRPO update: tokens/s and peak memory per device on 1 vs N processes, side by side.

Runs the project's own training path - `FSDP2Engine` + `trainer.grpo_update` (proximal and
reference log-prob recompute, clipped decoupled-PPO loss, backward, clipped AdamW step) - on a
random-init model of a named shape (no weights can be downloaded), with a synthetic batch of
`--batch` sequences of `--seq` tokens per process (half prompt, half completion).

    python benchmarks/fsdp2_scaling.py --shape qwen2.5-0.5b --nproc 1 2 --out results/fsdp2.json

Each process count runs under its own torchrun; the parent prints one table and writes JSON.
On CPU it runs with gloo (use --shape tiny), on GPUs with NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from shapes import SHAPES  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def worker(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lora_rl import distributed
    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.batching import make_batch
    from lora_rl.config import load_config
    from lora_rl.lora import inject_lora
    from lora_rl.trainer import grpo_update

    d = distributed.init()
    dtype = "bfloat16" if d.device.type == "cuda" else "float32"
    config = load_config(None, [f"model.dtype={dtype}", "lora.lora_rank=16", "lora.lora_alpha=32",
                                f"train.micro_batch_size={args.micro}", "rollout.group_size=4",
                                f"rollout.prompts_per_step={max(1, args.batch * d.world // 4)}",
                                f"backend.reshard_after_forward={args.reshard_after_forward}"])
    torch.manual_seed(0)
    model_config = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, dtype))
    model = inject_lora(model, config.lora).to(d.device)
    engine = FSDP2Engine(model, config, Path("."))
    g = torch.Generator().manual_seed(d.rank)
    half = args.seq // 2
    prompts = [torch.randint(0, model_config.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    completions = [torch.randint(0, model_config.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    batch = make_batch(prompts, completions, pad_id=0)
    batch = type(batch)(*(t.to(d.device) for t in (batch.input_ids, batch.attention_mask, batch.completion_mask)))
    behaviour = torch.full(batch.completion_mask.shape, -12.0, device=d.device)
    advantages = torch.randn(args.batch, generator=g).to(d.device)

    def sync():
        if d.device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        grpo_update(engine, batch, behaviour, advantages, config)
        sync()
        times.append(time.perf_counter() - start)
    steady = times[args.warmup:]
    step_s = sorted(steady)[len(steady) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if d.device.type == "cuda" else float("nan")
    peaks = distributed.all_sum(torch.tensor([peak], dtype=torch.float64, device=d.device)).item() / d.world
    if d.main:
        result = {
            "shape": args.shape, "processes": d.world, "device": torch.cuda.get_device_name() if
            d.device.type == "cuda" else "cpu", "dtype": dtype, "batch_per_process": args.batch, "seq": args.seq,
            "micro_batch": args.micro, "reshard_after_forward": args.reshard_after_forward, "median_step_s": step_s,
            "tokens_per_s": args.batch * args.seq * d.world / step_s,
            "peak_gib_per_device": peaks, "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "step_times_s": steady,
        }
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=8, help="sequences per process")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=4, help="sequences per forward/backward")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reshard-after-forward", default="true", choices=["true", "false"])
    parser.add_argument("--out", default="benchmarks/results/fsdp2_scaling.json")
    parser.add_argument("--result", help=argparse.SUPPRESS)  # set for the torchrun workers
    args = parser.parse_args()
    if args.result:
        worker(args)
        return
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.nproc:
        part = out.with_suffix(f".n{n}.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--micro", str(args.micro), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--reshard-after-forward", args.reshard_after_forward,
                   "--result", str(part)]
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        rows.append(json.loads(part.read_text()))
        part.unlink()
    base = rows[0]
    print(f"FSDP2 LoRA GRPO update, {base['shape']} shape, r=16 all-linear, {base['dtype']}, "
          f"{base['batch_per_process']} x {base['seq']} tokens per process, reshard_after_forward="
          f"{base['reshard_after_forward']}, on {base['device']}")
    print(f"{'processes':>9} {'s/step':>8} {'tokens/s':>10} {'speed-up':>9} {'peak GiB/device':>16}")
    for r in rows:
        r["speedup_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{r['processes']:>9} {r['median_step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['speedup_vs_first']:>8.2f}x {r['peak_gib_per_device']:>16.2f}")
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
