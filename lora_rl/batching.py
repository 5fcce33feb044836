"""Token batches shared by warm-start, rollout scoring and the GRPO update.

Sequences are prompt + completion, right-padded. Log-probabilities are reported at *target*
positions: column t holds log p(token[t+1] | tokens[..t]), so every tensor about tokens is
[B, T-1] and `completion_mask` marks the targets that are completion tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def encode(tokenizer, text: str) -> list[int]:
    # Prompts are complete strings (a chat template already holds its special tokens), so the
    # tokenizer must not add BOS/EOS of its own: warm-start, rollout and scoring then agree.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True, slots=True)
class TokenBatch:
    input_ids: torch.Tensor  # [B, T] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens
    completion_mask: torch.Tensor  # [B, T-1] 1 where the target token is a completion token

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))

    def select(self, index: slice | torch.Tensor) -> "TokenBatch":
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.completion_mask[index])


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> TokenBatch:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    completion = torch.zeros((len(prompts), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        # target position t predicts token t+1: completion tokens sit at len(p)..len(p)+len(c)-1
        completion[i, len(p) - 1 : len(p) + len(c) - 1] = 1.0
    return TokenBatch(input_ids, attention, completion)


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0, with_entropy: bool = False,
                   chunked: bool = True, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each target token at `temperature` ([B, T-1], float32), optionally entropies.

    chunked (the default): when the logits would exceed one slice, the output head computes them a slice
    of tokens at a time and recomputes them in the backward (`_SlicedHead`), so the [B, T, V] logits
    never exist in float32 (with a 150k vocabulary they are the largest tensor of the whole update);
    False materialises them as a plain forward does. compiled: the slices' arithmetic under torch.compile
    (GPUs with `backend.compile`)."""
    # use_cache=False throughout: scoring needs no KV cache, and building one costs copies and memory
    # and makes torch.compile recompile each decoder layer (the cache's per-layer state is guarded).
    vocab = model.get_output_embeddings().weight.shape[0]
    sliceable = not getattr(model, "_lora_rl_transforms_logits", False)
    if chunked and sliceable and batch.input_ids.numel() * vocab > _CHUNK_ELEMENTS:  # one slice would hold it all
        try:
            return _chunked_token_logprobs(model, batch, temperature, with_entropy, compiled)
        except _TransformedLogits:
            # Gemma's softcapping, Granite's and Cohere's scaling act on the head's output, which the sliced
            # head replaces: from now on this model's log-probs go through its own plain forward.
            model._lora_rl_transforms_logits = True
            print(f"lora-rl: warning: {type(model).__name__} transforms its logits after the output head, which "
                  "train.chunked_logprobs cannot slice: its log-probs use the full logits (more memory)",
                  file=sys.stderr)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # [B, T, V]
    return logits_to_logprobs(logits, batch.input_ids, temperature, with_entropy)


def logits_to_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float,
                       with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T, V] logits of a whole sequence -> log-probs of each target token [B, T-1] (and entropies)."""
    logp_all = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # float32: bf16 log-softmax loses ~1e-2
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()  # [B, T-1]
    return logp, entropy


_CHUNK_ELEMENTS = 2 ** 26  # logits elements per slice: 256 MiB in float32 (~440 tokens of a 150k vocabulary)
# A frozen head's hidden-state gradient is formed in the forward (`_SlicedHead`, in_forward). Always on in
# training; benchmarks/train_step.py turns it off to measure what it saves.
FROZEN_HEAD_GRAD_IN_FORWARD = True


class _SlicedHead(torch.autograd.Function):
    """Log-prob of each row's target under the output head, a slice of rows at a time, with a
    hand-written backward, so that no float32 [rows, vocab] tensor outlives its slice and no
    log-softmax is stored. Entropies, when asked for, are a metric without gradient.

    Two ways to the hidden states' gradient, d logp / d hidden = (one_hot(target) - softmax(z / T)) W / T
    times the incoming per-row gradient g:
    - a trainable head (full fine-tuning): the forward keeps each row's log-sum-exp; the backward
      recomputes each slice's logits (one more head GEMM) and forms both gradients from them, since
      the weight's gradient needs g for every logit;
    - a frozen head (LoRA; `in_forward`): g is a per-row scalar, so the forward multiplies each slice's
      (one_hot - softmax) / T by W right away (the GEMM the backward would run) and keeps that
      [rows, hidden] product; the backward only scales its rows by g. This saves the logits' recompute,
      a third of the head's GEMM time in a training step.

    compiled (GPUs, `backend.compile`): the per-slice arithmetic after the head's GEMM runs as
    torch.compile'd kernels that read the slice's logits once in the model dtype, instead of a dozen
    eager passes over them in float32 (~30 ms of a 1.5B-model training step on an H100)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, with_entropy: bool, compiled: bool,
                in_forward: bool = False):
        rows = hidden.shape[0]
        step = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        logp = torch.empty(rows, dtype=_accumulate(hidden), device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else None
        if in_forward:
            stats = _compiled(_slice_stats_and_grad) if compiled else _slice_stats_and_grad
            grad_rows = torch.empty_like(hidden)  # d logp / d hidden of each row, for g = 1
        else:
            stats = _compiled(_slice_stats) if compiled else _slice_stats
        for i in range(0, rows, step):
            z = F.linear(hidden[i:i + step], weight, bias)
            out = stats(z, targets[i:i + step], temperature, with_entropy)
            logp[i:i + step], lse[i:i + step] = out[0], out[1]
            if with_entropy:
                entropy[i:i + step] = out[2]
            if in_forward:
                torch.mm(out[3], weight, out=grad_rows[i:i + step])
        if in_forward:
            ctx.save_for_backward(grad_rows)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.step, ctx.compiled, ctx.in_forward = temperature, step, compiled, in_forward
        if entropy is None:
            return logp, torch.zeros_like(logp)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        if ctx.in_forward:
            (grad_rows,) = ctx.saved_tensors
            grad_hidden = (grad_rows.to(grad_logp.dtype) * grad_logp[:, None]).to(grad_rows.dtype)
            return grad_hidden, None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        logit_grad = _compiled(_slice_logit_grad) if ctx.compiled else _slice_logit_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=_accumulate(hidden), device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=_accumulate(hidden), device=bias.device) if need_bias else None
        for i in range(0, hidden.shape[0], ctx.step):
            rows = slice(i, i + ctx.step)
            z = F.linear(hidden[rows], weight, bias)
            grad_z = logit_grad(z, lse[rows], targets[rows], grad_logp[rows], ctx.temperature)
            if need_hidden:
                torch.mm(grad_z, weight, out=grad_hidden[rows])
            if need_weight:
                _add_product(grad_weight, grad_z.t(), hidden[rows])
            if need_bias:
                grad_bias += grad_z.to(grad_bias.dtype).sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None, None, None)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for a float32 (or float64) accumulator and factors in the model dtype, without rounding
    each slice's product to the model dtype. On CUDA one GEMM takes the 16-bit factors and reads and
    writes the float32 accumulator itself (beta=1): a 16-bit product followed by a separate float32 add
    cost 19 passes over the [vocab, hidden] head per step, 18.5 ms of a 1.5B full fine-tuning step on
    an H100. torch has no such mixed-dtype GEMM on CPU, where the factors are widened first."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _accumulate(hidden: torch.Tensor) -> torch.dtype:
    """float32 for 16- and 32-bit models (bf16 log-softmax loses ~1e-2), float64 for float64 checks."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _slice_stats(z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """One slice's [rows, vocab] logits (model dtype) -> target log-prob, log-sum-exp and (or None)
    entropy per row, in float32 or wider. In place where it can: eager runs make one float32 copy."""
    z = z.to(_accumulate(z))
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = None
    if with_entropy:  # H = lse - sum(p * z)
        entropy = lse - ((z - lse[:, None]).exp_() * z).sum(-1)
    return logp, lse, entropy


def _slice_stats_and_grad(z: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """`_slice_stats` and, for a frozen head, d logp / d logits at g = 1, (one_hot(target) - softmax(z / T)) / T,
    in the logits' dtype: one read of the slice's logits for both."""
    zt = z.to(_accumulate(z))
    if temperature != 1.0:
        zt = zt / temperature  # out of place: float32 logits would alias z
    lse = torch.logsumexp(zt, dim=-1)
    logp = zt.gather(-1, targets[:, None]).squeeze(-1) - lse
    p = (zt - lse[:, None]).exp_()
    entropy = lse - (p * zt).sum(-1) if with_entropy else None  # H = lse - sum(p * z)
    grad = torch.where(_is_target(p, targets), 1.0 - p, -p)
    if temperature != 1.0:
        grad.div_(temperature)
    return logp, lse, entropy, grad.to(z.dtype)


def _is_target(p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] mask of each row's target column. The one-hot term of a logit gradient goes in as an
    elementwise select rather than a scatter_add_: compiled, the select fuses with the softmax and the
    cast to the model dtype, where the scatter made the float32 [rows, vocab] tensor go through memory
    once more (eager runs pay one more pass instead; the values are the same to the bit)."""
    return torch.arange(p.shape[-1], device=p.device) == targets[:, None]


def _slice_logit_grad(z: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, grad_logp: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """d logp / d logits for one slice, in the logits' dtype: (one_hot(target) - softmax(z / T)) * g / T."""
    g = grad_logp.to(lse.dtype)[:, None]
    p = z.to(lse.dtype)
    if temperature != 1.0:
        p.div_(temperature)
    p.sub_(lse[:, None]).exp_()
    grad = torch.where(_is_target(p, targets), g - p * g, -(p * g))
    if temperature != 1.0:
        grad.div_(temperature)
    return grad.to(z.dtype)


_COMPILED = {}


def _compiled(fn):
    """fn under torch.compile, built once per process (slices have one shape but the last)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _chunked_token_logprobs(model, batch: TokenBatch, temperature: float, with_entropy: bool, compiled: bool):
    head = model.get_output_embeddings()
    targets = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)  # last column: a dummy target

    def forward(hidden):  # runs inside the model's forward, so FSDP2 has the head's weight gathered
        b, t, h = hidden.shape
        frozen = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
        in_forward = FROZEN_HEAD_GRAD_IN_FORWARD and frozen and hidden.requires_grad and torch.is_grad_enabled()
        logp, entropy = _SlicedHead.apply(hidden.reshape(b * t, h), head.weight, head.bias, targets.reshape(b * t),
                                          temperature, with_entropy, compiled, in_forward)
        return torch.stack([logp, entropy], dim=-1).reshape(b, t, 2)

    # The head's own forward is swapped for this call only: the model then returns [B, T, 2] "logits".
    head.forward = lambda hidden: returned.append(forward(hidden)) or returned[-1]
    returned = []
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # [B, T, 2]
    finally:
        del head.forward
    if not returned or (out is not returned[-1] and not torch.equal(out, returned[-1])):
        raise _TransformedLogits  # the model changed what the head returned: these are not log-probs
    out = out[:, :-1]
    return out[..., 0], (out[..., 1].detach() if with_entropy else None)


class _TransformedLogits(Exception):
    """The model transforms its head's output (softcapping, scaling), which the sliced head cannot see."""
