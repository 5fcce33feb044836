"""One LoRA GRPO update of a large model sharded over several devices, measured against the estimator.

Runs a recipe's training side with random weights of its model's shape (nothing can be downloaded):
the model is built on the meta device (no memory), wrapped with FSDP2 and materialised shard by
shard from a seeded generator (`FSDP2Engine` with no base folder), so no process ever holds the whole
model. Then the project's own `trainer.grpo_update` - proximal (and reference, when the recipe uses
the KL) log-prob recompute, clipped decoupled-PPO loss, backward, clipped AdamW step - runs on a
synthetic batch of the recipe's per-device size, `--seq` tokens a sequence (half prompt, half
completion). Prints s/step, tokens/s and peak GiB per device beside `lora_rl.estimate`'s prediction,
and what full fine-tuning would need on the same devices; writes JSON.

    torchrun --nproc_per_node 4 benchmarks/sharded_update.py examples/qwen2.5_72b_lora_4gpu.yaml \\
        --seq 1024 --out benchmarks/results/sharded_update_72b_4gpu.json

On CPU it runs with gloo (override model.path to a small config folder, model.dtype=float32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="YAML recipe whose model shape, LoRA, backend and batch settings to use")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=0,
                        help="sequences per device (0: the recipe's prompts_per_step x group_size / devices)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sharded_update.json"))
    parser.add_argument("--baseline", type=Path, default=None,
                        help="an earlier result (fewer devices, same per-device batch): report scaling efficiency")
    args = parser.parse_args()

    import torch

    from lora_rl import distributed
    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.batching import make_batch
    from lora_rl.config import load_config
    from lora_rl.estimate import ModelShape, estimate_memory
    from lora_rl.lora import check_model, inject_lora
    from lora_rl.models import empty_model, model_config
    from lora_rl.trainer import grpo_update

    d = distributed.init()
    config = load_config(args.recipe, args.overrides)
    per_device = args.batch or config.rollout.prompts_per_step * config.rollout.group_size // d.world
    if per_device < 1:
        raise SystemExit(f"--batch: {config.rollout.prompts_per_step * config.rollout.group_size} sequences per "
                         f"step cannot be split over {d.world} devices; pass --batch")
    hf_config = model_config(config.model.path)
    cuda = d.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    start = time.perf_counter()
    torch.manual_seed(config.run.seed)
    model = empty_model(hf_config, config.model.dtype)
    check_model(model, config.lora)
    if config.lora.use_lora:
        model = inject_lora(model, config.lora)
    engine = FSDP2Engine(model, config, None)  # no base folder: seeded random weights, shard by shard
    sync()
    build_s = time.perf_counter() - start

    g = torch.Generator().manual_seed(1000 + d.rank)
    half = args.seq // 2
    vocab = hf_config.vocab_size
    prompts = [torch.randint(0, vocab, (half,), generator=g).tolist() for _ in range(per_device)]
    completions = [torch.randint(0, vocab, (args.seq - half,), generator=g).tolist() for _ in range(per_device)]
    batch = make_batch(prompts, completions, pad_id=0).to(d.device)
    behaviour = torch.full(batch.completion_mask.shape, -12.0, device=d.device)
    advantages = torch.randn(per_device, generator=g).to(d.device)

    times, stats = [], {}
    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        stats = grpo_update(engine, batch, behaviour, advantages, config)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan")
    peaks = [(peak, reserved)]
    if distributed.active():
        import torch.distributed as dist

        peaks = [None] * d.world
        dist.all_gather_object(peaks, (peak, reserved))
    card = torch.cuda.get_device_name() if cuda else "cpu"

    shape = ModelShape.from_config(hf_config)
    common = dict(rank=config.lora.lora_rank, target_modules=config.lora.target_modules, dtype=config.model.dtype,
                  devices=d.world, micro_batch_size=min(config.train.micro_batch_size, per_device),
                  seq_len=args.seq, activation_checkpointing=config.backend.activation_checkpointing,
                  cpu_offload=config.backend.cpu_offload, chunked_logprobs=config.train.chunked_logprobs,
                  master_weights=config.train.master_weights, compiled=config.backend.compile and cuda,
                  memory_budget=config.backend.compile_memory_budget)
    predicted = estimate_memory(shape, use_lora=config.lora.use_lora, **common)
    full = estimate_memory(shape, use_lora=False, **common)
    if d.main:
        max_peak = max(p for p, _ in peaks)
        row = {"recipe": args.recipe, "overrides": args.overrides, "device": card, "devices": d.world,
               "torch": torch.__version__, "dtype": config.model.dtype, "params": shape.total_params(),
               "trainable_params": predicted.trainable_params, "lora_rank": config.lora.lora_rank,
               "use_lora": config.lora.use_lora, "activation_checkpointing": config.backend.activation_checkpointing,
               "sequences_per_device": per_device, "seq": args.seq, "micro_batch_size": common["micro_batch_size"],
               "build_and_materialise_s": build_s, "median_update_s": step_s, "update_times_s": times,
               "tokens_per_s": per_device * args.seq * d.world / step_s,
               "tokens_per_s_per_device": per_device * args.seq / step_s,
               "peak_allocated_gib_per_device": [p for p, _ in peaks],
               "peak_reserved_gib_per_device": [r for _, r in peaks], "max_peak_allocated_gib": max_peak,
               "predicted_gib": predicted.total_gib, "predicted": predicted.as_dict(),
               "prediction_error": (predicted.total_gib - max_peak) / max_peak if cuda else None,
               "full_finetune_predicted_gib": full.total_gib, "full_finetune_predicted": full.as_dict(),
               "loss": stats.get("loss"), "grad_norm": stats.get("grad_norm")}
        print(f"{config.model.path}: {shape.total_params() / 1e9:.1f}B params, {config.model.dtype}, LoRA "
              f"r={config.lora.lora_rank} ({predicted.trainable_params / 1e6:.0f}M trainable), {d.world} x {card}, "
              f"{per_device} x {args.seq} tokens per device, activation checkpointing "
              f"{config.backend.activation_checkpointing}")
        print(f"{'build+materialise s':>20}{'update s':>10}{'tokens/s':>10}{'peak GiB/dev':>14}{'reserved':>10}"
              f"{'predicted':>11}{'error':>8}{'full FT needs':>15}")
        error = f"{100 * row['prediction_error']:+.0f}%" if row["prediction_error"] is not None else "-"
        print(f"{build_s:>20.1f}{step_s:>10.2f}{row['tokens_per_s']:>10.0f}{max_peak:>14.1f}"
              f"{max(r for _, r in peaks):>10.1f}{predicted.total_gib:>11.1f}{error:>8}{full.total_gib:>12.1f} GiB")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.baseline:
            base = json.loads(args.baseline.read_text())
            row["baseline"] = {k: base[k] for k in ("device", "devices", "tokens_per_s", "sequences_per_device")}
            # Weak scaling: the same work per device, so perfect scaling multiplies tokens/s by the device ratio.
            row["scaling_efficiency"] = row["tokens_per_s"] / (base["tokens_per_s"] * d.world / base["devices"])
            print(f"scaling from {base['devices']} to {d.world} devices ({base['sequences_per_device']} -> "
                  f"{per_device} sequences per device): {row['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                  f"efficiency {100 * row['scaling_efficiency']:.0f}%")
        args.out.write_text(json.dumps(row, indent=2) + "\n")
        print(f"written to {args.out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
