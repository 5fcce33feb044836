"""Training backends behind one protocol (`base.TrainEngine`), chosen by name.

Each backend lives in its own file; heavy imports (megatron) happen only there.
"""

from __future__ import annotations

import dataclasses

from lora_rl.config import Config, ConfigError, LoRAConfig

BUILT = ("fsdp2", "megatron")  # backends whose code is in this version (the support matrix lists the design)


def require_backend(name: str) -> None:
    """Fail before anything is written if the backend's code is not in this version."""
    if name not in BUILT:
        raise ConfigError(f"backend.name={name!r} is in the support matrix but not built in this version of lora-rl "
                          f"yet: use backend.name={BUILT[0]}")


def adapter_lora(config: Config) -> LoRAConfig:
    """The LoRA targets the backend will really train, in Hugging Face names (what the PEFT adapter holds).

    Megatron adapts fused layers whole: a target of q_proj adapts linear_qkv, i.e. q_proj, k_proj and
    v_proj; gate_proj or up_proj adapts linear_fc1, i.e. both. FSDP2 trains exactly what is asked."""
    lora = config.lora
    if config.backend.name != "megatron" or "all-linear" in lora.target_modules:
        return lora
    from lora_rl.lora import hf_target_names, megatron_target_names

    return dataclasses.replace(lora, target_modules=hf_target_names(megatron_target_names(lora.target_modules)))


def make_backend(name: str, *, model, config, base_model_path):
    require_backend(name)
    if name == "megatron":
        if config.backend.tensor_parallel > 1:
            raise ConfigError(f"backend.tensor_parallel={config.backend.tensor_parallel}: lora_rl.trainer.train hands "
                              "every process its own prompts, and tensor-parallel ranks need the same ones; "
                              "train() runs Megatron with backend.tensor_parallel=1 (data parallel over processes). "
                              "benchmarks/megatron_gpu.py drives tensor parallelism directly")
        from lora_rl.backends.megatron import MegatronEngine

        return MegatronEngine(model, config, base_model_path)
    from lora_rl.backends.fsdp2 import FSDP2Engine

    return FSDP2Engine(model, config, base_model_path)
