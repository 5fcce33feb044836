"""The window of policy versions an adapter-loading engine (vLLM, SGLang) keeps, and where each one lives.

Every version gets a new adapter name *and* a new folder (`<prefix>-v<N>`): a reused name or id silently
serves stale weights in vLLM (FIELD_NOTES section 2), and SGLang refuses a name that is already loaded
(section 3). A bounded window of versions stays loaded; a version's folder is deleted only after the engine
has unloaded it (a registered folder that vanishes kills vLLM).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class AdapterVersions:
    """Names and folders of published versions, and the window the engine keeps loaded.

    The prefix carries a per-engine token, so two runs (or a resumed run) attached to the same server
    never reuse a name that the server may still associate with an older folder. An engine serving
    several adapters (multi-LoRA jobs) keeps one of these per adapter, each with its own `slot` of the
    `slots` ids, so no two adapters' versions ever share an id.
    """

    def __init__(self, root: Path, window: int, prefix: str | None = None, slot: int = 0, slots: int = 1):
        self.root = Path(root)
        self.window = window
        self.prefix = prefix or f"policy-{os.getpid():x}{int(time.time() * 1000) % 0xFFFFFF:06x}"
        self.slot, self.slots = slot, slots
        self.live: list[int] = []  # versions loaded in the engine, oldest first

    def name(self, version: int) -> str:
        return f"{self.prefix}-v{version}"

    def path(self, version: int) -> Path:
        return self.root / self.name(version)

    def lora_id(self, version: int) -> int:
        return version * self.slots + self.slot + 1  # vLLM ids start at 1; never reused within one engine

    def loaded(self, version: int) -> list[int]:
        """Record `version` as loaded; returns the versions that fell out of the window (to unload, then delete)."""
        self.live.append(version)
        retired, self.live = self.live[:-self.window], self.live[-self.window:]
        return retired

    def delete(self, version: int) -> None:
        """Only after the engine unloaded `version`."""
        shutil.rmtree(self.path(version), ignore_errors=True)

    def remove_root(self) -> None:
        """The folder of versions, once nothing in it is loaded (empty folders only)."""
        with contextlib.suppress(OSError):
            self.root.rmdir()
