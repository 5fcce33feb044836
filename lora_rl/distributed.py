"""Process-group helpers: where lora-rl starts torch.distributed and asks about ranks.

The training loop calls only these helpers (and the backend); it never touches
`torch.distributed` itself. A single process needs no process group: every helper then
degrades to the identity, so the same loop runs with one process or under torchrun.
"""

from __future__ import annotations

import atexit
import functools
import gc
import sys
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init() -> Dist:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cpu":  # ranks share the cores: oversubscribed threads slow every rank down
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        # On GPUs, gloo beside NCCL serves collectives on CPU tensors (FSDP2 CPU offload's grad norm).
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(release_groups)  # also for a process that never reaches shutdown()
    return Dist(rank=rank, world=world, device=device)


def ensure_group() -> None:
    """A process group even for a single process: Megatron's parallel state is built on one.
    A one-process group changes nothing else here (`active()` stays False)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (the tensor itself in a single process)."""
    if not active():
        return value
    # NCCL reduces only GPU tensors; gloo takes them where they are.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else value.device
    out = value.detach().to(device).clone()
    dist.all_reduce(out)
    return out.to(value.device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if the flag is true on any rank (e.g. 'keep generating')."""
    return bool(all_sum(torch.tensor(float(flag), device=device)) > 0)


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's object on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes run files."""
    return not active() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def device() -> torch.device:
    """This process's compute device: its GPU under torchrun on a GPU machine, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def shutdown(wait: bool = True) -> None:
    """Leave the process group. Every rank must: a process that exits while its gloo/NCCL threads
    still run is aborted by the C++ runtime ("terminate called without an active exception").
    wait=False (after an error) skips the final barrier, which a crashed peer would never reach."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    release_groups()


def release_groups() -> None:
    """Free destroyed process groups now, while the interpreter is whole.

    destroy_process_group() only unregisters a group; its gloo threads live until the last Python
    reference goes, and torch.distributed's memo caches (DTensor sharding propagation, redistribution
    plans, mesh topology) keep one (key -> DeviceMesh -> group) for as long as the process lives.
    Left to interpreter finalization, their teardown is the likely cause of a rare abort after all the
    work was done ("terminate called without an active exception", about once in 60 two-process CPU
    test runs; never reproduced on demand). The engine may still hold the groups when shutdown()
    runs, so init() also registers this for exit time."""
    megatron = sys.modules.get("lora_rl.backends.megatron")
    if megatron is not None:  # Megatron's parallel state holds groups built on the destroyed WORLD group
        megatron.release_parallel_state()
    lru_cache_type = type(functools.lru_cache(None)(int))
    for obj in gc.get_objects():  # the caches are private and vary by torch version: find them by module
        # type(), not isinstance(): the heap holds weak proxies, and those raise once their object is gone
        if type(obj) is lru_cache_type and (obj.__module__ or "").startswith("torch.distributed"):
            obj.cache_clear()
    try:  # the two caches that are not functools ones (torch 2.13)
        from torch.distributed.tensor._redistribute import clear_redistribute_planner_cache
        from torch.distributed.tensor.debug import _clear_fast_path_sharding_prop_cache
    except ImportError:
        pass
    else:
        clear_redistribute_planner_cache()
        _clear_fast_path_sharding_prop_cache()
    gc.collect()
