"""Run metrics: JSON lines, phase timers and peak memory with its unit and source."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_rl.checkpoint import atomic_write_text
from lora_rl.config import ConfigError


_CLEAR_REFS = Path("/proc/self/clear_refs")
_RESET_SLACK_GIB = 0.05  # RSS moves a little between the reset and the check


class _RssSampler:
    """Fallback where the kernel will not reset the peak resident set (some sandboxes accept or refuse the
    write to clear_refs and keep VmHWM): a daemon thread samples VmRSS every few milliseconds. It can miss a
    spike shorter than its period, so its kind says "sampled". It runs only while a run measures (a notebook
    kernel lives on after its runs, and would otherwise read /proc a hundred times a second for good)."""

    period_s = 0.01

    def __init__(self) -> None:
        self.peak_gib = _rss_gib()
        self.pid = os.getpid()  # a forked child inherits this object but not its thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-rl-rss-sampler", daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self.pid == os.getpid() and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        self.peak_gib = _rss_gib()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak_gib = max(self.peak_gib, _rss_gib())


_sampler: _RssSampler | None = None
_sampling = False  # whether the last reset fell back to the sampler


def _proc_status_gib(field: str) -> float | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 2**20  # kB
    except (OSError, StopIteration, ValueError):
        return None


def _rss_gib() -> float:
    return _proc_status_gib("VmRSS") or 0.0


def reset_peak_memory() -> None:
    """Start a run's peak here: a notebook kernel or the panel runs one training after another (and whatever
    else the user did) in one process, whose lifetime peak would otherwise be every later run's peak."""
    global _sampler, _sampling
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    if _proc_status_gib("VmHWM") is None:
        return  # not Linux: the peak since the process started is all there is
    try:  # Linux: "5" resets the process's peak resident set (VmHWM) to its current size
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass
    hwm, rss = _proc_status_gib("VmHWM"), _rss_gib()
    _sampling = hwm is not None and hwm > rss + _RESET_SLACK_GIB  # the write was refused or ignored
    if _sampling:
        if _sampler is None or not _sampler.running():
            _sampler = _RssSampler()
        else:
            _sampler.reset()


def stop_peak_sampling() -> None:
    """End of a run: stop the fallback sampler, if one runs; peak_memory() then still reports its peak."""
    if _sampler is not None and _sampler.running():
        _sampler.stop()


@contextmanager
def measuring_peak_memory():
    """A run's span: its peak starts at the entry, and the sampler (where one is needed) stops at the exit,
    however the run ends."""
    reset_peak_memory()
    try:
        yield
    finally:
        stop_peak_sampling()


def peak_memory() -> tuple[float, str]:
    """(GiB, what was measured): CUDA peak allocation on a GPU, else the process's peak RSS since the last
    reset_peak_memory() (Linux; sampled where the kernel keeps the peak; elsewhere since the process
    started)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda-max-allocated"
    if _sampling and _sampler is not None:
        return max(_sampler.peak_gib, _rss_gib()), "cpu-peak-rss-sampled"
    hwm = _proc_status_gib("VmHWM")
    if hwm is not None:
        return hwm, "cpu-peak-rss"
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
    file reads as if the run had never stopped.

    A run killed while appending leaves its last line cut short: reading skips that line (it is a step
    the run never finished logging, and resume drops it with the steps past the checkpoint). A line
    that does not parse anywhere else means the file was damaged otherwise, and is an error."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _lines(self) -> list[tuple[str, dict]]:
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        parsed = []
        for number, line in enumerate(lines, 1):
            try:
                parsed.append((line, json.loads(line)))
            except json.JSONDecodeError as err:
                if number == len(lines):  # the torn last line of an interrupted run
                    break
                raise ConfigError(f"{self.path}: line {number} of {len(lines)} is not a JSON record ({err}); only "
                                 "the last line may be cut short by an interrupted run, so the file was damaged "
                                 "otherwise: restore it, or delete that line") from None
        return parsed

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line, record in self._lines() if record["step"] <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [record for _, record in self._lines()]


def without_timings(record: dict) -> dict:
    """The record less what depends on the machine's speed and memory: what two runs of the same
    config and seed must agree on (a resumed run and an uninterrupted one, say)."""
    return {k: v for k, v in record.items()
            if not k.endswith(("_seconds", "_per_s")) and k != "peak_memory_gib"}
