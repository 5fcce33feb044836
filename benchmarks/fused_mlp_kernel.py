"""The fused LoRA MLP's two Triton kernels (`lora_rl/fused_mlp.py`) against the unfused work they replace,
and a sweep of each kernel's launch settings, at one MLP shape.

Forward, unfused (what the per-linear path runs): gate's and up's low-rank terms written as full-size
tensors and added by the frozen GEMMs' epilogues (timed here as the low-rank GEMMs plus an add),
silu(g) * u as one compiled kernel, and down's A product reading h. Fused: one kernel per setting of
(tokens per tile, features per tile, warps, pipeline stages, programs per multiprocessor).

Backward, unfused (what `train.fused_mlp=false` runs): down's low-rank input gradient written full-size
and added to the frozen GEMM's, the activation's gradients as one compiled elementwise kernel, silu(gate) * up recomputed, and the three rank-r GEMMs that read [tokens,
intermediate] tensors (down's A gradient from h, gate's and up's B gradients from dg and du). Fused: one
kernel per setting of (tokens per tile, features per tile, warps, stages, tile orientation, programs per
multiprocessor).

Each fused result is checked against the operator's torch reference before it is timed.

    python benchmarks/fused_mlp_kernel.py --out benchmarks/results/fused_mlp_kernel.json   # 1.5B shape, bf16

On a machine without a GPU, `TRITON_INTERPRET=1 python benchmarks/fused_mlp_kernel.py --tokens 64
--features 256 --quick` runs the same code under Triton's interpreter in float16: a check that the
script works, not a measurement. Prints two tables and, on a GPU, each operator's time eagerly and
launched from compiled code, split into the kernel's own device time and the host's time per call;
writes JSON.
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
FORWARD_SWEEP = dict(block=[(32, 64, 4), (16, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 8), (16, 128, 4)],
                     stages=[1, 3], per_sm=[2, 4, 8])


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


def _launch_split(fn, reps: int, kernel: str) -> tuple[float, float]:
    """(host ms, kernel ms) per call of `fn` on a GPU: the host's time to issue a call (the queue does
    not fill in `reps` calls, so no call waits on the GPU) and the named Triton kernel's own device time
    under the profiler. A launch whose host time exceeds the GPU's work per call is timed by its host
    in `timer`: this tells a slower kernel from a host-bound launch."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host_ms = (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.device_time_total for e in prof.key_averages() if kernel in e.key)
    return host_ms, device_us / reps / 1e3


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--features", type=int, default=8960, help="the MLP's intermediate size (1.5B: 8960)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="the module's default settings only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_mlp_kernel.json"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("no GPU: run under TRITON_INTERPRET=1 (a check that the script works, not a measurement)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float16  # the interpreter's bf16 dot is not faithful
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    n, f, r = args.tokens, args.features, args.rank
    g0, u0, dh, gb_d, xa = rand(n, f), rand(n, f), rand(n, f), rand(n, r), rand(n, 2 * r)
    xa_g, xa_u = xa[:, :r], xa[:, r:]
    b_g, b_u, a_d = rand(f, r, scale=0.1), rand(f, r, scale=0.1), rand(r, f, scale=0.1)
    s_g = s_u = s_d = 2.0
    forward_in = (g0, u0, xa_g, xa_u, b_g, b_u, a_d, s_g, s_u)
    backward_in = (g0, u0, dh, gb_d, xa_g, xa_u, b_g, b_u, a_d, s_g, s_u, s_d)
    forward_ref = fused_mlp._silu_mul_forward_reference(*forward_in)
    backward_ref = fused_mlp._silu_mul_backward_reference(*backward_in)
    timed = _timer(device, args.reps if cuda else 1)
    per_sm = torch.cuda.get_device_properties(0).multi_processor_count if cuda else 32

    forward_rows = []
    settings = [(fused_mlp.FWD_BLOCK_T, fused_mlp.FWD_BLOCK_F, fused_mlp.FWD_WARPS, fused_mlp.FWD_STAGES,
                 fused_mlp.FWD_PER_SM)]
    if not args.quick:
        settings += [(bt, bf, w, st, k) for (bt, bf, w), st, k in
                     itertools.product(FORWARD_SWEEP["block"], FORWARD_SWEEP["stages"], FORWARD_SWEEP["per_sm"])]
    for bt, bf, w, st, k in settings:
        kw = dict(block_t=bt, block_f=bf, num_warps=w, num_stages=st, programs=k * per_sm)
        out = fused_mlp.silu_mul_forward_triton(*forward_in, **kw)
        error = max(_relative(out[0], forward_ref[0]), _relative(out[1], forward_ref[1]))
        if error > 1e-2:
            raise SystemExit(f"forward setting {kw}: off by {error:.2e} (relative) from the reference")
        forward_rows.append(dict(kw, per_sm=k, ms=timed(lambda: fused_mlp.silu_mul_forward_triton(*forward_in, **kw)),
                                 relative_error=error))

    backward_rows = []
    settings = [(fused_mlp.BLOCK_T, fused_mlp.BLOCK_F, fused_mlp.NUM_WARPS, fused_mlp.NUM_STAGES,
                 fused_mlp.FEATURES_FIRST, fused_mlp.PER_SM)]
    if not args.quick:
        settings += [(bt, bf, w, st, ff, 8) for (bt, bf, w), st, ff in
                     itertools.product(SWEEP["block"], SWEEP["stages"], SWEEP["features_first"])]
    for bt, bf, w, st, ff, k in settings:
        kw = dict(block_t=bt, block_f=bf, num_warps=w, num_stages=st, features_first=ff, programs=k * per_sm)
        out = fused_mlp.silu_mul_backward_triton(*backward_in, **kw)
        error = _relative(out[2], backward_ref[2])
        if error > 1e-3:
            raise SystemExit(f"backward setting {kw}: the rank-r sums are off by {error:.2e} (relative) from the reference")
        backward_rows.append(dict(kw, per_sm=k, ms=timed(lambda: fused_mlp.silu_mul_backward_triton(*backward_in, **kw)),
                                  relative_error=error))

    def activation(g_, u):
        return (torch.nn.functional.silu(g_.float()) * u.float()).to(g_.dtype)

    def activation_backward(g_, u, d):
        gf, uf, df = g_.float(), u.float(), d.float()
        sig = torch.sigmoid(gf)
        return (df * uf * sig * (1 + gf * (1 - sig))).to(g_.dtype), (df * gf * sig).to(g_.dtype)

    if cuda:  # what inductor makes of them in a compiled layer
        activation, activation_backward = torch.compile(activation), torch.compile(activation_backward)

    def unfused_forward():
        # the per-linear path: each low-rank term written full-size, then read by the frozen GEMM's
        # epilogue (here an in-place add), the activation, down's A product
        g_ = torch.addmm(g0, xa_g, b_g.t(), alpha=s_g)
        u = torch.addmm(u0, xa_u, b_u.t(), alpha=s_u)
        h = activation(g_, u)
        return h, h @ a_d.t()

    def unfused_backward():
        # down's low-rank input gradient written full-size and added to the frozen GEMM's (its epilogue)
        dg, du = activation_backward(g0, u0, torch.addmm(dh, gb_d, a_d, alpha=s_d))
        h = activation(g0, u0)
        return h.t() @ gb_d, dg.t() @ xa_g, du.t() @ xa_u

    unfused = dict(forward_ms=timed(unfused_forward), backward_ms=timed(unfused_backward))

    # The operators as training runs them: called eagerly, and launched by inductor from a compiled
    # function with a dynamic token count and a C++ wrapper (as `backend.compile` compiles the layers).
    # Inductor compiles its own copy of each kernel; one that came out slower (Python floats typed
    # float64) cost 0.036 s of a 0.129 s step before the kernels cast them (README "Performance").
    launch_rows = []
    if cuda:
        for name, op, inputs in (("forward", torch.ops.lora_rl.silu_mul_lora_forward.default, forward_in),
                                 ("backward", torch.ops.lora_rl.silu_mul_lora_backward.default, backward_in)):
            kernel = f"silu_mul_lora_{name}_kernel"
            torch._dynamo.reset()
            compiled = torch.compile(lambda *a, _op=op: _op(*a), options={"cpp_wrapper": True})
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.shape[0] == n:
                    torch._dynamo.mark_dynamic(t, 0)
            error = max(_relative(a, b) for a, b in zip(compiled(*inputs), op(*inputs)))
            row = dict(kernel=name, eager_ms=timed(lambda: op(*inputs)), compiled_ms=timed(lambda: compiled(*inputs)),
                       relative_error=error)
            for launch, fn in (("eager", lambda: op(*inputs)), ("compiled", lambda: compiled(*inputs))):
                row[f"{launch}_host_ms"], row[f"{launch}_kernel_ms"] = _launch_split(fn, args.reps, kernel)
            launch_rows.append(row)
    device_name = torch.cuda.get_device_name() if cuda else "cpu-interpreter"
    print(f"{n} tokens x {f} features, rank {r}, {dtype}, "
          f"{device_name if cuda else 'CPU, Triton interpreter (not a measurement)'}")
    for title, rows, ms, orientation in (("forward", forward_rows, unfused["forward_ms"], False),
                                         ("backward", backward_rows, unfused["backward_ms"], True)):
        rows.sort(key=lambda row: row["ms"])
        print(f"\n{title}: unfused {ms:.3f} ms")
        print(f"{'tokens':>6} {'features':>8} {'warps':>5} {'stages':>6} "
              + (f"{'feat-first':>10} " if orientation else "") + f"{'per SM':>6} {'ms':>8} {'x unfused':>9}")
        for row in rows:
            print(f"{row['block_t']:>6} {row['block_f']:>8} {row['num_warps']:>5} {row['num_stages']:>6} "
                  + (f"{str(row['features_first']):>10} " if orientation else "")
                  + f"{row['per_sm']:>6} {row['ms']:>8.3f} {row['ms'] / ms:>9.2f}")
    for row in launch_rows:
        print(f"\n{row['kernel']} operator: eager {row['eager_ms']:.3f} ms, launched from compiled code "
              f"{row['compiled_ms']:.3f} ms ({row['compiled_ms'] / row['eager_ms']:.2f}x, "
              f"relative difference {row['relative_error']:.1e}); the kernel alone {row['eager_kernel_ms']:.3f} "
              f"eager, {row['compiled_kernel_ms']:.3f} compiled; host time per call {row['eager_host_ms']:.3f} "
              f"eager, {row['compiled_host_ms']:.3f} compiled")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(benchmark="fused_mlp_kernel", torch=torch.__version__, device=device_name,
                                        settings=vars(args) | {"out": str(args.out)}, dtype=str(dtype),
                                        unfused_forward_ms=unfused["forward_ms"],
                                        unfused_backward_ms=unfused["backward_ms"],
                                        forward_rows=forward_rows, backward_rows=backward_rows,
                                        launch_rows=launch_rows), indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
