"""Token batches shared by warm-start, rollout scoring and the GRPO update.

Sequences are prompt + completion, right-padded. Log-probabilities are reported at *target*
positions: column t holds log p(token[t+1] | tokens[..t]), so every tensor about tokens is
[B, T-1] and `completion_mask` marks the targets that are completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


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
                   chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each target token at `temperature` ([B, T-1], float32), optionally entropies.

    chunked (the default): when the logits would exceed one slice, the output head computes them a slice
    of tokens at a time under activation checkpointing, so the [B, T, V] logits never exist in float32
    (with a 150k vocabulary they are the largest tensor of the whole update); False materialises them
    as a plain forward does."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if chunked and batch.input_ids.numel() * vocab > _CHUNK_ELEMENTS:  # one slice would hold it all: no gain
        return _chunked_token_logprobs(model, batch, temperature, with_entropy)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # [B, T-1, V]
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)  # float32: bf16 log-softmax loses ~1e-2
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()  # [B, T-1]
    return logp, entropy


_CHUNK_ELEMENTS = 2 ** 26  # logits elements per slice: 256 MiB in float32 (~440 tokens of a 150k vocabulary)


def _head_slice(hidden, targets, weight, bias, temperature: float):
    """[N, H] hidden states -> [N, 2]: log-prob of each target and the entropy, both float32."""
    logits = F.linear(hidden, weight, bias).float() / temperature  # [N, V]
    logp_all = F.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.stack([logp, entropy], dim=-1)


def _chunked_token_logprobs(model, batch: TokenBatch, temperature: float, with_entropy: bool):
    head = model.get_output_embeddings()
    targets = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, -1:]], dim=1)  # last column: a dummy target

    def forward(hidden):  # runs inside the model's forward, so FSDP2 has the head's weight gathered
        b, t, h = hidden.shape
        flat, flat_targets = hidden.reshape(b * t, h), targets.reshape(b * t)
        step = max(1, _CHUNK_ELEMENTS // head.weight.shape[0])
        parts = [torch.utils.checkpoint.checkpoint(_head_slice, flat[i:i + step], flat_targets[i:i + step],
                                                   head.weight, head.bias, temperature, use_reentrant=False)
                 if torch.is_grad_enabled() else
                 _head_slice(flat[i:i + step], flat_targets[i:i + step], head.weight, head.bias, temperature)
                 for i in range(0, b * t, step)]
        return torch.cat(parts).reshape(b, t, 2)

    # The head's own forward is swapped for this call only: the model then returns [B, T, 2] "logits".
    head.forward = forward
    try:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # [B, T-1, 2]
    finally:
        del head.forward
    return out[..., 0], (out[..., 1].detach() if with_entropy else None)
