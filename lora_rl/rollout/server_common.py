"""What the HTTP rollout engines (vllm-server, sglang) share: launch or attach, HTTP with retries, restart.

An engine either launches its server on 127.0.0.1 (a free port, its log in the run folder, a process
group of its own so it never outlives the run) or attaches to `rollout.server_url`. With several training
processes, rank 0 launches the server and loads/unloads adapters; every rank sends its own prompts.
A subclass names its server, builds its command line and speaks its LoRA endpoints (`_load`, `_unload`,
`generate`, `score`); everything about processes, retries and recovery lives here.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lora_rl import distributed
from lora_rl.config import Config
from lora_rl.rollout.adapters import AdapterVersions, folder_bytes
from lora_rl.rollout.base import RolloutError, SyncStats

RETRIES = 3  # attempts for requests that are safe to repeat
PARALLEL_REQUESTS = 32  # one HTTP request per prompt, sent together so the server batches them
# torchrun's rendezvous variables would make a launched server think it is one rank of a distributed job.
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


class HTTPFailure(Exception):
    def __init__(self, status: int | None, body: str):
        super().__init__(f"HTTP {status}: {body}" if status else body)
        self.status, self.body = status, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerEngine:
    """Base of the engines that drive a LoRA-serving HTTP server. Subclasses set `name`, `label`, `attach_hint`
    and implement `command`, `_load`, `_unload`, `generate` and `score`."""

    name = "server"
    needs_adapter = True
    label = ""  # the server's product name in messages (vLLM, SGLang)
    attach_hint = ""  # how to start a server this engine can attach to

    def __init__(self, *, base_model_dir: Path, config: Config, run_dir: Path):
        rollout = config.rollout
        self.timeout = rollout.request_timeout
        self.main = distributed.is_main()
        self.process = None
        self.version = -1
        self.api_key = os.environ[rollout.api_key_env] if rollout.api_key_env else ""
        # Restarting needs the one process that owns the server; with several ranks a dead server fails the run.
        self.restart = rollout.on_server_failure == "restart" and distributed.world_size() == 1
        self.restarts = 0
        self._launch_args = (base_model_dir, config, run_dir)
        # Every rank agrees on the prefix, so all of them name the same adapter in their requests.
        self.versions = AdapterVersions(run_dir / "rollout_adapters", rollout.live_versions,
                                        prefix=distributed.broadcast_object(
                                            AdapterVersions(run_dir, 1).prefix if self.main else None))
        url = rollout.server_url.rstrip("/")
        error = None
        if self.main:
            try:
                if url:
                    self._health(url, attempts=RETRIES)
                else:
                    url = self._launch()
                self.url = url
                self._attached()
            except RolloutError as err:
                error = str(err)
        error = distributed.broadcast_object(error)
        if error:
            self.close()
            raise RolloutError(error)
        self.url = distributed.broadcast_object(url if self.main else None)

    # --- what a subclass provides ---------------------------------------------------------------------

    def command(self, base_model_dir: Path, config: Config, port: int, initial: dict[str, str]) -> list[str]:
        """The server's command line; `initial` maps adapter names to folders to load at start-up."""
        raise NotImplementedError

    def environment(self, config: Config) -> dict[str, str]:
        """Variables the launched server needs on top of ours."""
        return {}

    def _attached(self) -> None:
        """Called on rank 0 once the server answers (launched or attached)."""

    def _load(self, version: int) -> None:
        raise NotImplementedError

    def _unload(self, version: int) -> None:
        raise NotImplementedError

    def _retire(self, versions: list[int]) -> None:
        """Versions that fell out of the window: unload each, then delete its folder."""
        for old in versions:
            self._unload(old)  # unload first: deleting a registered folder kills vLLM
            self.versions.delete(old)

    # --- server process ---------------------------------------------------------------------------

    def _launch(self, initial: dict[str, str] | None = None) -> str:
        base_model_dir, config, run_dir = self._launch_args
        port = free_port()
        self.log_path = run_dir / f"{self.name}.log"
        env = {**os.environ, **self.environment(config)}
        for key in _TORCHRUN_VARIABLES:
            env.pop(key, None)
        with open(self.log_path, "ab") as log:
            # A session of its own, so close() can stop the server and all of its workers together.
            self.process = subprocess.Popen(self.command(base_model_dir, config, port, initial or {}), env=env,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        atexit.register(self._stop_server)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + config.rollout.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RolloutError(f"{self.name} exited with code {self.process.returncode} during start-up; "
                                   f"last lines of {self.log_path}:\n{self._log_tail()}")
            try:
                self._call("GET", url + "/health", None, timeout=5)
                return url
            except HTTPFailure:
                time.sleep(1)
        self._stop_server()
        raise RolloutError(f"{self.name} did not become healthy within rollout.startup_timeout="
                           f"{config.rollout.startup_timeout}s; last lines of {self.log_path}:\n{self._log_tail()}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def _stop_server(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    # --- HTTP ---------------------------------------------------------------------------------------

    def _call(self, method: str, url: str, payload: dict | None, *, timeout: float | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                body = response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            raise HTTPFailure(err.code, err.read().decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as err:  # refused, reset, timed out
            raise HTTPFailure(None, f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body  # vLLM answers load/unload in plain text

    def _post(self, path: str, payload: dict, *, retry: bool = True):
        """POST with retries for failures that are safe to repeat: no answer, or a server-side 5xx."""
        attempts = RETRIES if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                return self._call("POST", self.url + path, payload)
            except HTTPFailure as err:
                transient = err.status is None or err.status >= 500
                if not transient or attempt == attempts:
                    raise
                time.sleep(0.5 * 2 ** attempt)

    def _ask(self, path: str, payload: dict):
        """A request that is safe to repeat (generation, scoring); a failure names the server and endpoint."""
        try:
            return self._post(path, payload)
        except HTTPFailure as err:
            raise RolloutError(f"{self.name} at {self.url}: {path} failed after {RETRIES} attempts ({err}); see "
                               f"{getattr(self, 'log_path', 'the server log')}") from None

    def _ask_all(self, path: str, payloads: list[dict]) -> list:
        """One request per payload, sent together so the server batches them; answers in payload order."""
        with ThreadPoolExecutor(min(PARALLEL_REQUESTS, len(payloads))) as pool:
            return list(pool.map(lambda payload: self._ask(path, payload), payloads))

    def _health(self, url: str, attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            try:
                self._call("GET", url + "/health", None, timeout=10)
                return
            except HTTPFailure as err:
                if attempt == attempts:
                    raise RolloutError(f"rollout.server_url={url!r}: no healthy {self.label} server there ({err}). "
                                       f"{self.attach_hint}, or leave rollout.server_url empty to let lora-rl "
                                       "launch it") from None
                time.sleep(attempt)

    # --- recovery -----------------------------------------------------------------------------------

    def _server_died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _relaunch(self) -> None:
        """A fresh server serving the live versions again (their folders are intact: nothing was unloaded)."""
        self.url = self._launch()
        for version in self.versions.live:
            self._load(version)

    def _recovering(self, call):
        """Run `call`; if the launched server died meanwhile, restart it, reload the live adapters and run
        `call` again (rollout.on_server_failure=restart), or fail naming the cause."""
        try:
            return call()
        except RolloutError:
            if not self._server_died():
                raise
        code = self.process.returncode
        if not self.restart or self.restarts >= RETRIES:
            if self.restart:
                why = f"it was restarted {self.restarts} times already"
            elif distributed.world_size() > 1:
                why = "restarts need a single training process"
            else:
                why = "rollout.on_server_failure=fail"
            raise RolloutError(f"{self.name} died (exit code {code}) and is not restarted ({why}); last lines of "
                               f"{self.log_path}:\n{self._log_tail()}")
        self.restarts += 1
        print(f"lora-rl: warning: {self.name} died (exit code {code}); restarting it ({self.restarts} of "
              f"{RETRIES}, rollout.on_server_failure=restart)", file=sys.stderr)
        self._relaunch()
        return call()

    # --- protocol -----------------------------------------------------------------------------------

    def adapter_path(self, version: int) -> Path:
        return self.versions.path(version)

    def publish(self, version: int, adapter_dir: Path | None) -> SyncStats:
        start = time.perf_counter()
        if adapter_dir is None or Path(adapter_dir) != self.versions.path(version):
            raise RolloutError(f"{self.name}: version {version} must be written to {self.versions.path(version)} "
                               "first (engine.adapter_path)")
        error = None
        if self.main:
            try:
                self._recovering(lambda: self._load(version))
                self._retire(self.versions.loaded(version))
            except RolloutError as err:
                error = str(err)
        error = distributed.broadcast_object(error)
        if error:
            raise RolloutError(error)
        self.version = version
        return SyncStats(bytes=folder_bytes(Path(adapter_dir)), seconds=time.perf_counter() - start)

    def close(self) -> None:
        if self.main and getattr(self, "url", None) and self.process is None:
            # Attached server: leave it as we found it.
            for version in list(self.versions.live):
                try:
                    self._unload(version)
                    self.versions.delete(version)
                except RolloutError:
                    pass
        self._stop_server()
        if self.process is not None:
            for version in list(self.versions.live):
                self.versions.delete(version)
        self.versions.live.clear()
        if self.main:
            self.versions.remove_root()
