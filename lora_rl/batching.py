"""Token batches shared by warm-start, rollout scoring and the GRPO update.

Sequences are prompt + completion, right-padded. Log-probabilities are reported at *target*
positions: column t holds log p(token[t+1] | tokens[..t]), so every tensor about tokens is
[B, T-1] and `completion_mask` marks the targets that are completion tokens.
"""

from __future__ import annotations

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


def token_logprobs(model, batch: TokenBatch, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each target token at `temperature` ([B, T-1], float32), optionally entropies."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]  # [B, T-1, V]
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)  # float32: bf16 log-softmax loses ~1e-2
    logp = logp_all.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1).detach()  # [B, T-1]
    return logp, entropy
