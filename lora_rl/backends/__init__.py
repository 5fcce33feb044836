"""Training backends behind one protocol (`base.TrainEngine`), chosen by name.

Each backend lives in its own file; heavy imports (megatron) happen only there.
"""

from __future__ import annotations

from lora_rl.config import ConfigError

BUILT = ("fsdp2",)  # backends whose code is in this version (the support matrix lists the design)


def require_backend(name: str) -> None:
    """Fail before anything is written if the backend's code is not in this version."""
    if name not in BUILT:
        raise ConfigError(f"backend.name={name!r} is in the support matrix but not built in this version of lora-rl "
                          f"yet: use backend.name={BUILT[0]}")


def make_backend(name: str, *, model, config, base_model_path):
    require_backend(name)
    from lora_rl.backends.fsdp2 import FSDP2Engine

    return FSDP2Engine(model, config, base_model_path)
