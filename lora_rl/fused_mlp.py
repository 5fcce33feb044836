"""A SiLU-gated MLP whose three linears carry plain LoRA adapters, as one op (`train.fused_mlp`).

`down(silu(gate(x)) * up(x))` with a LoRA on each linear moves [tokens, intermediate] tensors (8,960
wide at 1.5B, six times the hidden size) through memory more often than anything else in a LoRA step.
Through three `fused_lora.lora_linear` calls the forward writes each of gate's and up's low-rank terms
as a full-size tensor that the frozen GEMM then reads back, the activation reads g and u once more, and
down's A product reads h again; the backward reads h (recomputed or kept) only for down's A gradient,
and the gradients of g and u again for their own B gradients. Here two Triton kernels carry the rank-r
work on tiles they already hold:

- forward: the frozen GEMMs write the base pre-activations g0 = x W_g^T and u0 = x W_u^T alone; the
  kernel adds the low-rank terms (s xa B^T, a rank-r dot per tile), forms h = silu(g) * u and, from the
  same tiles, down's rank-r product h A_d^T. gate's and up's A products are one GEMM over x.
- backward: one kernel rebuilds g, u and h in registers, adds down's low-rank input gradient
  (s gb A_d, a rank-r dot per tile) to the frozen GEMM's grad @ W_d, writes the activation's gradients
  and forms down's A gradient (h^T gb) and gate's and up's B gradients (dg^T xa_g, du^T xa_u) as rank-r
  sums.

Per layer that is twelve fewer passes over an [tokens, intermediate] tensor than the per-linear path, and
g, u (with their low-rank terms) and h are never stored: the op saves g0, u0 and the rank-r products.

The GEMMs around the kernels are C++ operators beside the LoRA linear's (csrc/lora_linear.cpp) and the
kernels' operators are `triton_op`s that inductor launches itself, so a compiled decoder layer runs the
whole MLP, forward and backward, without entering Python.
Without Triton, on the CPU or in float32 the same operators run as plain torch code: those bodies are
the references the kernels are tested against (tests/test_fast_path.py, under Triton's interpreter on
the CPU and on a GPU).
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from lora_rl.fused_lora import _LIB, plain_adapter, plain_base

_LIB.define("lora_mlp_down_forward(Tensor h, Tensor weight, Tensor? bias, Tensor xa, Tensor lora_b, float scaling)"
            " -> Tensor")
_LIB.define("lora_mlp_down_backward(Tensor grad, Tensor weight, Tensor lora_b, Tensor xa, float scaling)"
            " -> (Tensor, Tensor, Tensor)")
_LIB.define("lora_mlp_gate_up_backward(Tensor grad_g, Tensor grad_u, Tensor x, Tensor weight_g, Tensor a_g,"
            " Tensor b_g, Tensor weight_u, Tensor a_u, Tensor b_u, float scaling_g, float scaling_u,"
            " bool need_input) -> (Tensor, Tensor, Tensor)")


def _down_forward_impl(h, weight, bias, xa, lora_b, scaling):
    """down's forward from its rank-r product (the forward kernel forms it): the low-rank term first,
    the frozen GEMM accumulating onto it, as `fused_lora.lora_linear`."""
    out = torch.addmm(bias if bias is not None else h.new_empty(()), xa, lora_b.t(), beta=1 if bias is not None else 0,
                      alpha=scaling)
    out.addmm_(h, weight.t())
    return out


def _down_backward_impl(grad, weight, lora_b, xa, scaling):
    """down's backward without its A gradient and without its low-rank input gradient s gb A (the
    kernel forms both): the frozen base's input gradient, gb = grad B unscaled, and B's gradient. Adding
    s gb A here would write an [tokens, intermediate] tensor and have the base GEMM read it back in an
    accumulating epilogue; the kernel adds it to tiles it loads anyway."""
    none = grad.new_empty(())
    gb = grad @ lora_b  # [N, r]
    grad_b = torch.addmm(none, grad.t(), xa, beta=0, alpha=scaling)  # [out, r]
    return grad @ weight, gb, grad_b


def _gate_up_backward_impl(grad_g, grad_u, x, weight_g, a_g, b_g, weight_u, a_u, b_u, scaling_g, scaling_u,
                           need_input):
    """gate's and up's backward without their B gradients (the kernel forms them): A gradients, and
    one input gradient with both low-rank terms and both frozen GEMMs accumulated into it."""
    none = x.new_empty(())
    gb_g, gb_u = grad_g @ b_g, grad_u @ b_u  # [N, r]
    grad_a_g = torch.addmm(none, gb_g.t(), x, beta=0, alpha=scaling_g)
    grad_a_u = torch.addmm(none, gb_u.t(), x, beta=0, alpha=scaling_u)
    if not need_input:
        return x.new_empty(0), grad_a_g, grad_a_u
    grad_x = torch.addmm(none, gb_g, a_g, beta=0, alpha=scaling_g)
    grad_x.addmm_(gb_u, a_u, alpha=scaling_u)
    grad_x.addmm_(grad_g, weight_g)
    grad_x.addmm_(grad_u, weight_u)
    return grad_x, grad_a_g, grad_a_u


def _math(t: torch.Tensor) -> torch.Tensor:
    """The kernels' arithmetic type: float32 for 16-bit tensors, the tensor's own type otherwise (float64
    stays exact for gradcheck)."""
    return t.float() if t.element_size() < 4 else t


def _pre_activations(g, u, xa_g, xa_u, b_g, b_u, scaling_g, scaling_u):
    """gate's and up's outputs: the frozen GEMMs' g0, u0 plus the low-rank terms, unrounded."""
    return (_math(g) + scaling_g * (_math(xa_g) @ _math(b_g).t()),
            _math(u) + scaling_u * (_math(xa_u) @ _math(b_u).t()))


def _silu_mul_forward_reference(g, u, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u):
    """The forward kernel's contract in torch: h = silu(g) * u from the frozen GEMMs' g0, u0 and the
    low-rank terms (computed unrounded, h stored in g's dtype), and down's rank-r product h A_d^T from the
    stored h (what the unfused GEMM reads), accumulated in float32 and stored in g's dtype."""
    gf, uf = _pre_activations(g, u, xa_g, xa_u, b_g, b_u, scaling_g, scaling_u)
    h = (F.silu(gf) * uf).to(g.dtype)
    return h, (_math(h) @ _math(a_d).t()).to(g.dtype)


def _silu_mul_backward_reference(g, u, grad_h, gb_d, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u, scaling_d):
    """The backward kernel's contract in torch: gradients of gate's and up's outputs through
    h = silu(g) * u (g and u rebuilt as in the forward; h's gradient the frozen GEMM's grad_h plus down's
    low-rank term s_d gb_d A_d, unrounded; results stored in g0's dtype), and [3, intermediate, r]
    sums h^T gb_d, dg^T xa_g, du^T xa_u over the tokens in float32 (float64 for float64 input), taken from
    h, dg and du as rounded to g0's dtype (what the unfused GEMMs read)."""
    gf, uf = _pre_activations(g, u, xa_g, xa_u, b_g, b_u, scaling_g, scaling_u)
    dh = _math(grad_h) + scaling_d * (_math(gb_d) @ _math(a_d))
    sig = torch.sigmoid(gf)
    silu = gf * sig
    h = (silu * uf).to(g.dtype)
    grad_u = (dh * silu).to(g.dtype)
    grad_g = (dh * uf * sig * (1 + gf * (1 - sig))).to(g.dtype)
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    sums = torch.stack([h.to(acc).t() @ gb_d.to(acc), grad_g.to(acc).t() @ xa_g.to(acc),
                        grad_u.to(acc).t() @ xa_u.to(acc)])
    return grad_g, grad_u, sums


_LIB.impl("lora_mlp_down_forward", _down_forward_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_mlp_down_backward", _down_backward_impl, "CompositeExplicitAutograd")
_LIB.impl("lora_mlp_gate_up_backward", _gate_up_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("lora_rl::lora_mlp_down_forward", lib=_LIB)
def _(h, weight, bias, xa, lora_b, scaling):
    return h.new_empty(h.shape[0], weight.shape[0])


@torch.library.register_fake("lora_rl::lora_mlp_down_backward", lib=_LIB)
def _(grad, weight, lora_b, xa, scaling):
    n = grad.shape[0]
    return grad.new_empty(n, weight.shape[1]), grad.new_empty(n, lora_b.shape[1]), lora_b.new_empty(lora_b.shape)


@torch.library.register_fake("lora_rl::lora_mlp_gate_up_backward", lib=_LIB)
def _(grad_g, grad_u, x, weight_g, a_g, b_g, weight_u, a_u, b_u, scaling_g, scaling_u, need_input):
    return x.new_empty(x.shape if need_input else (0,)), a_g.new_empty(a_g.shape), a_u.new_empty(a_u.shape)


# --- the Triton kernels ------------------------------------------------------------------------------

_KERNELS = None
# Backward: tokens x features per tile, warps, pipeline stages, tile orientation, programs per
# multiprocessor. Forward: tokens x features per tile, warps, stages, programs per multiprocessor.
# The fastest of benchmarks/fused_mlp_kernel.py's sweeps on an H200 at the 1.5B shape
# (benchmarks/results/fused_mlp_kernel_h200.json, benchmarks/HISTORY.md).
BLOCK_T, BLOCK_F, NUM_WARPS, NUM_STAGES, FEATURES_FIRST, PER_SM = 16, 128, 4, 3, False, 8
FWD_BLOCK_T, FWD_BLOCK_F, FWD_WARPS, FWD_STAGES, FWD_PER_SM = 64, 64, 4, 3, 8


def _kernels():
    """Built on first use, so that importing lora_rl needs no Triton. Returns (forward, backward)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul_lora_forward_kernel(g_ptr, u_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr, ad_ptr, h_ptr, part_ptr,
                                     n_rows, n_cols, cols_per_split, rank, xa_stride, s_g, s_u,
                                     RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        # One program: BLOCK_T tokens over one split of the features. The tokens' rank-r products stay in
        # registers; down's [BLOCK_T, r] product accumulates across the split and is written once.
        row_block, split = tl.program_id(0), tl.program_id(1)
        # Launched from inductor's compiled code, Python floats arrive as float64, and float64 scalars
        # would promote every tile they touch (3-6x slower on an H100): the kernels compute in float32.
        s_g, s_u = tl.cast(s_g, tl.float32), tl.cast(s_u, tl.float32)
        rows = row_block * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        ranks = tl.arange(0, RANK)  # RANK: r padded to a power of two >= 16, as tl.dot needs
        rank_ok = ranks < rank
        xa_offs = rows[:, None].to(tl.int64) * xa_stride + ranks[None, :]
        xa_mask = row_ok[:, None] & rank_ok[None, :]
        xag = tl.load(xag_ptr + xa_offs, mask=xa_mask, other=0.0)
        xau = tl.load(xau_ptr + xa_offs, mask=xa_mask, other=0.0)
        acc = tl.zeros((BLOCK_T, RANK), dtype=tl.float32)
        first = split * cols_per_split
        last = tl.minimum(first + cols_per_split, n_cols)
        for start in range(first, last, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            col_ok = cols < last
            offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            b_offs = cols[None, :] * rank + ranks[:, None]  # B^T tiles [RANK, BLOCK_F]; B is [features, r]
            b_mask = col_ok[None, :] & rank_ok[:, None]
            bg = tl.load(bg_ptr + b_offs, mask=b_mask, other=0.0)
            bu = tl.load(bu_ptr + b_offs, mask=b_mask, other=0.0)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) + s_g * tl.dot(xag, bg)
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32) + s_u * tl.dot(xau, bu)
            h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + offs, h, mask=mask)
            a_offs = ranks[None, :] * n_cols + cols[:, None]  # A_d^T tiles [BLOCK_F, RANK]; A_d is [r, features]
            ad = tl.load(ad_ptr + a_offs, mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
            acc = tl.dot(h, ad, acc)
        p_offs = split * n_rows * rank + rows[:, None].to(tl.int64) * rank + ranks[None, :]
        tl.store(part_ptr + p_offs, acc, mask=xa_mask)

    @triton.jit
    def silu_mul_lora_backward_kernel(g_ptr, u_ptr, dh_ptr, gbd_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr, ad_ptr,
                                      dg_ptr, du_ptr, part_ptr, n_rows, n_cols, rank, xa_stride,
                                      s_g, s_u, s_d, RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
                                      FEATURES_FIRST: tl.constexpr):
        # One program: BLOCK_F features over one chunk of the tokens. The three [BLOCK_F, r] sums stay in
        # registers across the chunk and are written once, as this chunk's partial sums; so do the
        # features' rows of gate's and up's B, which rebuild g and u from g0 and u0, and their columns of
        # down's A, which add down's low-rank term to h's gradient.
        col_block, chunk = tl.program_id(0), tl.program_id(1)
        # float64 from inductor: see the forward kernel
        s_g, s_u, s_d = tl.cast(s_g, tl.float32), tl.cast(s_u, tl.float32), tl.cast(s_d, tl.float32)
        cols = col_block * BLOCK_F + tl.arange(0, BLOCK_F)
        col_ok = cols < n_cols
        ranks = tl.arange(0, RANK)  # RANK: r padded to a power of two >= 16, as tl.dot needs
        rank_ok = ranks < rank
        fr_offs = cols[:, None] * rank + ranks[None, :]  # [BLOCK_F, RANK] tiles of B and of the sums
        fr_mask = col_ok[:, None] & rank_ok[None, :]
        bg = tl.load(bg_ptr + fr_offs, mask=fr_mask, other=0.0)
        bu = tl.load(bu_ptr + fr_offs, mask=fr_mask, other=0.0)
        ad = tl.load(ad_ptr + ranks[None, :] * n_cols + cols[:, None], mask=fr_mask, other=0.0)  # A_d^T: [BLOCK_F, RANK]
        acc_h = tl.zeros((BLOCK_F, RANK), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_F, RANK), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_F, RANK), dtype=tl.float32)
        # The chunk count is the grid's, fixed when the launch is planned (or traced); each chunk's rows
        # follow the actual token count, so a compiled graph's partial-sum buffer has a static shape.
        rows_per_chunk = tl.cdiv(tl.cdiv(n_rows, tl.num_programs(1)), BLOCK_T) * BLOCK_T
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, n_rows)
        for start in range(first, last, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            row_ok = rows < last
            r_mask = row_ok[:, None] & rank_ok[None, :]
            xa_offs = rows[:, None].to(tl.int64) * xa_stride + ranks[None, :]
            gbd = tl.load(gbd_ptr + rows[:, None].to(tl.int64) * rank + ranks[None, :], mask=r_mask, other=0.0)
            xag = tl.load(xag_ptr + xa_offs, mask=r_mask, other=0.0)
            xau = tl.load(xau_ptr + xa_offs, mask=r_mask, other=0.0)
            if FEATURES_FIRST:  # tiles held as [features, tokens]: the sums' dots need no transpose
                offs = rows[None, :].to(tl.int64) * n_cols + cols[:, None]
                mask = row_ok[None, :] & col_ok[:, None]
                low_g = tl.dot(bg, tl.trans(xag))
                low_u = tl.dot(bu, tl.trans(xau))
                low_d = tl.dot(ad, tl.trans(gbd))
            else:
                offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
                mask = row_ok[:, None] & col_ok[None, :]
                low_g = tl.dot(xag, tl.trans(bg))
                low_u = tl.dot(xau, tl.trans(bu))
                low_d = tl.dot(gbd, tl.trans(ad))
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) + s_g * low_g
            u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32) + s_u * low_u
            dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32) + s_d * low_d
            sig = tl.sigmoid(g)
            silu = g * sig
            h = (silu * u).to(dg_ptr.dtype.element_ty)
            du = (dh * silu).to(dg_ptr.dtype.element_ty)
            dg = (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty)
            tl.store(dg_ptr + offs, dg, mask=mask)
            tl.store(du_ptr + offs, du, mask=mask)
            if FEATURES_FIRST:
                acc_h = tl.dot(h, gbd, acc_h)
                acc_g = tl.dot(dg, xag, acc_g)
                acc_u = tl.dot(du, xau, acc_u)
            else:
                acc_h = tl.dot(tl.trans(h), gbd, acc_h)
                acc_g = tl.dot(tl.trans(dg), xag, acc_g)
                acc_u = tl.dot(tl.trans(du), xau, acc_u)
        plane = n_cols * rank  # part: [3, chunks, n_cols, rank] float32
        p_offs = chunk * plane + fr_offs
        step = tl.num_programs(1) * plane
        tl.store(part_ptr + p_offs, acc_h, mask=fr_mask)
        tl.store(part_ptr + step + p_offs, acc_g, mask=fr_mask)
        tl.store(part_ptr + 2 * step + p_offs, acc_u, mask=fr_mask)

    _KERNELS = silu_mul_lora_forward_kernel, silu_mul_lora_backward_kernel
    return _KERNELS


def _contiguous(*tensors):
    # Every call is on the critical path for the host too: no copies unless needed.
    return tuple(t if t.is_contiguous() else t.contiguous() for t in tensors)


def _rank_products(xa_g, xa_u):
    """gate's and up's rank-r products as the kernels read them: one row stride for both (they are
    column slices of one [tokens, 2r] GEMM output in training)."""
    if xa_g.stride(1) != 1 or xa_u.stride(1) != 1 or xa_g.stride(0) != xa_u.stride(0):
        xa_g, xa_u = xa_g.contiguous(), xa_u.contiguous()
    return xa_g, xa_u, xa_g.stride(0)


def _padded_rank(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def silu_mul_forward_triton(g, u, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u, *, block_t: int = 0,
                            block_f: int = 0, num_warps: int = 0, num_stages: int = 0, programs: int = 0):
    """The Triton body of `silu_mul_lora_forward` (same contract as the reference). The features are
    split so that about `programs` programs run (default: FWD_PER_SM per multiprocessor); the splits'
    partial rank-r products are added afterwards in float32. Launch settings default to the module's."""
    block_t, block_f, num_warps = block_t or FWD_BLOCK_T, block_f or FWD_BLOCK_F, num_warps or FWD_WARPS
    num_stages = num_stages or FWD_STAGES
    g, u, b_g, b_u, a_d = _contiguous(g, u, b_g, b_u, a_d)
    xa_g, xa_u, xa_stride = _rank_products(xa_g, xa_u)
    n_rows, n_cols = g.shape
    rank = a_d.shape[0]
    if not programs:
        programs = FWD_PER_SM * (_multiprocessors(g.device.index or 0) if g.is_cuda else 32)
    splits, cols_per_split = _forward_plan(_size_hint(n_rows), _size_hint(n_cols), block_t, block_f, programs)
    h = torch.empty_like(g)
    part = torch.empty(splits, n_rows, rank, dtype=torch.float32, device=g.device)
    kernel = _kernels()[0]
    torch.library.wrap_triton(kernel)[(-(-n_rows // block_t), splits)](
        g, u, xa_g, xa_u, b_g, b_u, a_d, h, part, n_rows, n_cols, cols_per_split, rank, xa_stride,
        float(scaling_g), float(scaling_u), RANK=_padded_rank(rank), BLOCK_T=block_t, BLOCK_F=block_f,
        num_warps=num_warps, num_stages=num_stages)
    return h, part.sum(0).to(g.dtype)


def silu_mul_backward_triton(g, u, grad_h, gb_d, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u, scaling_d, *,
                             block_t: int = 0,
                             block_f: int = 0, num_warps: int = 0, num_stages: int = 0,
                             features_first: bool | None = None, programs: int = 0):
    """The Triton body of `silu_mul_lora_backward` (same contract as the reference). The tokens are split
    into chunks so that about `programs` programs run (default: PER_SM per multiprocessor); the chunks'
    partial sums are added afterwards in float32. The launch settings default to the module's tuned ones."""
    block_t, block_f, num_warps = block_t or BLOCK_T, block_f or BLOCK_F, num_warps or NUM_WARPS
    num_stages = num_stages or NUM_STAGES
    features_first = FEATURES_FIRST if features_first is None else features_first
    g, u, grad_h, gb_d, b_g, b_u, a_d = _contiguous(g, u, grad_h, gb_d, b_g, b_u, a_d)
    xa_g, xa_u, xa_stride = _rank_products(xa_g, xa_u)
    n_rows, n_cols = g.shape
    rank = gb_d.shape[1]
    if not programs:
        programs = PER_SM * (_multiprocessors(g.device.index or 0) if g.is_cuda else 32)
    chunks = _backward_plan(_size_hint(n_rows), _size_hint(n_cols), block_t, block_f, programs)
    grad_g, grad_u = torch.empty_like(g), torch.empty_like(u)
    part = torch.empty(3, chunks, n_cols, rank, dtype=torch.float32, device=g.device)
    kernel = _kernels()[1]
    torch.library.wrap_triton(kernel)[(-(-n_cols // block_f), chunks)](
        g, u, grad_h, gb_d, xa_g, xa_u, b_g, b_u, a_d, grad_g, grad_u, part, n_rows, n_cols, rank,
        xa_stride, float(scaling_g), float(scaling_u), float(scaling_d), RANK=_padded_rank(rank), BLOCK_T=block_t, BLOCK_F=block_f,
        FEATURES_FIRST=features_first, num_warps=num_warps, num_stages=num_stages)
    return grad_g, grad_u, part.sum(1)


# The launch plans take sizes as plain ints. Under torch.compile's dynamic shapes the token count is
# symbolic, and a compiled graph keeps the plan of the size it was traced at: a plan only spreads the
# work over programs (any split or chunk size gives the same result up to the float32 order of the
# partial sums), so it needs no guard. What must fit the actual size stays symbolic: the forward's
# token blocks and the buffers' token dimension; the backward's chunks take their rows from the actual
# count inside the kernel.
def _size_hint(n) -> int:
    if isinstance(n, int):
        return n
    hint = n.node.hint  # the size being traced; None for a data-dependent size
    return hint if isinstance(hint, int) else 8192


@functools.cache
def _forward_plan(n_rows: int, n_cols: int, block_t: int, block_f: int, programs: int) -> tuple[int, int]:
    """Feature splits and columns per split (a multiple of block_f) for about `programs` programs."""
    row_blocks = max(1, -(-n_rows // block_t))
    col_blocks = -(-n_cols // block_f)
    splits = max(1, min(col_blocks, -(-programs // row_blocks)))
    cols_per_split = -(-col_blocks // splits) * block_f
    return -(-n_cols // cols_per_split), cols_per_split


@functools.cache
def _backward_plan(n_rows: int, n_cols: int, block_t: int, block_f: int, programs: int) -> int:
    """Token chunks for about `programs` programs. A plain int even under dynamic shapes: the partial
    sums' buffer [3, chunks, features, r] and the sum over its chunks are then static in a compiled
    graph (with a symbolic chunk count, inductor's reduction over them was generic code)."""
    col_blocks = -(-n_cols // block_f)
    row_blocks = max(1, -(-n_rows // block_t))
    return max(1, min(row_blocks, -(-programs // col_blocks)))


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _tensor_cores(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)  # bf16 dots: Ampere and newer


def _use_triton(g: torch.Tensor) -> bool:
    # float32 (tl.dot would round to TF32), no Triton or an older GPU: the references serve
    return (g.is_cuda and g.dtype in (torch.bfloat16, torch.float16) and triton_available()
            and _tensor_cores(g.device.index or 0))


# The two kernels' operators are `triton_op`s: eagerly they run these bodies as any custom operator does,
# but torch.compile traces into them (AOTAutograd decomposes the op), so inductor sees the Triton kernel and
# launches it from the compiled layer's own C++ wrapper. As plain custom operators with a Python CUDA
# implementation, each call left the compiled graph for Python, which spent 140-170 us launching the
# kernel (H200 profile): 56 calls per 1.5B step, in a forward where the GPU waits on the host.
# Without Triton, on the CPU or in float32 the references run (and compile as ordinary torch code).
@torch.library.triton_op("lora_rl::silu_mul_lora_forward", mutates_args=())
def silu_mul_lora_forward(g: torch.Tensor, u: torch.Tensor, xa_g: torch.Tensor, xa_u: torch.Tensor,
                          b_g: torch.Tensor, b_u: torch.Tensor, a_d: torch.Tensor, scaling_g: float,
                          scaling_u: float) -> tuple[torch.Tensor, torch.Tensor]:
    body = silu_mul_forward_triton if _use_triton(g) else _silu_mul_forward_reference
    return body(g, u, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u)


@torch.library.triton_op("lora_rl::silu_mul_lora_backward", mutates_args=())
def silu_mul_lora_backward(g: torch.Tensor, u: torch.Tensor, grad_h: torch.Tensor, gb_d: torch.Tensor,
                           xa_g: torch.Tensor, xa_u: torch.Tensor, b_g: torch.Tensor, b_u: torch.Tensor,
                           a_d: torch.Tensor, scaling_g: float, scaling_u: float,
                           scaling_d: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    body = silu_mul_backward_triton if _use_triton(g) else _silu_mul_backward_reference
    return body(g, u, grad_h, gb_d, xa_g, xa_u, b_g, b_u, a_d, scaling_g, scaling_u, scaling_d)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- autograd and routing ----------------------------------------------------------------------------


class _LoRAMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each linear frozen with a plain LoRA of one rank. Saves the input,
    the frozen GEMMs' g0 and u0 and the three rank-r products; not g, u with their low-rank terms, nor
    the gated product h."""

    @staticmethod
    def forward(ctx, x, w_g, bias_g, a_g, b_g, w_u, bias_u, a_u, b_u, w_d, bias_d, a_d, b_d,
                s_g: float, s_u: float, s_d: float):
        rank = a_g.shape[0]
        xa = x @ torch.cat([a_g, a_u]).t()  # gate's and up's rank-r products from one read of x
        xa_g, xa_u = xa[:, :rank], xa[:, rank:]
        g, u = F.linear(x, w_g, bias_g), F.linear(x, w_u, bias_u)  # the frozen GEMMs alone
        h, xa_d = torch.ops.lora_rl.silu_mul_lora_forward.default(g, u, xa_g, xa_u, b_g, b_u, a_d, s_g, s_u)
        out = torch.ops.lora_rl.lora_mlp_down_forward.default(h, w_d, bias_d, xa_d, b_d, s_d)
        ctx.save_for_backward(x, g, u, xa_g, xa_u, xa_d, w_g, a_g, b_g, w_u, a_u, b_u, w_d, a_d, b_d)
        ctx.scalings = (s_g, s_u, s_d)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, g, u, xa_g, xa_u, xa_d, w_g, a_g, b_g, w_u, a_u, b_u, w_d, a_d, b_d = ctx.saved_tensors
        s_g, s_u, s_d = ctx.scalings
        need_input = ctx.needs_input_grad[0]
        grad_h, gb_d, grad_b_d = torch.ops.lora_rl.lora_mlp_down_backward.default(grad, w_d, b_d, xa_d, s_d)
        grad_g, grad_u, sums = torch.ops.lora_rl.silu_mul_lora_backward.default(g, u, grad_h, gb_d, xa_g, xa_u,
                                                                                 b_g, b_u, a_d, s_g, s_u, s_d)
        grad_x, grad_a_g, grad_a_u = torch.ops.lora_rl.lora_mlp_gate_up_backward.default(
            grad_g, grad_u, x, w_g, a_g, b_g, w_u, a_u, b_u, s_g, s_u, need_input)
        dtype = a_d.dtype
        grad_a_d = (sums[0].t() * s_d).to(dtype)
        grad_b_g, grad_b_u = (sums[1] * s_g).to(dtype), (sums[2] * s_u).to(dtype)
        return ((grad_x if need_input else None), None, None, grad_a_g, grad_b_g, None, None, grad_a_u, grad_b_u,
                None, None, grad_a_d, grad_b_d, None, None, None)


def _active(layer, dtype) -> str | None:
    """The layer's one active adapter if the fused op can run it: a peft LoRA linear over a frozen
    nn.Linear, adapters on, not merged, plain LoRA in `dtype`; else None."""
    from peft.tuners.lora.layer import Linear

    if not isinstance(layer, Linear) or layer.disable_adapters or layer.merged or not plain_base(layer):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or layer.base_layer.weight.dtype != dtype or not plain_adapter(layer, active[0], dtype):
        return None
    return active[0]


def _fused_mlp_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    names = [_active(layer, x.dtype) for layer in (self.gate_proj, self.up_proj, self.down_proj)]
    # The reference pass, merged sampling, adapters of different ranks (the kernels hold one rank),
    # anything unusual: as before
    if (args or kwargs or None in names
            or len({layer.r[name] for layer, name in zip((self.gate_proj, self.up_proj, self.down_proj), names)}) > 1):
        return type(self).forward(self, x, *args, **kwargs)
    operands, scalings = [], []
    for layer, name in zip((self.gate_proj, self.up_proj, self.down_proj), names):
        base = layer.base_layer
        operands += [base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight]
        scalings.append(float(layer.scaling[name]))
    out = _LoRAMLPFunction.apply(x.reshape(-1, x.shape[-1]), *operands, *scalings)
    return out.view(*x.shape[:-1], out.shape[-1])


def _silu_gated(module: nn.Module) -> bool:
    """A gate/up/down MLP with a SiLU gate and the forward `down(act(gate(x)) * up(x))` of Llama-family
    models (Qwen2, Llama, Mistral, ...), judged by its class's own forward."""
    from peft.tuners.lora.layer import Linear

    act = getattr(module, "act_fn", None)
    if not all(isinstance(getattr(module, n, None), Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    return (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation") and _gated_forward(type(module))


@functools.cache
def _gated_forward(cls: type) -> bool:
    import inspect

    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))" in source


def fuse_mlp(model: nn.Module) -> int:
    """Route `model`'s SiLU-gated MLPs whose three linears carry LoRA through `_LoRAMLPFunction`;
    returns how many. The linears keep their own fused forward for every call this one leaves alone."""
    mlps = [m for m in model.modules() if _silu_gated(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
    return len(mlps)
