"""What every benchmark script shares: the device it measures on, and the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path


def device_and_dtype():
    """The first GPU in bf16, else the CPU in float32, with the name the results give the machine."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    return torch.device("cpu"), torch.float32, "cpu"


def write_result(out: Path, benchmark: str, card: str, args, **fields) -> None:
    """`out` as JSON: the benchmark's name, the machine, torch's version, the command line's settings
    (paths as strings), then `fields`."""
    import torch

    result = {"benchmark": benchmark, "device": card, "torch": torch.__version__,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def device_kernels(events) -> list:
    """The profiler's GPU events that are work (kernels, memsets, copies), from `prof.events()` or
    `prof.key_averages()`. Each `record_function` range the step runs under (the optimizer's
    "Optimizer.step#...", a compiled graph's "## Call CompiledFxGraph ##") also gets a GPU span, from its
    first kernel's start to its last one's end: counted as work it adds its kernels a second time and the
    idle gaps between them, and it hides those gaps from an idle count (torch's own tables leave it out)."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
