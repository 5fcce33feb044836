"""Checkpoints and run files, written atomically (temporary name, then rename).

A checkpoint is a folder `checkpoints/step_NNNNNN/` holding the backend's adapter and optimizer
state (`backend/`: one file, or one shard per rank under FSDP2), the RNG state (`state.pt`, loaded
with `weights_only=True`: plain tensors, never pickled objects) and `meta.json` (step, policy
version, data position, evaluation so far). A folder only appears
under its final name once complete and on disk (fsynced), so the newest one is always safe to resume from,
a power cut included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from lora_rl import distributed
from lora_rl.config import ConfigError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would follow the file into place
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str):
    """Hold an exclusive lock on `path` (a folder itself, or a lock file made if missing) until the block ends;
    ConfigError(busy) if another process, or another open of it in this one, holds it. The lock goes with the
    process however it ends. A file system without locks (some network or FUSE ones) lets the block run
    unguarded rather than not at all."""
    import fcntl

    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(busy) from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def temp_dir(parent: Path, prefix: str) -> Path:
    """A temporary folder in `parent`, to be renamed into place once complete, with the permissions a
    plain mkdir gives: mkdtemp makes it 0700, which followed the folder into place (an adapter, checkpoint
    or merged model that another user's server or job could not read)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


def plain_file_permissions(folder: Path) -> None:
    """Give every file under `folder` the permissions a plain open gives under the umask, before the folder is
    renamed into place. safetensors (0.8) writes each .safetensors file 0600 whatever the umask: the weights
    were the one file of an adapter, a merged, built or exported model that another user's server or job
    could not read."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`, replacing the folder there with no moment at which
    `target` is missing or partial: Linux swaps the two names in one step (renameat2 RENAME_EXCHANGE), then
    the old contents, now under `new`'s name, are deleted. Two renames (old aside, new in) would leave a
    process killed between them with no folder under the name. Where the exchange is not supported (another
    OS, a file system without it) the two renames are the fallback."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here, use the fallback
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _umask() -> int:
    umask = os.umask(0o022)  # os.umask sets a mask and returns the old one: the only way to read it
    os.umask(umask)
    return umask


def save_checkpoint(run_dir: Path, step: int, backend, state: dict, meta: dict, keep: int) -> Path:
    """Collective. The backend writes its (possibly sharded) state into a temporary folder that
    rank 0 created; rank 0 adds `state.pt` (small tensors, e.g. RNG) and `meta.json`, then renames
    the folder into place and prunes old checkpoints."""
    final = step_dir(run_dir, step)
    tmp = None
    if distributed.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = str(temp_dir(final.parent, f".{final.name}.tmp-"))
    tmp = Path(distributed.broadcast_object(tmp))
    try:
        backend.save_state(tmp / "backend")
        distributed.barrier()
        if distributed.is_main():
            torch.save(state, tmp / "state.pt")
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
            # On disk before the rename: after a power cut the rename could otherwise survive while the files'
            # data did not, and the newest checkpoint, the one a resume picks, would be empty files.
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        # A save that fails (a full disk) must not keep its half-written folder: hidden, it held a
        # checkpoint's worth of the space that ran out until a --resume of this run folder removed it.
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.is_main():
        _fsync_path(final.parent)  # the rename itself
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    distributed.barrier()
    return final


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and folder under `root` (and root) on disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written temporaries are hidden dot-folders). Only names as
    `step_dir` writes them: a user's copy such as `step_000010.bak` was taken for the newest checkpoint
    (a resume loaded it) and, once old enough, pruned, i.e. deleted. Ordered by step number, not by name."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if re.fullmatch(r"step_\d{6,}", p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def remove_partial_writes(run_dir: Path) -> None:
    """Delete the temporary folders of checkpoints (and of the final adapter) whose writing was cut off. A
    killed process leaves them behind, hidden, and nothing ever reads them: each holds as much as a checkpoint
    (for a full fine-tune the weights and optimizer state), so a run killed during saves, again and again,
    filled the disk unseen."""
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for path in folder.glob(".step_*.tmp-*"):
            shutil.rmtree(path)
    # The run's final adapter, cut off while written (or, where folders cannot be swapped in one step, while
    # replaced: then the adapter itself is only under the .old- name and goes back in place).
    old = sorted(run_dir.glob(".adapter.old-*"))
    if old and not (run_dir / "adapter").exists():
        os.replace(old[0], run_dir / "adapter")
    for path in [*run_dir.glob(".adapter.tmp-*"), *run_dir.glob(".adapter.old-*")]:
        shutil.rmtree(path)


def load_checkpoint(path: Path, backend) -> tuple[dict, dict]:
    """Collective: restore the backend from a checkpoint; returns (state.pt contents, meta)."""
    backend.load_state(path / "backend")
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    meta = json.loads((path / "meta.json").read_text())
    return state, meta
