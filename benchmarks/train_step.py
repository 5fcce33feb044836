"""LoRA vs full fine-tuning on one device, through the project's own training path, side by side.

Each variant builds a random-init model of a named shape (no weights can be downloaded) and runs the
real FSDP2 engine (`lora_rl.backends.fsdp2.FSDP2Engine`, one process) with the GRPO loss:

  step     one training step: log-probs with grad, clipped decoupled-PPO loss, backward, clipped AdamW step
  update   the whole GRPO update, `lora_rl.trainer.grpo_update`: proximal (and, for LoRA, reference)
           log-prob recompute, then the step

Variants: full fine-tuning with plain log-probs, chunked log-probs, and chunked + compiled layers; LoRA
as plain PEFT gives it (float32 adapters, plain log-probs, peft's forward), with adapters in the model
dtype and chunked log-probs, with each LoRA linear as one fused op (`train.fused_lora`) and
plain or chunked log-probs, and as lora-rl trains it by default: fused, each SiLU-gated MLP as one
op with a Triton backward (`train.fused_mlp`; "LoRA, fused linears only" switches that off), each
attention's q, k and v as one LoRA linear (`train.fused_qkv`; "LoRA, separate q k v" switches that off),
chunked, each decoder layer under torch.compile (`backend.compile`). `--profile` adds each variant's top CUDA kernels.
Model-FLOPs utilisation counts 6N per token for full fine-tuning and 4N for LoRA (no weight gradients
for the frozen base), plus causal attention, against the card's dense bf16 peak.

    python benchmarks/train_step.py --shape qwen2.5-1.5b --batch 8 --seq 1024 --out benchmarks/results/train_step.json
    python benchmarks/train_step.py --shape qwen2.5-7b --batch 4 --activation-checkpointing ...

Prints a table, writes JSON and a PNG bar chart beside it.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import statistics
import time
from pathlib import Path

from report import device_kernels, write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from shapes import SHAPES  # noqa: E402
from lora_rl.config import BackendConfig  # noqa: E402

DEFAULT_BUDGET = BackendConfig().compile_memory_budget  # backend.compile_memory_budget's default
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts

VARIANTS = {
    "full, plain logprobs": dict(use_lora=False, chunked=False, plain_peft=False, fused=False, compile=False, master=True),
    "full, chunked logprobs": dict(use_lora=False, chunked=True, plain_peft=False, fused=False, compile=False, master=True),
    "full, chunked+compile": dict(use_lora=False, chunked=True, plain_peft=False, fused=False, compile=True, master=True),
    # Pure 16-bit AdamW (train.master_weights=false): faster and smaller for full fine-tuning, but it
    # rounds away updates below half a bf16 step of each weight (lora_rl/optim.py).
    "full, bf16 AdamW": dict(use_lora=False, chunked=True, plain_peft=False, fused=False, compile=True, master=False),
    # Each decoder layer's training pass replayed as CUDA graphs (backend.cuda_graphs), on the compiled layers.
    "full, CUDA graphs": dict(use_lora=False, chunked=True, plain_peft=False, fused=False, compile=True, master=True,
                              graphs=True),
    # backend.compile_memory_budget=1: the compiled layers keep every activation they save, where the default
    # (0.9) recomputes the cheap ones in the backward. Run these in a process of their own (main() refuses a
    # mix): compiled layers are shared in a process.
    "full, keep activations": dict(use_lora=False, chunked=True, plain_peft=False, fused=False, compile=True,
                                   master=True, budget=1.0),
    "LoRA, plain PEFT": dict(use_lora=True, chunked=False, plain_peft=True, fused=False, compile=False, master=True),
    "LoRA, chunked": dict(use_lora=True, chunked=True, plain_peft=False, fused=False, compile=False, master=True),
    "LoRA, fused, plain logprobs": dict(use_lora=True, chunked=False, plain_peft=False, fused=True, compile=False, master=True),
    "LoRA, fused, no compile": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=False, master=True),
    "LoRA, lora-rl default": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True, master=True),
    # train.fused_mlp=false: each MLP linear its own fused op, silu(gate)*up kept or recomputed for down's
    # A gradient and the activation's gradients read again by gate's and up's B-gradient GEMMs.
    "LoRA, fused linears only": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True,
                                     master=True, fused_mlp=False),
    # train.fused_qkv=false: q, k and v each their own fused op, each reading the layer's input itself.
    "LoRA, separate q k v": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True,
                                 master=True, fused_qkv=False),
    # The frozen head recomputes each slice's logits in the backward, as full fine-tuning's must, instead of
    # forming the hidden states' gradient in the forward (batching.FROZEN_HEAD_GRAD_IN_FORWARD).
    "LoRA, head recomputes": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True, master=True,
                                  head_in_forward=False),
    "LoRA, bf16 AdamW": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True, master=False),
    "LoRA, keep activations": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True,
                                   master=True, budget=1.0),
    "LoRA, CUDA graphs": dict(use_lora=True, chunked=True, plain_peft=False, fused=True, compile=True, master=True,
                              graphs=True),
}


def _peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def run_variant(name: str, args, device) -> dict:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lora_rl import batching, grpo
    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.batching import make_batch
    from lora_rl.config import load_config
    from lora_rl.lora import inject_lora
    from lora_rl.trainer import grpo_update

    v = VARIANTS[name]
    batching.FROZEN_HEAD_GRAD_IN_FORWARD = v.get("head_in_forward", True)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    micro = args.micro or args.batch
    config = load_config(None, [f"model.dtype={dtype}", f"lora.use_lora={v['use_lora']}", "lora.lora_rank=16",
                                "lora.lora_alpha=32", f"train.micro_batch_size={micro}", "rollout.group_size=2",
                                f"rollout.prompts_per_step={max(1, args.batch // 2)}", "grpo.log_kl=false",
                                f"train.chunked_logprobs={v['chunked']}", "train.lr=1e-5",
                                f"train.fused_lora={v['fused']}", f"train.master_weights={v['master']}",
                                f"train.fused_mlp={v.get('fused_mlp', True)}",
                                f"train.fused_qkv={v.get('fused_qkv', True)}",
                                f"backend.cuda_graphs={v.get('graphs', False)}",
                                f"backend.compile_memory_budget={v.get('budget', DEFAULT_BUDGET)}",
                                f"backend.compile={v['compile']}",
                                f"backend.activation_checkpointing={args.activation_checkpointing}"])
    torch.manual_seed(0)
    shape = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=max(2048, args.seq))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape, dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    if v["use_lora"] and v["plain_peft"]:  # peft's defaults: adapters upcast to float32
        model = get_peft_model(model, PeftLoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    elif v["use_lora"]:
        model = inject_lora(model, config.lora)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if v["use_lora"]:
            model.enable_input_require_grads()
    engine = FSDP2Engine(model, config, Path("."))
    g = torch.Generator().manual_seed(0)
    half = args.seq // 2
    prompts = [torch.randint(0, shape.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    completions = [torch.randint(0, shape.vocab_size, (half,), generator=g).tolist() for _ in range(args.batch)]
    batch = make_batch(prompts, completions, pad_id=0).to(device)
    behaviour = torch.full(batch.completion_mask.shape, -12.0, device=device)
    advantages = torch.randn(args.batch, generator=g).to(device)

    def step():
        tokens = batch.completion_mask.sum()
        for start in range(0, args.batch, micro):
            rows = slice(start, start + micro)
            logp, _ = engine.logprobs(batch.select(rows), 1.0, with_grad=True)
            loss, _, _ = grpo.policy_loss(logp, logp.detach(), advantages[rows], batch.completion_mask[rows],
                                          clip_low=0.2, clip_high=0.28, global_tokens=tokens,
                                          behaviour_logp=behaviour[rows], importance_cap=None)
            engine.backward(loss)
        engine.optimizer_step()

    def timed(fn):
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = float("nan")
        if device.type == "cuda":
            # A CUDA graph's replays reuse its private pool without asking the allocator, so allocated
            # bytes miss the activations of graphed layers: for those, count the reserved bytes (an upper
            # bound: they also hold cached, unused blocks).
            graphed = engine.graphed is not None
            peak = (torch.cuda.max_memory_reserved() if graphed else torch.cuda.max_memory_allocated()) / 2 ** 30
        return statistics.median(times[args.warmup:]), peak

    step_s, step_peak = timed(step)
    profile = _profile(step, args.out.with_suffix(f".{_slug(name)}.kernels.txt")) if args.profile else {}
    update_s, update_peak = timed(lambda: grpo_update(engine, batch, behaviour, advantages, config))
    tokens = args.batch * args.seq
    h, layers = SHAPES[args.shape]["hidden_size"], SHAPES[args.shape]["num_hidden_layers"]
    attention = 6 * layers * args.seq * h  # causal QK^T and AV, forward + backward, per token
    flops_per_token = (4 if v["use_lora"] else 6) * n_params + attention
    row = {"variant": name, **v, "params": n_params,
           "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "step_s": step_s, "step_tokens_per_s": tokens / step_s, "step_peak_gib": step_peak,
           "update_s": update_s, "update_peak_gib": update_peak,
           "model_tflops_per_s": flops_per_token * tokens / step_s / 1e12, **profile}
    del engine, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _profile(fn, path: Path) -> dict:
    """One more step under torch.profiler: GPU busy time split into GEMMs and the rest, and the top
    kernels by self GPU time written to `path`. Busy time well under the step time means the step
    waits on the CPU (launches, Python)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = device_kernels(prof.key_averages())
    gemm_words = ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90")
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    gemm = sum(e.self_device_time_total for e in kernels if any(w in e.key.lower() for w in gemm_words)) / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    idle_ms, idle_by_op = _gpu_idle(prof.events())
    path.write_text("\n".join(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:150]}" for e in top)
                    + "\n\nhost (self CPU time)\n"
                    + "\n".join(f"{e.self_cpu_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:150]}" for e in cpu)
                    + f"\n\nGPU idle between the step's first and last kernel: {idle_ms:.2f} ms; what the host was "
                      "running then (an idle gap counts for every host range that spans it)\n"
                    + "\n".join(f"{ms:9.2f} ms  {name[:150]}" for name, ms in idle_by_op) + "\n")
    return {"gpu_busy_ms": busy, "gemm_ms": gemm, "kernel_launches": sum(e.count for e in kernels),
            "gpu_idle_ms": idle_ms}


def _gpu_idle(events, min_gap_us: float = 5.0) -> tuple[float, list[tuple[str, float]]]:
    """GPU idle time inside a profiled step (gaps between kernels), and for each host range (ops,
    record_function labels) the idle time it spans: where the GPU waited for the host."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end) for e in device_kernels(events))
    gaps, end = [], spans[0][1] if spans else 0
    for start, stop in spans[1:]:
        if start - end > min_gap_us:
            gaps.append((end, start))
        end = max(end, stop)
    gap_ends = [hi for _, hi in gaps]
    credit: dict[str, float] = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        i = bisect.bisect_right(gap_ends, e.time_range.start)  # the first gap ending after the range starts
        while i < len(gaps) and gaps[i][0] < e.time_range.end:
            lo, hi = gaps[i]
            credit[e.name] = credit.get(e.name, 0.0) + (min(hi, e.time_range.end) - max(lo, e.time_range.start)) / 1e3
            i += 1
    return sum(hi - lo for lo, hi in gaps) / 1e3, sorted(credit.items(), key=lambda kv: -kv[1])[:30]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro", type=int, default=0, help="sequences per forward/backward (0: the whole batch)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--profile", action="store_true", help="also profile one step of each variant (CUDA)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = parser.parse_args()
    if len({VARIANTS[name].get("budget", DEFAULT_BUDGET) for name in args.variants if VARIANTS[name]["compile"]}) > 1:
        # In one process, decoder layers of the same structure share one compiled graph: the second
        # budget would silently run the first one's graph.
        parser.error("--variants mixes compile memory budgets (the 'keep activations' variants with others): "
                     "run each budget in its own process")

    import torch

    from lora_rl import distributed

    distributed.init()
    device = distributed.device()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = _peak_tflops(card)
    rows = [run_variant(name, args, device) for name in args.variants]
    # Ratios against full fine-tuning that keeps float32 masters (the run that trains at RL learning
    # rates), and, where it ran, against pure bf16 AdamW full fine-tuning.
    full = [r for r in rows if not r["use_lora"] and r["master"]]
    bf16_full = [r for r in rows if not r["use_lora"] and not r["master"]]
    for r in rows:
        for suffix, ref in (("", full), ("_bf16_full", bf16_full)):
            if ref:
                r[f"step_vs_fastest_full{suffix}"] = r["step_s"] / min(x["step_s"] for x in ref)
                r[f"peak_vs_full{suffix}"] = r["step_peak_gib"] / min(x["step_peak_gib"] for x in ref)
        r["mfu"] = r["model_tflops_per_s"] / peak if peak else None
    print(f"{args.shape}, batch {args.batch} x {args.seq}, micro {args.micro or args.batch}, "
          f"activation checkpointing {args.activation_checkpointing}, {card}")
    nan = float("nan")
    print(f"{'variant':<28}{'step s':>8}{'tok/s':>9}{'peak GiB':>10}{'x full':>8}{'mem x':>7}{'x bf16':>8}{'mem x':>7}"
          f"{'MFU':>6}{'update s':>10}{'upd GiB':>9}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] else "-"
        print(f"{r['variant']:<28}{r['step_s']:>8.3f}{r['step_tokens_per_s']:>9.0f}{r['step_peak_gib']:>10.1f}"
              f"{r.get('step_vs_fastest_full', nan):>8.2f}{r.get('peak_vs_full', nan):>7.2f}"
              f"{r.get('step_vs_fastest_full_bf16_full', nan):>8.2f}{r.get('peak_vs_full_bf16_full', nan):>7.2f}"
              f"{mfu:>6}{r['update_s']:>10.3f}{r['update_peak_gib']:>9.1f}"
              + (f"  GPU busy {r['gpu_busy_ms']:.0f} ms, idle {r['gpu_idle_ms']:.0f} ms, GEMM {r['gemm_ms']:.0f} ms, "
                 f"{r['kernel_launches']} kernels" if "gpu_busy_ms" in r else ""))
    print("x full / mem x: against the fastest and smallest full fine-tuning with float32 master weights; "
          "x bf16 / mem x: against full fine-tuning with pure bf16 AdamW (nan: not run)")
    write_result(args.out, "train_step", card, args, rows=rows)
    _plot(rows, args.out.with_suffix(".png"), f"{args.shape} on {card}")
    print(f"written to {args.out} and {args.out.with_suffix('.png')}")
    distributed.shutdown()


def _plot(rows, path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 3)
    labels = [r["variant"].replace(", ", "\n") for r in rows]
    colors = ["tab:gray" if not r["use_lora"] else "tab:blue" for r in rows]
    for ax, key, name in zip(axes, ("step_s", "step_peak_gib", "update_s"),
                             ("s per training step", "peak GiB", "s per GRPO update"), strict=True):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})


if __name__ == "__main__":
    main()
