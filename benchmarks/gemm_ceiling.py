"""How fast the card runs a model shape's own GEMMs: the ceiling on a training step's MFU.

Times every matrix product of one training step of a named shape at a given token count, each on its
own (no other work in between): per decoder-layer linear the forward product, the input gradient and
the weight gradient, and the tied or untied vocabulary head. A LoRA step needs the first two for the
frozen base (its rank-r products are memory-bound and left out here); full fine-tuning needs all three.
The sum is what a step would take if everything that is not a base GEMM were free, so
model FLOPs / that time is the highest MFU either can reach on this card with these kernels
(torch.matmul, i.e. cuBLAS). A square 8192^3 product is timed for reference.

    python benchmarks/gemm_ceiling.py --shape qwen2.5-1.5b --tokens 8192 --out benchmarks/results/gemm_ceiling.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from report import device_and_dtype, write_result  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from shapes import SHAPES  # noqa: E402
from train_step import _peak_tflops  # noqa: E402


def _time(fn, device, reps: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def linears(shape: dict) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of one decoder layer's linears (Qwen2 / Llama layout)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x sequence length)")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length, for the attention FLOPs")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gemm_ceiling.json"))
    args = parser.parse_args()

    import torch

    device, dtype, card = device_and_dtype()
    shape, n = SHAPES[args.shape], args.tokens
    layers, vocab, h = shape["num_hidden_layers"], shape["vocab_size"], shape["hidden_size"]

    def product(m: int, k: int, cols: int) -> dict:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, cols, device=device, dtype=dtype)
        s = _time(lambda: torch.mm(a, b), device, args.reps)
        return {"m": m, "k": k, "n": cols, "s": s, "tflops": 2 * m * k * cols / s / 1e12}

    rows = []
    for name, fan_in, fan_out in [*linears(shape), ("lm_head", h, vocab)]:
        rows.append({"linear": name, "in": fan_in, "out": fan_out,
                     "forward": product(n, fan_in, fan_out),  # x W^T
                     "input_grad": product(n, fan_out, fan_in),  # dy W
                     "weight_grad": product(fan_out, n, fan_in)})  # dy^T x
    count = {r["linear"]: (1 if r["linear"] == "lm_head" else layers) for r in rows}
    lora_s = sum(count[r["linear"]] * (r["forward"]["s"] + r["input_grad"]["s"]) for r in rows)
    full_s = lora_s + sum(count[r["linear"]] * r["weight_grad"]["s"] for r in rows)
    kv = linears(shape)[1][2]
    per_layer = sum(fi * fo for _, fi, fo in linears(shape)) + 2 * h + h + 2 * kv  # + norms, q/k/v biases
    params = layers * per_layer + vocab * h * (1 if shape["tie_word_embeddings"] else 2) + h
    attention = 6 * layers * args.seq * h * n  # as train_step.py counts it
    peak = _peak_tflops(card)
    square = product(8192, 8192, 8192)
    ceiling = {}
    for kind, factor, seconds in (("lora", 4, lora_s), ("full", 6, full_s)):
        flops = factor * params * n + attention
        ceiling[kind] = {"gemm_s": seconds, "model_tflops_per_s": flops / seconds / 1e12,
                         "mfu_ceiling": flops / seconds / 1e12 / peak if peak else None}

    print(f"{args.shape}, {n} tokens, {card}; square 8192^3: {square['tflops']:.0f} TFLOP/s"
          + (f" ({100 * square['tflops'] / peak:.0f}% of the {peak:.0f} dense bf16 peak)" if peak else ""))
    print(f"{'linear':<11}{'in':>7}{'out':>8}{'forward':>10}{'input grad':>12}{'weight grad':>13}   TFLOP/s")
    for r in rows:
        print(f"{r['linear']:<11}{r['in']:>7}{r['out']:>8}" + "".join(
            f"{r[k]['tflops']:>{w}.0f}" for k, w in (("forward", 10), ("input_grad", 12), ("weight_grad", 13))))
    for kind, c in ceiling.items():
        mfu = f", MFU ceiling {100 * c['mfu_ceiling']:.0f}%" if c["mfu_ceiling"] else ""
        print(f"{kind}: base GEMMs alone {1e3 * c['gemm_s']:.1f} ms per step, "
              f"{c['model_tflops_per_s']:.0f} model TFLOP/s{mfu}")
    write_result(args.out, "gemm_ceiling", card, args, dtype=str(dtype), params=params, square_8192=square,
                 rows=rows, ceiling=ceiling)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
