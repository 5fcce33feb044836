"""Rollout engines behind one protocol (`base.RolloutEngine`), chosen by name.

Each engine lives in its own file and imports its heavy dependency (vllm, an HTTP client) only
there. Whether a backend may pair with an engine is decided in `lora_rl.support`.
"""

from __future__ import annotations

from lora_rl.config import ConfigError
from lora_rl.rollout.base import Completion, RolloutEngine, SamplingParams, SyncStats

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "SyncStats", "make_engine", "require_engine"]

BUILT = ("embedded",)  # engines whose code is in this version (the support matrix lists the design)


def require_engine(name: str) -> None:
    """Fail before anything is written if the engine's code is not in this version."""
    if name not in BUILT:
        raise ConfigError(f"rollout.engine={name!r} is in the support matrix but not built in this version of lora-rl "
                          f"yet: use rollout.engine={BUILT[0]}")


def make_engine(name: str, *, backend, tokenizer, config) -> RolloutEngine:
    require_engine(name)
    from lora_rl.rollout.embedded import EmbeddedEngine

    return EmbeddedEngine(backend.model, tokenizer, generation_context=getattr(backend, "generation", None))
