"""The support matrix: which training backend works with which rollout engine, as data.

This is the one place that decides whether a (backend, engine) pair is allowed; config validation,
the CLI and the notebook panel all ask `pair_status`. Each cell says whether the pair is part of
lora-rl's design and, when it is not, why and what to use instead. Whether the code for a cell is
built in this version is a separate question answered by the backend and engine registries
(`lora_rl.backends.get_backend`, `lora_rl.rollout.get_engine`), which fail with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_rl.config import Config

BACKENDS = ("fsdp2", "megatron", "archon")
ENGINES = ("embedded", "vllm", "vllm-server", "sglang")


@dataclass(frozen=True, slots=True)
class Cell:
    ok: bool
    why: str = ""  # for refused pairs: the reason and the fix


# Said for full fine-tuning too (lora.use_lora=false), where only fsdp2 serves: Megatron trains adapters only.
_ARCHON = Cell(False, "Archon has no LoRA support (AReaL's Archon engine trains full weights only), and lora-rl "
                      "has no Archon backend: use backend.name=fsdp2 (LoRA or full fine-tuning) or "
                      "backend.name=megatron (LoRA)")

MATRIX: dict[tuple[str, str], Cell] = {
    ("fsdp2", "embedded"): Cell(True),
    ("fsdp2", "vllm"): Cell(True),
    ("fsdp2", "vllm-server"): Cell(True),
    ("fsdp2", "sglang"): Cell(True),
    ("megatron", "vllm"): Cell(True),
    ("megatron", "vllm-server"): Cell(True),
    # AReaL refuses Megatron + SGLang. lora-rl's SGLang engine loads PEFT adapter folders only, never the trainer's
    # weights, so it is backend-agnostic: this cell relies on the Megatron backend exporting PEFT-format adapters.
    ("megatron", "sglang"): Cell(True),
    ("megatron", "embedded"): Cell(False, "the embedded engine generates with the trainer's Hugging Face model, "
                                          "which a Megatron backend does not have: use rollout.engine=vllm"),
    **{("archon", engine): _ARCHON for engine in ENGINES},
}


def pair_status(backend: str, engine: str) -> Cell:
    """The matrix cell for a pair; unknown names are refused with the valid choices."""
    if backend not in BACKENDS:
        return Cell(False, f"backend.name={backend!r} is not a training backend: choose one of {', '.join(BACKENDS)}")
    if engine not in ENGINES:
        return Cell(False, f"rollout.engine={engine!r} is not a rollout engine: choose one of {', '.join(ENGINES)}")
    return MATRIX[(backend, engine)]


def check_support(config: Config) -> None:
    from lora_rl.config import ConfigError

    cell = pair_status(config.backend.name, config.rollout.engine)
    if not cell.ok:
        if config.backend.name in BACKENDS and config.rollout.engine in ENGINES:
            raise ConfigError(f"backend.name={config.backend.name!r} with rollout.engine={config.rollout.engine!r} "
                              f"is not supported: {cell.why}")
        raise ConfigError(cell.why)


def matrix_table() -> str:
    """The matrix as a Markdown table (README, `lora-rl validate --matrix`)."""
    lines = ["| backend | " + " | ".join(ENGINES) + " |", "|---" * (len(ENGINES) + 1) + "|"]
    for backend in BACKENDS:
        cells = ["yes" if MATRIX[(backend, e)].ok else "no" for e in ENGINES]
        lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
