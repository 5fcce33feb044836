"""ipywidgets panels over the lora_rl library, installed as `lora_rl.widgets`.

`LoRAPanel` picks rank, alpha, target modules, backend and rollout engine, shows trainable parameters,
adapter size, predicted peak memory and whether the backend x engine pair is supported, and runs the
same `lora_rl.trainer.train` the CLI runs.
"""

from lora_rl.widgets.panel import LoRAPanel

__all__ = ["LoRAPanel"]
