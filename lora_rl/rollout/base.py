"""The rollout protocol every engine implements, and the records it returns.

An engine turns prompt token ids into completions with the log-probability of every sampled token
under the policy version that sampled it (the *behaviour* policy of decoupled PPO). The trainer
publishes each new policy version to the engine; engines that keep their own copy of the weights
(vLLM, SGLang) load it as a new adapter, the embedded engine shares the trainer's model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0  # sampling is reproducible for a given seed


def prompt_seed(seed: int, prompt_index: int) -> int:
    """The seed of one prompt's request: vLLM seeds its n samples `seed + j`, so seeds of neighbouring prompts
    must not be neighbours (`seed * 1000 + i` gave sample j of prompt i and sample j-1 of prompt i+1 the same
    random stream). A hash spreads them over 62 bits, which keeps `+ j` inside vLLM's signed 64-bit range."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterRequest:
    """Prompts for one adapter of a multi-LoRA job; an engine samples several such requests at once."""
    adapter: str | None  # the adapter's name (None: the single adapter, or the base model)
    prompts: list[list[int]]
    params: SamplingParams


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    prompt_index: int  # which prompt of the request this completes
    token_ids: list[int]  # generated tokens, EOS included when the model stopped
    logprobs: list[float]  # behaviour log-prob of each generated token, at the sampling temperature
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens reached)
    version: int  # policy version that generated it


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncStats:
    bytes: int  # bytes handed to the engine for this version (0 when it shares the trainer's weights)
    seconds: float


class RolloutError(RuntimeError):
    """The engine failed (server down, adapter not loaded); the message says where and what to try."""


class RolloutEngine(Protocol):
    name: str
    version: int
    # Engines holding their own weights (vLLM, SGLang) need each version written as a PEFT folder at
    # adapter_path(version) before publish(); they can also score given tokens, which the trainer uses
    # to verify that the version it just published is the one the engine serves.
    needs_adapter: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Completions ordered prompt by prompt: params.n consecutive entries per prompt."""

    def publish(self, version: int, adapter_dir: Path | None, adapter: str | None = None) -> SyncStats:
        """Make `version` the policy that later `generate` calls sample from (of `adapter`, when the
        engine serves several: multi-LoRA jobs)."""

    def generate_adapters(self, requests: list[AdapterRequest]) -> list[list[Completion]]:
        """Several adapters' requests in one batch (multi-LoRA jobs); the completions of each request."""

    def close(self) -> None:
        """Release the engine's resources (servers, caches)."""

    def adapter_path(self, version: int) -> Path:
        """Where the trainer writes `version` before publishing it (engines with needs_adapter only)."""

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[list[float]]:
        """Log-probs at temperature 1 of each sequence's tokens after its prompt, under the current version
        (engines with needs_adapter only)."""
