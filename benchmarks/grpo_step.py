"""A whole GRPO step, rollout included, for LoRA and full fine-tuning on one device, side by side.

The workload of FIELD_NOTES section 6's TRL comparison: a random-init Qwen2.5-0.5B-shaped model,
8 prompts x 8 samples x 256 new tokens, LoRA r=16 all-linear. Each variant runs the project's own
pieces as `lora_rl.trainer.train` does: the embedded rollout engine inside the FSDP2 engine's
`generation()` context, then `trainer.grpo_update`. LoRA is run with the adapter merged into the
weights while sampling (the default, `rollout.merge_for_generation`) and unmerged (plain PEFT). Every
generated token's forward is a CUDA graph replay (`rollout.cuda_graphs`, the default); the "eager
decoding" variants launch it from Python instead.
A random-init model never samples EOS, so every completion is exactly --new-tokens long.

    python benchmarks/grpo_step.py --out benchmarks/results/grpo_step.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import time
from pathlib import Path

from report import device_kernels, write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from shapes import SHAPES  # noqa: E402

VARIANTS = {
    "full fine-tuning": dict(use_lora=False, merge=False, graphs=True),
    "LoRA, unmerged sampling": dict(use_lora=True, merge=False, graphs=True),
    "LoRA, merged sampling": dict(use_lora=True, merge=True, graphs=True),
    # rollout.cuda_graphs=false: every generated token's forward launched from Python, as before it
    "full fine-tuning, eager decoding": dict(use_lora=False, merge=False, graphs=False),
    "LoRA, merged sampling, eager decoding": dict(use_lora=True, merge=True, graphs=False),
}


def _build(name: str, args, device):
    """One variant's FSDP2 engine, embedded rollout engine, prompts and sampling parameters."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from lora_rl.backends.fsdp2 import FSDP2Engine
    from lora_rl.config import load_config
    from lora_rl.lora import inject_lora
    from lora_rl.rollout import SamplingParams
    from lora_rl.rollout.embedded import EmbeddedEngine

    v = VARIANTS[name]
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = load_config(None, [f"model.dtype={dtype}", f"lora.use_lora={v['use_lora']}", "lora.lora_rank=16",
                                "lora.lora_alpha=32", f"rollout.prompts_per_step={args.prompts}",
                                f"rollout.group_size={args.samples}", f"rollout.max_new_tokens={args.new_tokens}",
                                f"rollout.merge_for_generation={v['merge']}", f"rollout.cuda_graphs={v['graphs']}",
                                f"train.micro_batch_size={args.micro}",
                                "grpo.log_kl=false", "train.lr=1e-5", *args.set])
    torch.manual_seed(0)
    shape = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape, dtype=getattr(torch, dtype))
    if v["use_lora"]:
        model = inject_lora(model, config.lora)
    backend = FSDP2Engine(model, config, Path("."))
    engine = EmbeddedEngine(backend.model, type("Tok", (), {"eos_token_id": shape.vocab_size + 1,
                                                            "pad_token_id": 0})(),
                            generation_context=backend.generation, cuda_graphs=config.rollout.cuda_graphs)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, shape.vocab_size, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.prompts)]
    params = SamplingParams(n=args.samples, max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    return backend, engine, prompts, params, g, config


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _one_step(built, args, device) -> tuple[float, float]:
    """One GRPO step of a built variant: (rollout seconds, update seconds)."""
    import torch

    from lora_rl.batching import make_batch
    from lora_rl.trainer import grpo_update

    backend, engine, prompts, params, g, config = built
    _sync(device)
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    _sync(device)
    middle = time.perf_counter()
    batch = make_batch([prompts[c.prompt_index] for c in completions], [c.token_ids for c in completions], 0)
    behaviour = torch.zeros_like(batch.completion_mask)
    for row, c in enumerate(completions):
        behaviour[row, args.prompt_tokens - 1:args.prompt_tokens - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    advantages = torch.randn(len(completions), generator=g)
    grpo_update(backend, batch, behaviour, advantages, config)
    _sync(device)
    return middle - start, time.perf_counter() - middle


def run_variant(name: str, args, device) -> dict:
    import torch

    v = VARIANTS[name]
    built = _build(name, args, device)
    backend, engine, prompts, params = built[:4]
    model = backend.model
    sync = functools.partial(_sync, device)
    rollout_s, update_s = [], []
    for i in range(args.warmup + args.steps):
        rollout, update = _one_step(built, args, device)
        if i >= args.warmup:
            rollout_s.append(rollout)
            update_s.append(update)
    if args.profile_rollout:
        _profile_rollout(lambda: engine.generate(prompts, params), sync,
                         args.out.with_suffix(f".{''.join(c if c.isalnum() else '_' for c in name)}.rollout.txt"))
    generated = args.prompts * args.samples * args.new_tokens
    row = {"variant": name, **v, "rollouts_s": rollout_s, "updates_s": update_s}
    _summarise(row, generated)
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    del engine, backend, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def alternate_steps(args, device) -> list[dict]:
    """Whole steps with every variant's model held in one process, a step of each in turn, --alternate
    rounds in alternating order after --warmup rounds. Sampling a small model is bound by the host, whose
    speed differs between processes (the same rollout took 4.6 and 8.3 s in two processes on one host):
    here the variants share one process, so their times compare directly."""
    built = {name: _build(name, args, device) for name in args.variants}
    rows = {name: {"variant": name, **VARIANTS[name], "rollouts_s": [], "updates_s": []} for name in args.variants}
    for i in range(args.warmup + args.alternate):
        for name in (args.variants if i % 2 == 0 else args.variants[::-1]):
            rollout, update = _one_step(built[name], args, device)
            if i >= args.warmup:
                rows[name]["rollouts_s"].append(rollout)
                rows[name]["updates_s"].append(update)
    generated = args.prompts * args.samples * args.new_tokens
    for row in rows.values():
        _summarise(row, generated)
        row["peak_gib"] = float("nan")  # every variant's model is held at once: no per-variant peak
    return list(rows.values())


def _summarise(row: dict, generated: int) -> None:
    """Medians over every timed step of the variant (of all its rounds)."""
    row["rollout_s"], row["update_s"] = statistics.median(row["rollouts_s"]), statistics.median(row["updates_s"])
    row["step_s"] = row["rollout_s"] + row["update_s"]
    row["rollout_tokens_per_s"] = generated / row["rollout_s"]


def _rounds(args) -> list[dict]:
    """Each variant in a fresh process, --rounds times, the order reversed every other round (A B C C B A
    ...): the host sets the pace of sampling a small model, and its speed drifts over minutes (the same
    rollout measured 4.9 s and 6.0 s in successive processes), so a fixed order would favour one side."""
    rows = {}
    for i in range(args.rounds):
        for name in (args.variants if i % 2 == 0 else args.variants[::-1]):
            row = _in_own_process(name, args)
            if name in rows:
                rows[name]["rollouts_s"] += row["rollouts_s"]
                rows[name]["updates_s"] += row["updates_s"]
                rows[name]["peak_gib"] = max(rows[name]["peak_gib"], row["peak_gib"])
            else:
                rows[name] = row
    generated = args.prompts * args.samples * args.new_tokens
    for row in rows.values():
        _summarise(row, generated)
    return [rows[name] for name in args.variants]


def _in_own_process(name: str, args) -> dict:
    """One variant in a fresh process: sampling is bound by the host, and in one long process later
    variants ran slower than earlier ones whatever they were (measured: LoRA merged sampling 4.90 s
    first, full 8.06 s second, LoRA merged again 8.43 s third)."""
    import subprocess
    import sys

    part = args.out.with_suffix(f".{''.join(c if c.isalnum() else '_' for c in name)}.part.json")
    command = [sys.executable, __file__, "--variants", name, "--no-isolate", "--out", str(part)]
    for key in ("shape", "prompts", "samples", "prompt_tokens", "new_tokens", "micro", "steps", "warmup"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.profile_rollout:
        command.append("--profile-rollout")
    if args.set:
        command += ["--set", *args.set]
    subprocess.run(command, check=True)
    row = json.loads(part.read_text())["rows"][0]
    part.unlink()
    return row


def _profile_rollout(fn, sync, path: Path) -> None:
    """One more rollout under cProfile (host time by function) and torch.profiler (GPU busy time):
    sampling a small model is bound by the host, so the Python profile says where its time goes."""
    import cProfile
    import io
    import pstats

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    kernels = device_kernels(prof.key_averages())
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    launches = sum(e.count for e in kernels)
    top = "".join(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:7d}x  {e.key[:110]}\n"
                  for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15])
    host = cProfile.Profile()
    start = time.perf_counter()
    host.runcall(fn)
    sync()
    wall = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(25)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"rollout {wall:.2f} s under cProfile; GPU busy {busy:.0f} ms, {launches} kernels\n{top}\n"
                    f"{text.getvalue()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--micro", type=int, default=64, help="sequences per micro-batch (64: train.micro_batch_size's "
                        "default, the whole batch; the README's earlier tables used 16)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--profile-rollout", action="store_true", help="also profile one rollout of each variant")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides for every variant, e.g. grpo.recompute_proximal=true")
    parser.add_argument("--isolate", default=True, action=argparse.BooleanOptionalAction,
                        help="run each variant in its own process (default)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, in alternating order")
    parser.add_argument("--alternate", type=int, default=0, metavar="N",
                        help="all variants in one process, a step of each in turn, N timed rounds in alternating order")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/grpo_step.json"))
    args = parser.parse_args()

    import torch

    from lora_rl import distributed

    distributed.init()
    device = distributed.device()
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if args.alternate:
        rows = alternate_steps(args, device)
    elif args.isolate and len(args.variants) > 1:
        rows = _rounds(args)
    else:
        rows = [run_variant(name, args, device) for name in args.variants]
    full = next((r for r in rows if not r["use_lora"]), None)
    for r in rows:
        r["step_vs_full"] = r["step_s"] / full["step_s"] if full else None
        r["rollout_vs_full"] = r["rollout_s"] / full["rollout_s"] if full else None
    print(f"{args.shape}: {args.prompts} prompts x {args.samples} samples x {args.new_tokens} new tokens, {card}")
    print(f"{'variant':<26}{'rollout s':>10}{'update s':>10}{'step s':>8}{'gen tok/s':>11}{'step x full':>12}"
          f"{'gen x full':>11}{'peak GiB':>10}")
    for r in rows:
        print(f"{r['variant']:<26}{r['rollout_s']:>10.2f}{r['update_s']:>10.2f}{r['step_s']:>8.2f}"
              f"{r['rollout_tokens_per_s']:>11.0f}{(r['step_vs_full'] or 0):>12.2f}{(r['rollout_vs_full'] or 0):>11.2f}"
              f"{r['peak_gib']:>10.1f}")
    write_result(args.out, "grpo_step", card, args, rows=rows)
    print(f"written to {args.out}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
