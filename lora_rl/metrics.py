"""Run metrics: JSON lines, phase timers and peak memory with its unit and source."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_rl.checkpoint import atomic_write_text


def peak_memory() -> tuple[float, str]:
    """(GiB, what was measured): CUDA peak allocation on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda-max-allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "cpu-peak-rss"


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def json_safe(record: dict) -> dict:
    """NaN and inf become null: strict JSON readers (browsers, pandas' engine) reject them."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLog:
    """metrics.jsonl, one line per step. On resume, lines past the checkpoint are dropped so the
    file reads as if the run had never stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def without_timings(record: dict) -> dict:
    """The record less what depends on the machine's speed and memory: what two runs of the same
    config and seed must agree on (a resumed run and an uninterrupted one, say)."""
    return {k: v for k, v in record.items()
            if not k.endswith(("_seconds", "_per_s")) and k != "peak_memory_gib"}
