"""K LoRA adapters in one multi-LoRA job against K sequential single-adapter runs, same workload.

Each adapter has its own rank (alpha = 2 x rank), seed and prompts; a step is one rollout of
--prompts x --samples completions of --new-tokens tokens per adapter, then the GRPO update. The
sequential side is the single-adapter path of `lora_rl.trainer.train` (FSDP2 engine, embedded rollout
with the adapter merged while sampling, `trainer.grpo_update`), one adapter after the other; the packed
side is `lora_rl.multi` (one base model, one mixed rollout batch, `multi.multi_update`). Random-init
model of a named shape (nothing downloaded), random prompts and advantages; a random model never samples
EOS, so every completion is exactly --new-tokens long. Throughput is steady-state samples per second
(warm-up steps excluded; model building, evaluation and saving are left out on both sides). Both sides
are built first and then stepped in turn, so the machine's load drifts over both alike (all K + 1 models
are in memory at once).

    python benchmarks/multi_lora.py --device cpu --shape tiny
    python benchmarks/multi_lora.py --device cuda --shape qwen2.5-0.5b --out benchmarks/results/multi_lora_h100.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from report import write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from shapes import SHAPES  # noqa: E402


def _configs(args, dtype: str, micro: int) -> list:
    from lora_rl.config import load_config

    return [load_config(None, [f"model.dtype={dtype}", f"lora.lora_rank={r}", f"lora.lora_alpha={2 * r}",
                               f"run.seed={k}", f"run.output_dir=unused-{k}", f"rollout.prompts_per_step={args.prompts}",
                               f"rollout.group_size={args.samples}", f"rollout.max_new_tokens={args.new_tokens}",
                               f"train.micro_batch_size={micro}", "grpo.log_kl=false", "train.lr=1e-5"])
            for k, r in enumerate(args.ranks)]


def _model(args, device, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    shape = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(shape, dtype=getattr(torch, dtype)), shape


def _workload(args, vocab: int, seed: int):
    """One adapter's prompts and, per step, its advantages."""
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (args.prompt_tokens,), generator=g).tolist() for _ in range(args.prompts)]
    return prompts, g


def _batch(prompts_of, completions, args):
    """The update batch and behaviour log-probs of completions[i] sampled from prompts_of[i]."""
    import torch

    from lora_rl.batching import make_batch

    batch = make_batch(prompts_of, [c.token_ids for c in completions], 0)
    behaviour = torch.zeros_like(batch.completion_mask)
    for row, c in enumerate(completions):
        behaviour[row, args.prompt_tokens - 1:args.prompt_tokens - 1 + len(c.logprobs)] = torch.tensor(c.logprobs)
    return batch, behaviour


def _timed(sync, fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


class Solo:
    """One single-adapter run as `trainer.train` builds it: FSDP2 engine, merged-sampling embedded engine."""

    def __init__(self, args, device, dtype: str, config):
        import torch

        from lora_rl.backends.fsdp2 import FSDP2Engine
        from lora_rl.lora import inject_lora
        from lora_rl.rollout.embedded import EmbeddedEngine

        self.args, self.config = args, config
        model, shape = _model(args, device, dtype)
        torch.manual_seed(config.run.seed)
        self.backend = FSDP2Engine(inject_lora(model, config.lora), config, Path("."))
        tokenizer = type("Tok", (), {"eos_token_id": shape.vocab_size + 1, "pad_token_id": 0})()
        self.engine = EmbeddedEngine(self.backend.model, tokenizer, generation_context=self.backend.generation)
        self.prompts, self.g = _workload(args, shape.vocab_size, config.run.seed)

    def step(self, i: int, sync) -> tuple[float, float]:
        import torch

        from lora_rl.rollout import SamplingParams
        from lora_rl.trainer import grpo_update

        args = self.args
        params = SamplingParams(n=args.samples, max_new_tokens=args.new_tokens, temperature=1.0, seed=i)
        completions, r = _timed(sync, lambda: self.engine.generate(self.prompts, params))
        batch, behaviour = _batch([self.prompts[c.prompt_index] for c in completions], completions, args)
        advantages = torch.randn(len(completions), generator=self.g)
        _, u = _timed(sync, lambda: grpo_update(self.backend, batch, behaviour, advantages, self.config))
        return r, u


class Packed:
    """The K adapters in one multi-LoRA job (`lora_rl.multi`)."""

    def __init__(self, args, device, dtype: str, configs):
        from lora_rl.multi import MultiLoRAPolicy
        from lora_rl.rollout.embedded import EmbeddedEngine

        self.args, self.configs = args, configs
        model, shape = _model(args, device, dtype)
        self.policy = MultiLoRAPolicy(model, configs, device)
        tokenizer = type("Tok", (), {"eos_token_id": shape.vocab_size + 1, "pad_token_id": 0})()
        self.engine = EmbeddedEngine(self.policy.model, tokenizer, generation_context=self.policy.generation)
        self.workloads = [_workload(args, shape.vocab_size, c.run.seed) for c in configs]

    def step(self, i: int, sync) -> tuple[float, float]:
        import torch

        from lora_rl.multi import multi_update
        from lora_rl.rollout import AdapterRequest, SamplingParams

        args = self.args
        requests = [AdapterRequest(adapter=name, prompts=prompts,
                                   params=SamplingParams(n=args.samples, max_new_tokens=args.new_tokens,
                                                         temperature=1.0, seed=i))
                    for name, (prompts, _) in zip(self.policy.names, self.workloads, strict=True)]
        groups, r = _timed(sync, lambda: self.engine.generate_adapters(requests))
        flat = [(k, c) for k, comps in enumerate(groups) for c in comps]
        batch, behaviour = _batch([requests[k].prompts[c.prompt_index] for k, c in flat], [c for _, c in flat], args)
        advantages = torch.cat([torch.randn(len(comps), generator=g)
                                for comps, (_, g) in zip(groups, self.workloads, strict=True)])
        owners = [k for k, _ in flat]
        _, u = _timed(sync, lambda: multi_update(self.policy, batch, owners, behaviour, advantages, self.configs))
        return r, u


def measure(args, device, dtype: str, sync) -> list[dict]:
    """Both sides built up front, then step by step in turn (the K runs' step i, then the job's step i), so a
    change in the machine's load hits both alike."""
    packed_micro = args.packed_micro or args.micro
    sides = {"sequential": [Solo(args, device, dtype, c) for c in _configs(args, dtype, args.micro)],
             "packed": [Packed(args, device, dtype, _configs(args, dtype, packed_micro))]}
    seconds = {name: [0.0, 0.0] for name in sides}
    for i in range(args.warmup + args.steps):
        for name, runs in sides.items():
            for run in runs:
                r, u = run.step(i, sync)
                if i >= args.warmup:
                    seconds[name][0] += r
                    seconds[name][1] += u
    micro = {"sequential": args.micro, "packed": packed_micro}
    return [{"variant": name, "rollout_s": r, "update_s": u, "micro_batch_size": micro[name]}
            for name, (r, u) in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64], help="one adapter per rank")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per adapter per step")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--micro", type=int, default=64, help="rows per forward of a single-adapter run")
    parser.add_argument("--packed-micro", type=int, default=0,
                        help="rows per forward of the packed job (0: --micro, the same memory per forward)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file, or a folder for multi_lora_<device>.json")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    card = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    K = len(args.ranks)
    samples = K * args.prompts * args.samples * args.steps
    rows = measure(args, device, dtype, sync)
    for row in rows:
        row["total_s"] = row["rollout_s"] + row["update_s"]
        row["samples_per_s"] = samples / row["total_s"]
    speedup = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
    print(f"{args.shape}, {K} adapters (ranks {args.ranks}), per adapter and step {args.prompts} prompts x "
          f"{args.samples} samples x {args.new_tokens} new tokens, {args.steps} steps, {dtype}, {card}")
    print(f"{'variant':<12}{'rollout s':>10}{'update s':>10}{'total s':>9}{'samples/s':>11}{'micro':>7}")
    for r in rows:
        print(f"{r['variant']:<12}{r['rollout_s']:>10.2f}{r['update_s']:>10.2f}{r['total_s']:>9.2f}"
              f"{r['samples_per_s']:>11.1f}{r['micro_batch_size']:>7}")
    print(f"packed / sequential throughput: {speedup:.2f}x (rollout {rows[0]['rollout_s'] / rows[1]['rollout_s']:.2f}x, "
          f"update {rows[0]['update_s'] / rows[1]['update_s']:.2f}x)")
    out = args.out or Path("benchmarks/results")
    if out.suffix != ".json":
        out = out / f"multi_lora_{args.device}_{args.shape}.json"
    write_result(out, "multi_lora", card, args, speedup=speedup, rows=rows)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
