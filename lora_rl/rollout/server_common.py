"""What the HTTP rollout engines (vllm-server, sglang) share: launch or attach, HTTP with retries, restart.

An engine either launches its server on 127.0.0.1 (a free port, its log in the run folder, a process
group of its own that is stopped with the run, however the run ends) or attaches to `rollout.server_url`.
With several training processes, rank 0 launches the server and loads/unloads adapters; every rank sends
its own prompts.
A subclass names its server, builds its command line and speaks its LoRA endpoints (`_load`, `_unload`,
`generate`, `score`); everything about processes, retries and recovery lives here.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import http.client
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
CLOSE_TIMEOUT = 10.0  # seconds an unload in close() may take: close() also runs while an error is on its way
PARALLEL_REQUESTS = 32  # one HTTP request per prompt, sent together so the server batches them
# torchrun's rendezvous variables would make a launched server think it is one rank of a distributed job.
_TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                       "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK")


# Launched servers not stopped yet; whatever is left at interpreter exit is stopped then.
_LAUNCHED: set[subprocess.Popen] = set()


def _stop(process: subprocess.Popen) -> None:
    """Stop a launched server's whole process group: SIGTERM, up to 30 s for the leader to exit, then SIGKILL for
    whatever is left. The group is signalled even when the leader is already gone: its workers (vLLM's
    EngineCore, SGLang's scheduler) outlive a leader that was SIGKILLed or OOM-killed, holding the GPU."""
    with contextlib.suppress(ProcessLookupError):  # nothing of the group is left
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _LAUNCHED.discard(process)


@atexit.register
def _stop_launched() -> None:
    for process in list(_LAUNCHED):
        _stop(process)


# A SIGTERM (torchrun stopping the other ranks when one fails, Slurm, `timeout`, docker stop) or a SIGKILL ends
# the run without atexit or the trainer's contextlib.closing, and the server, in a session of its own (so that
# _stop reaches its workers), is signalled by nobody. So the kernel sends the server's leader SIGTERM when the
# process that launched it dies, however it dies (PR_SET_PDEATHSIG); the leader then stops its workers as on
# any SIGTERM. A Python SIGTERM handler would not do: it runs only when the main thread returns to Python, and
# a rank whose peer failed is typically blocked inside a collective until torchrun SIGKILLs it. Linux only;
# the signal fires when the launching *thread* ends, and engines are built and used by the thread that runs
# the training loop.
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None  # resolved before any fork


def _die_with_parent(parent: int) -> None:
    """preexec_fn of a launched server (runs in the child between fork and exec)."""
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


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
        self.attempts = RETRIES  # for requests that are safe to repeat; close() makes one each
        self.main = distributed.is_main()
        self.process = None
        self.version = -1
        self.api_key_env = rollout.api_key_env
        self.api_key = os.environ[rollout.api_key_env] if rollout.api_key_env else ""
        # Restarting needs the one process that owns the server; with several ranks a dead server fails the run.
        self.restart = rollout.on_server_failure == "restart" and distributed.world_size() == 1
        self.restarts = 0
        self.unconfirmed: list[int] = []  # versions whose load failed: one that timed out may have landed anyway
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
            except BaseException:
                self.close()  # a launched server must not outlive a constructor that failed
                raise
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
                                            start_new_session=True,
                                            preexec_fn=functools.partial(_die_with_parent, os.getpid()) if _prctl
                                            else None)
        _LAUNCHED.add(self.process)
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
        # Once only: after that the group's id may be reused by another process.
        if self.process in _LAUNCHED:
            _stop(self.process)

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
            try:
                body = err.read().decode(errors="replace")
            except (OSError, http.client.HTTPException) as cut:  # the error page itself cut short or reset
                body = f"(body unreadable: {type(cut).__name__}: {cut})"
            if err.code in (401, 403):  # no request of this run can succeed: not worth a retry or another reading
                raise RolloutError(f"{self.name}: {method} {url} was refused with HTTP {err.code} ({body[:200]}): "
                                   f"{self._key_hint()}") from None
            raise HTTPFailure(err.code, body) from None
        # Refused, reset, timed out (OSError); a reply cut short or not HTTP at all (IncompleteRead, BadStatusLine).
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise HTTPFailure(None, f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body  # vLLM answers load/unload in plain text

    def _key_hint(self) -> str:
        if self.api_key_env:
            return (f"the server does not accept the API key in ${self.api_key_env} (rollout.api_key_env): export "
                    "the server's key")
        return ("the server requires an API key (vLLM/SGLang started with --api-key): export it in an environment "
                "variable and name that variable in rollout.api_key_env")

    def _post(self, path: str, payload: dict, *, retry: bool = True):
        """POST with retries for failures that are safe to repeat: no answer, or a server-side 5xx."""
        attempts = self.attempts if retry else 1
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
            # A 4xx is the server refusing this request: it was sent once, not retried.
            tries = (f"after {self.attempts} attempts" if err.status is None or err.status >= 500 else
                     "(refused, not retried)")
            raise RolloutError(f"{self.name} at {self.url}: {path} failed {tries} ({err}); see "
                               f"{getattr(self, 'log_path', 'the server log')}") from None

    def _unexpected(self, path: str, answer, expected: str) -> RolloutError:
        """An answer the engine cannot use (another server or version, a proxy's page): an error quoting it, as
        reading what is there would crash later or, worse, silently pair samples with the wrong prompts."""
        return RolloutError(f"{self.name} at {self.url}: {path} answered {str(answer)[:300]!r}, where {expected} was "
                            f"expected. Is {self.url} a {self.label} server (not a proxy) of the version lora-rl "
                            "supports (see the README)?")

    def _ask_all(self, path: str, payloads: list[dict]) -> list:
        """One request per payload, sent together so the server batches them; answers in payload order."""
        if not payloads:  # a rank with nothing to sample (an empty share of the eval set)
            return []
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
        self._stop_server()  # what is left of the dead one (its workers) holds memory the new one needs
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
                self.unconfirmed.append(version)  # until the server confirms it; close() unloads and deletes these
                self._recovering(lambda: self._load(version))
                self.unconfirmed.remove(version)
                self._retire(self.versions.loaded(version))
            except RolloutError as err:
                error = str(err)
        error = distributed.broadcast_object(error)
        if error:
            raise RolloutError(error)
        self.version = version
        return SyncStats(bytes=folder_bytes(Path(adapter_dir)), seconds=time.perf_counter() - start)

    def close(self) -> None:
        # close() also runs while an error is on its way to the user (the trainer's contextlib.closing): it must
        # neither delay it by retrying a hung server nor replace it. So one attempt per unload, briefly.
        self.attempts, self.timeout = 1, min(self.timeout, CLOSE_TIMEOUT)
        ours = self.versions.live + self.unconfirmed
        if self.main and getattr(self, "url", None) and self.process is None:
            # Attached server: leave it as we found it.
            for version in ours:
                try:
                    self._unload(version)
                except RolloutError:
                    break  # a server that fails one unload (hung, dead) is not asked again; the folders stay
                self.versions.delete(version)
        self._stop_server()
        if self.process is not None:
            for version in ours:
                self.versions.delete(version)
        self.versions.live.clear()
        self.unconfirmed.clear()
        if self.main:
            self.versions.remove_root()
