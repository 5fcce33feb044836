"""Rollout engines behind one protocol (`base.RolloutEngine`), chosen by name.

Each engine lives in its own file and imports its heavy dependency (vllm, an HTTP client) only
there. Whether a backend may pair with an engine is decided in `lora_rl.support`.
"""

from __future__ import annotations

from lora_rl.config import ConfigError
from lora_rl.rollout.base import AdapterRequest, Completion, RolloutEngine, RolloutError, SamplingParams, SyncStats

__all__ = ["AdapterRequest", "Completion", "RolloutEngine", "RolloutError", "SamplingParams", "SyncStats", "make_engine",
           "require_engine"]

BUILT = ("embedded", "vllm", "vllm-server", "sglang")  # engines whose code is in this version (the support matrix lists the design)


def require_engine(name: str) -> None:
    """Fail before anything is written if the engine's code is not in this version."""
    if name not in BUILT:
        raise ConfigError(f"rollout.engine={name!r} is in the support matrix but not built in this version of lora-rl "
                          f"yet: use rollout.engine={BUILT[0]}")


def make_engine(name: str, *, backend, tokenizer, config, base_model_dir=None, run_dir=None) -> RolloutEngine:
    require_engine(name)
    if name == "embedded":
        from lora_rl.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(backend.model, tokenizer, generation_context=getattr(backend, "generation", None),
                              cuda_graphs=config.rollout.cuda_graphs)
    if name == "vllm":  # one process only: trainer.check_world refuses it under --nproc
        from lora_rl.rollout.vllm_inprocess import VLLMEngine

        return VLLMEngine(base_model_dir=base_model_dir, model=backend.model, config=config, run_dir=run_dir)
    if name == "sglang":
        from lora_rl.rollout.sglang_server import SGLangEngine

        return SGLangEngine(base_model_dir=base_model_dir, model=backend.model, config=config, run_dir=run_dir)
    from lora_rl.rollout.vllm_server import VLLMServerEngine

    return VLLMServerEngine(base_model_dir=base_model_dir, model=backend.model, config=config, run_dir=run_dir)
