"""Workarounds that let megatron-core + megatron-bridge run without transformer-engine and without CUDA.

Each one exists because a released version does something that fails on lora-rl's machines
(FIELD_NOTES section 5); none changes the maths. Checked with megatron-core 0.16.1 + megatron-bridge
0.3.1 (Python 3.11) and megatron-core 0.19.2 + megatron-bridge 0.6.2 (Python 3.12).
Only `lora_rl.backends.megatron` imports this file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Megatron:
    """The few megatron names the backend uses, imported once."""
    AutoBridge: type
    LoRA: type
    local_layer_spec: types.FunctionType
    parallel_state: types.ModuleType
    tensor_parallel: types.ModuleType
    bridge_version: str


_LOADED: Megatron | None = None


def _transformer_engine_stand_in() -> dict[str, types.ModuleType]:
    """megatron-bridge's LoRA layers `import transformer_engine.pytorch` unconditionally (to recognise TE
    linears); without TE that import fails. This stand-in only has to be importable: its classes are
    never instantiated, so `isinstance(module, te.Linear)` is simply False for the local (non-TE) spec.
    Version "0.0.0" makes megatron-core's version checks take their non-TE paths during the import."""

    class _NotTransformerEngine(torch.nn.Module):
        """Nothing is ever an instance of this."""

    def placeholder(name: str) -> type:
        if name.startswith("__"):  # __path__, __file__...: a plain module, not a package
            raise AttributeError(name)
        return type(name, (_NotTransformerEngine,), {})

    te = types.ModuleType("transformer_engine")
    te.__version__ = "0.0.0"
    te_torch = types.ModuleType("transformer_engine.pytorch")
    te_torch.__getattr__ = placeholder  # te.Linear, te.LayerNormLinear, ...
    te_torch.ops = types.SimpleNamespace(**{n: placeholder(n) for n in ("Sequential", "Linear", "Quantize")})
    te.pytorch = te_torch
    return {"transformer_engine": te, "transformer_engine.pytorch": te_torch}


def load() -> Megatron:
    """Import megatron-core and megatron-bridge (with the transformer-engine stand-in when TE is absent)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    from importlib.metadata import PackageNotFoundError, version

    try:
        bridge_version = version("megatron-bridge")
        import megatron.core  # noqa: F401
    except (ImportError, PackageNotFoundError) as err:
        from lora_rl.config import ConfigError

        raise ConfigError(f"backend.name=megatron needs megatron-core and megatron-bridge ({err}): install them with "
                          "`pip install --no-deps megatron-core==0.16.1 megatron-bridge==0.3.1 omegaconf` "
                          "(Python 3.12: 0.19.2 + 0.6.2), see README 'Megatron'") from None
    # megatron-core decides whether TE exists when each module is first imported: import the modules
    # the backend uses before the stand-in exists, so they see the truth (no TE).
    import megatron.core.distributed  # noqa: F401
    import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    from megatron.core import parallel_state, tensor_parallel

    have_te = importlib.util.find_spec("transformer_engine") is not None
    stand_in = {} if have_te else _transformer_engine_stand_in()
    before = set(sys.modules)
    sys.modules.update(stand_in)
    try:
        from megatron.bridge import AutoBridge
        from megatron.bridge.models.gpt_provider import local_layer_spec
        from megatron.bridge.peft.lora import LoRA
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    if stand_in:
        # Modules imported while the stand-in was visible believe TE is installed: tell them otherwise.
        for name in set(sys.modules) - before:
            module = sys.modules.get(name)
            if name.startswith("megatron.") and getattr(module, "HAVE_TE", False) is True:
                module.HAVE_TE = False
    _LOADED = Megatron(AutoBridge=AutoBridge, LoRA=LoRA, local_layer_spec=local_layer_spec,
                       parallel_state=parallel_state, tensor_parallel=tensor_parallel,
                       bridge_version=bridge_version)
    return _LOADED


@contextlib.contextmanager
def cpu_device_calls():
    """On a machine without CUDA, `torch.cuda.current_device()` answers "cpu" while Megatron code runs.

    megatron-core asks for the current CUDA device in places that have a CPU path otherwise (rotary
    embedding tables, the global attention buffer, tensor-parallel gathers); on a CPU-only torch that
    call raises. Scoped to the backend's own calls; a no-op where CUDA exists."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.current_device = original
