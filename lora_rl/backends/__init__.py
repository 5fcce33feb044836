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


# Model families whose Megatron build, log-probs and exported adapter were checked against Hugging Face
# (tests/test_megatron.py; qwen3 by a review run). megatron-bridge knows others, but e.g. its Mistral
# bridge reads a config attribute transformers 5 removed, and a Llama with biases fails inside it.
MEGATRON_FAMILIES = ("llama", "qwen2", "qwen3")


def check_backend_config(config: Config, model_config) -> None:
    """What the backend cannot train, from the config and the model's config.json alone: `lora-rl validate`
    and the panel refuse it as `train` does, before anything is written or built."""
    if config.backend.name != "megatron":
        return
    import torch

    backend = config.backend
    if backend.tensor_parallel > 1:
        raise ConfigError(f"backend.tensor_parallel={backend.tensor_parallel}: lora_rl.trainer.train hands "
                          "every process its own prompts, and tensor-parallel ranks need the same ones; "
                          "train() runs Megatron with backend.tensor_parallel=1 (data parallel over processes). "
                          "benchmarks/megatron_gpu.py drives tensor parallelism directly")
    for key, value in (("cpu_offload", backend.cpu_offload), ("cuda_graphs", backend.cuda_graphs)):
        if value:
            raise ConfigError(f"backend.{key}=true is an FSDP2 setting; the Megatron backend would ignore it. "
                              f"Set backend.{key}=false, or use backend.name=fsdp2")
    if backend.activation_checkpointing and not torch.cuda.is_available():
        raise ConfigError("backend.activation_checkpointing=true with Megatron needs CUDA: megatron-core's "
                          "recompute saves and restores CUDA RNG states. Set it to false on the CPU")
    kind = getattr(model_config, "model_type", None)
    if kind not in MEGATRON_FAMILIES:
        raise ConfigError(f"model.path={config.model.path!r} is a {kind!r} model; the Megatron backend is verified for "
                          f"{list(MEGATRON_FAMILIES)} models only (megatron-bridge fails on others, or builds them "
                          "untested): use backend.name=fsdp2 for this model")
    biased = [key for key in ("attention_bias", "mlp_bias") if kind == "llama" and getattr(model_config, key, False)]
    if biased:
        raise ConfigError(f"model.path={config.model.path!r} is a Llama with {' and '.join(biased)}=true in its "
                          "config.json, which megatron-bridge cannot convert: use backend.name=fsdp2 for this model")
    rope = getattr(model_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"model.path={config.model.path!r} uses RoPE type {rope['rope_type']!r}; the Megatron backend "
                          "is verified for default RoPE only (Qwen2/2.5, Llama 2, SmolLM2): use backend.name=fsdp2 "
                          "for this model")


def make_backend(name: str, *, model, config, base_model_path):
    require_backend(name)
    check_backend_config(config, model.config)
    if name == "megatron":
        from lora_rl.backends.megatron import MegatronEngine

        return MegatronEngine(model, config, base_model_path)
    from lora_rl.backends.fsdp2 import FSDP2Engine

    return FSDP2Engine(model, config, base_model_path)
