"""ipywidgets panels over the lora_rl library, installed as `lora_rl.widgets`.

The LoRA control panel (rank, alpha, target modules, backend, rollout engine) is not built yet;
the panels will build the same `lora_rl.config.Config` the CLI builds and call `lora_rl.trainer.train`.
"""
