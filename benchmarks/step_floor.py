"""The least time a LoRA training step of a shape can take on this card with today's kernels: the MFU bound.

`gemm_ceiling.py` bounds MFU by the frozen base's GEMMs alone. A step must also run attention, the
SiLU-gated MLP's activation, the norms and the adapters' rank-r products. This script times each of
those on its own at the training shape, in the layout lora-rl trains in by default (q, k and v as one
product, `train.fused_qkv`), and adds them up:

  base GEMMs     per layer the forward product and the input gradient of qkv, o, gate, up and down,
                 plus the vocabulary head's (cuBLAS)
  attention      causal SDPA forward + backward with the key-value heads as given (torch's choice:
                 cuDNN on an H100)
  activation     silu(g) * u forward + backward, compiled to one elementwise kernel each way
  norms          two RMSNorms per layer (and the final one) forward + backward, compiled, frozen weights
  rank-r         the attention adapters' products: x A^T, (x A^T) B^T added to the output, dY B, the A
                 and B gradients and (dY B) A added to the input gradient (cuBLAS, as lora-rl runs them)

The MLP adapters' rank-r work counts as free: lora-rl's Triton kernels fold it into the activation's
passes over the [tokens, intermediate] tensors (`lora_rl/fused_mlp.py`), so the bare activation is
the floor for both (what the kernels cost above it: the profile of train_step.py --profile).

Left out, so the sum is still a lower bound: rotary embeddings, residual adds, the log-prob head's
reduction, the loss, the optimizer, and any GPU idle time. The sum is also timed as one sustained
sequence, in a step's order, since clocks drop under sustained load, and on a GPU that sequence is
profiled once: its kernels' summed time is the GPU work the floor holds, with no host time in it (the
small elementwise parts timed alone wait on their own launches), comparable with train_step.py
--profile's "GPU busy". Model FLOPs (4N per token plus causal attention, as train_step.py counts them)
over each time is the highest MFU a step can reach unless work is fused into the GEMMs themselves
(custom GEMM kernels).

Gradients are taken with torch.autograd.grad, not .backward(): inside a step the activations' and
attention inputs' gradients are fresh tensors, never added onto a leaf's .grad (an extra pass each).

    python benchmarks/step_floor.py --shape qwen2.5-1.5b --batch 8 --seq 1024 --out benchmarks/results/step_floor.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gemm_ceiling import _time  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from report import device_and_dtype, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402
from train_step import _peak_tflops, _profile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/step_floor.json"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    device, dtype, card = device_and_dtype()
    shape = SHAPES[args.shape]
    n, r = args.batch * args.seq, args.rank
    layers, vocab, h, inter = (shape[k] for k in ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size"))
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim, kv = h // heads, h // heads * kv_heads
    # Compiled on a GPU, as the decoder layers are; the CPU run only checks that the script works.
    compile_ = torch.compile if device.type == "cuda" else (lambda fn: fn)

    def rand(*size, grad=False):
        return torch.randn(*size, device=device, dtype=dtype).mul_(0.05).requires_grad_(grad)

    # The adapted linears as the default layout runs them: (name, in, out)
    linears = [("qkv_proj", h, h + 2 * kv), ("o_proj", h, h), ("gate_proj", h, inter), ("up_proj", h, inter),
               ("down_proj", inter, h)]

    parts = {}  # name -> (function, times per step)
    # Not in the sum: the same base products accumulating onto an output that holds the low-rank term
    # (beta=1), as lora-rl's linears run most of them, for what that epilogue costs.
    accumulating = {}
    for name, fan_in, fan_out in linears:
        x, dy, w = rand(n, fan_in), rand(n, fan_out), rand(fan_out, fan_in)
        a, b, out, dx = rand(r, fan_in), rand(fan_out, r), rand(n, fan_out), rand(n, fan_in)
        parts[f"base {name}"] = (lambda x=x, dy=dy, w=w: (torch.mm(x, w.t()), torch.mm(dy, w)), layers)
        accumulating[name] = lambda x=x, dy=dy, w=w, out=out, dx=dx: (out.addmm_(x, w.t()), dx.addmm_(dy, w))

        def rank_r(x=x, dy=dy, a=a, b=b, out=out, dx=dx):
            xa = torch.mm(x, a.t())
            out.addmm_(xa, b.t())
            gb = torch.mm(dy, b)
            torch.mm(gb.t(), x), torch.mm(dy.t(), xa)  # the A and B gradients
            dx.addmm_(gb, a)
        if name in ("qkv_proj", "o_proj"):
            parts[f"rank-r {name}"] = (rank_r, layers)
    head_x, head_dy, head_w = rand(n, h), rand(n, vocab), rand(vocab, h)
    parts["base lm_head"] = (lambda: (torch.mm(head_x, head_w.t()), torch.mm(head_dy, head_w)), 1)

    q, k, v = (rand(args.batch, c, args.seq, head_dim, grad=True) for c in (heads, kv_heads, kv_heads))
    attention_grad = rand(args.batch, heads, args.seq, head_dim)
    parts["attention"] = (lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), attention_grad), layers)

    swiglu = compile_(lambda g, u: F.silu(g) * u)
    g, u, dh = rand(n, inter, grad=True), rand(n, inter, grad=True), rand(n, inter)
    parts["activation"] = (lambda: torch.autograd.grad(swiglu(g, u), (g, u), dh), layers)

    @compile_
    def rms_norm(x, weight):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * weight
    norm_x, norm_w, norm_dy = rand(n, h, grad=True), rand(h), rand(n, h)
    parts["norms"] = (lambda: torch.autograd.grad(rms_norm(norm_x, norm_w), norm_x, norm_dy), 2 * layers + 1)

    rows = []
    for name, (fn, count) in parts.items():
        seconds = _time(fn, device, args.reps)
        rows.append({"part": name, "ms": 1e3 * seconds, "per_step": count, "step_ms": 1e3 * seconds * count})

    base_ms = sum(row["step_ms"] for row in rows if row["part"].startswith("base ") and row["part"] != "base lm_head")
    accumulating_ms = sum(1e3 * _time(fn, device, args.reps) * layers for fn in accumulating.values())

    def sustained():
        # every part as often as a step runs it, layer by layer
        per_layer = [fn for fn, count in parts.values() if count == layers]
        norm = parts["norms"][0]
        for _ in range(layers):
            for fn in per_layer:
                fn()
            norm(), norm()
        norm()
        parts["base lm_head"][0]()
    sustained_s = _time(sustained, device, max(2, args.reps // 5))
    # GPU busy / GEMM / idle ms of one sustained sequence, its top kernels beside the JSON
    profile = _profile(sustained, args.out.with_suffix(".kernels.txt")) if device.type == "cuda" else {}

    per_layer = sum(fi * fo for _, fi, fo in linears) + 2 * h + h + 2 * kv  # + norms, q/k/v biases
    params = layers * per_layer + vocab * h * (1 if shape["tie_word_embeddings"] else 2) + h
    flops = 4 * params * n + 6 * layers * args.seq * h * n  # as train_step.py counts a LoRA step
    peak = _peak_tflops(card)
    summed_s = sum(row["step_ms"] for row in rows) / 1e3
    bounds = {kind: {"s": s, "model_tflops_per_s": flops / s / 1e12,
                     "mfu_bound": flops / s / 1e12 / peak if peak else None}
              for kind, s in (("sum_of_parts", summed_s), ("sustained_sequence", sustained_s),
                              ("sustained_gpu_work", profile.get("gpu_busy_ms", 0) / 1e3)) if s > 0}
    mfu_half_s = flops / (0.5 * peak * 1e12) if peak else None

    print(f"{args.shape}: {args.batch} x {args.seq} tokens, r={r}, {dtype}, {card}")
    print(f"{'part':<20}{'ms each':>9}{'x step':>8}{'ms/step':>9}")
    for row in rows:
        print(f"{row['part']:<20}{row['ms']:>9.3f}{row['per_step']:>8}{row['step_ms']:>9.2f}")
    print(f"the layers' base GEMMs accumulating onto their outputs: {accumulating_ms:.2f} ms/step "
          f"against {base_ms:.2f} ms writing them")
    for kind, bound in bounds.items():
        mfu = f", MFU at most {100 * bound['mfu_bound']:.0f}%" if bound["mfu_bound"] else ""
        print(f"{kind}: {1e3 * bound['s']:.1f} ms{mfu}")
    if profile:
        print(f"the sustained sequence profiled: GPU busy {profile['gpu_busy_ms']:.1f} ms (GEMM {profile['gemm_ms']:.1f}), "
              f"idle {profile['gpu_idle_ms']:.1f} ms, {profile['kernel_launches']} kernels")
    if mfu_half_s:
        print(f"MFU 50% needs the whole step in {1e3 * mfu_half_s:.1f} ms")
    write_result(args.out, "step_floor", card, args, dtype=str(dtype), params=params, model_flops=flops, rows=rows,
                 bounds=bounds, sustained_profile=profile, mfu_half_step_s=mfu_half_s, layer_base_ms=base_ms,
                 layer_base_accumulating_ms=accumulating_ms)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
