"""Which scaled-dot-product attention kernel is fastest at a model shape's training size.

Times one decoder layer's attention, forward and backward (causal, bf16 on a GPU), under each SDPA
backend torch offers (cuDNN, flash, memory-efficient, math) and under torch's own choice ("default":
what training gets), with the key/value heads passed as they are
(`enable_gqa`, as transformers calls SDPA when there is no padding mask) and repeated to the query heads
first (as it does with one), per layer and times the layer count. Each backend's query gradient is
checked against the first one's before it is timed; a backend that refuses the call gets its error.

    python benchmarks/attention_backends.py --shape qwen2.5-1.5b --batch 8 --seq 1024 --out benchmarks/results/attention_backends.json
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from gemm_ceiling import _time  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from report import device_and_dtype, write_result  # noqa: E402
from shapes import SHAPES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attention_backends.json"))
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, dtype, card = device_and_dtype()
    shape = SHAPES[args.shape]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads
    layers = shape["num_hidden_layers"]

    def tensor(n_heads: int) -> torch.Tensor:
        return torch.randn(args.batch, n_heads, args.seq, head_dim, device=device, dtype=dtype, requires_grad=True)

    q, k, v = tensor(heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn_like(q)

    def step(gqa: bool) -> None:
        if gqa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            repeat = heads // kv_heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1),
                                                 is_causal=True)
        out.backward(grad)

    reference = None
    # Two passes over every backend, the second one kept: in one pass whichever ran first was timed on
    # a cold card (H100: torch's own choice 0.56 ms/layer, then the same cuDNN kernel 0.45).
    for _ in range(2):
        rows = []
        for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("math", SDPBackend.MATH)):
            for gqa in (True, False):
                row = {"backend": name, "enable_gqa": gqa}
                try:
                    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                        q.grad = None
                        step(gqa)
                        # every backend must compute the same attention before its time counts
                        if reference is None:
                            reference = q.grad.float().clone()
                        error = float((q.grad.float() - reference).norm() / reference.norm())
                        row.update(ms=_time(lambda: step(gqa), device, args.reps) * 1e3, relative_error=error)
                        row["per_step_ms"] = row["ms"] * layers
                except RuntimeError as error:
                    row["error"] = str(error).splitlines()[0][:160]
                rows.append(row)

    print(f"{args.shape}: {args.batch} x {args.seq} tokens, {heads} query / {kv_heads} key-value heads of {head_dim}, "
          f"causal, {dtype}, {card}")
    print(f"{'backend':<11}{'gqa':<7}{'ms/layer':>9}{'ms/step':>9}  q grad vs first")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<11}{str(r['enable_gqa']):<7}  refused: {r['error']}")
        else:
            print(f"{r['backend']:<11}{str(r['enable_gqa']):<7}{r['ms']:>9.3f}{r['per_step_ms']:>9.2f}  "
                  f"{r['relative_error']:.1e}")
    write_result(args.out, "attention_backends", card, args, dtype=str(dtype), rows=rows)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
