"""The fused LoRA MLP's Triton kernel (`lora_rl/fused_mlp.py`) against the unfused work it replaces, and a
sweep of its launch settings, at one MLP shape.

Unfused (what `train.fused_mlp=false` runs in the backward): the activation's gradients as one compiled
elementwise kernel, silu(gate) * up recomputed, and the three rank-r GEMMs that read [tokens,
intermediate] tensors (down's A gradient from h, gate's and up's B gradients from dg and du). Fused: one
kernel launch per setting of (tokens per tile, features per tile, warps, pipeline stages, tile
orientation, programs per multiprocessor). Each fused result is checked against the operator's torch
reference before it is timed.

    python benchmarks/fused_mlp_kernel.py --out benchmarks/results/fused_mlp_kernel.json   # 1.5B shape, bf16

On a machine without a GPU, `TRITON_INTERPRET=1 python benchmarks/fused_mlp_kernel.py --tokens 64
--features 256 --quick` runs the same code under Triton's interpreter in float16: a check that the
script works, not a measurement. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from lora_rl import fused_mlp

SWEEP = dict(block=[(32, 64, 4), (16, 64, 4), (32, 32, 4), (64, 32, 4), (32, 64, 2), (16, 128, 4), (32, 128, 8)],
             stages=[1, 3], features_first=[False, True])


def _timer(device: torch.device, reps: int):
    def run(fn) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=8960, help="the MLP's intermediate size (1.5B: 8960)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="the module's default setting only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_mlp_kernel.json"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("no GPU: run under TRITON_INTERPRET=1 (a check that the script works, not a measurement)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 dot is not faithful
    g = torch.Generator(device=device).manual_seed(0)
    wide = [torch.randn(args.tokens, args.features, generator=g, device=device).to(dtype) for _ in range(3)]
    narrow = [torch.randn(args.tokens, args.rank, generator=g, device=device).to(dtype) for _ in range(3)]
    inputs = (*wide, *narrow)
    reference = fused_mlp._silu_mul_backward_reference(*inputs)
    timed = _timer(device, args.reps if cuda else 1)
    per_sm = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 32

    rows = []
    settings = [(fused_mlp.BLOCK_T, fused_mlp.BLOCK_F, fused_mlp.NUM_WARPS, fused_mlp.NUM_STAGES,
                 fused_mlp.FEATURES_FIRST, fused_mlp.PER_SM)]
    if not args.quick:
        settings += [(bt, bf, w, st, ff, 8) for (bt, bf, w), st, ff in
                     itertools.product(SWEEP["block"], SWEEP["stages"], SWEEP["features_first"])]
    for bt, bf, w, st, ff, k in settings:
        kw = dict(block_t=bt, block_f=bf, num_warps=w, num_stages=st, features_first=ff, programs=k * per_sm)
        out = fused_mlp.silu_mul_backward_triton(*inputs, **kw)
        error = float((out[2] - reference[2]).norm() / reference[2].norm())
        if error > 1e-3:
            raise SystemExit(f"setting {kw}: the rank-r sums are off by {error:.2e} (relative) from the reference")
        rows.append(dict(kw, per_sm=k, ms=timed(lambda: fused_mlp.silu_mul_backward_triton(*inputs, **kw)),
                         relative_error=error))

    def activation_backward(g_, u, dh):
        gf, uf, d = g_.float(), u.float(), dh.float()
        sig = torch.sigmoid(gf)
        return (d * uf * sig * (1 + gf * (1 - sig))).to(g_.dtype), (d * gf * sig).to(g_.dtype)

    def recompute(g_, u):
        return (torch.nn.functional.silu(g_.float()) * u.float()).to(g_.dtype)

    if cuda:  # what inductor makes of them in a compiled layer
        activation_backward, recompute = torch.compile(activation_backward), torch.compile(recompute)

    def unfused():
        dg, du = activation_backward(*wide)
        h = recompute(wide[0], wide[1])
        return h.t() @ narrow[0], dg.t() @ narrow[1], du.t() @ narrow[2]

    unfused_ms = timed(unfused)
    rows.sort(key=lambda r: r["ms"])
    print(f"{args.tokens} tokens x {args.features} features, rank {args.rank}, {dtype}, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU, Triton interpreter (not a measurement)'}")
    print(f"unfused (activation backward + recompute + three GEMMs): {unfused_ms:.3f} ms")
    print(f"{'tokens':>6} {'features':>8} {'warps':>5} {'stages':>6} {'feat-first':>10} {'per SM':>6} {'ms':>8} {'x unfused':>9}")
    for r in rows:
        print(f"{r['block_t']:>6} {r['block_f']:>8} {r['num_warps']:>5} {r['num_stages']:>6} {str(r['features_first']):>10} "
              f"{r['per_sm']:>6} {r['ms']:>8.3f} {r['ms'] / unfused_ms:>9.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(benchmark="fused_mlp_kernel", torch=torch.__version__,
                                        device=torch.cuda.get_device_name() if cuda else "cpu-interpreter",
                                        settings=vars(args) | {"out": str(args.out)}, dtype=str(dtype),
                                        unfused_ms=unfused_ms, rows=rows), indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
