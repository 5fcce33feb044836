"""Sweeps: a grid or list of config overrides, each point run headless through `notebooks/03_run.ipynb`.

A sweep file (YAML):

    recipe: examples/quickstart.yaml      # the base config every point starts from
    output_dir: runs/sweep-rank           # the sweep folder
    overrides: [run.steps=20, eval.size=50]   # applied to every point
    grid:                                 # cartesian product over any config keys ...
      lora.lora_rank: [4, 8, 16]
      lora.target_modules: [[all-linear], [q_proj, v_proj]]
    points:                               # ... and/or an explicit list of points
      - {lora.use_lora: false, train.lr: 2e-4}
    parallel: 2                           # points run at once, each in its own processes
    timeout: 1800                         # seconds per point; a point past it is killed and recorded
    executor: processes                   # or ray (ray_address: "" starts a local Ray instance)

Every point's config is validated before anything runs. Each point gets `points/<id>/` holding its run
folder, its executed notebook and `result.json`; the driver writes `status.json` (ok / failed / timeout,
with the reason). A second invocation skips points whose status is ok, so a sweep is resumable; a crash
or timeout of one point never stops the others. Results are collected into `results.csv` and
`results.parquet` in the sweep folder, one row per point with its full config.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from lora_rl.config import (Config, ConfigError, config_to_dict, find_input, load_config, override, read_yaml,
                            read_yaml_text)

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_NOTEBOOK = REPO_ROOT / "notebooks" / "03_run.ipynb"
CANCEL_WAIT_S = 30  # how long an interrupted Ray sweep waits for its cancelled tasks to kill their points
_SPEC_KEYS = {"recipe", "output_dir", "overrides", "grid", "points", "parallel", "timeout", "executor",
              "ray_address", "notebook"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepSpec:
    recipe: str
    output_dir: str
    overrides: tuple[str, ...] = ()
    grid: dict = field(default_factory=dict)
    points: tuple[dict, ...] = ()
    parallel: int = 1
    timeout: float = 3600.0
    executor: str = "processes"
    ray_address: str = ""
    notebook: str = ""

    @classmethod
    def from_dict(cls, raw: dict, *, base_dir: Path = Path(".")) -> SweepSpec:
        unknown = sorted(set(raw) - _SPEC_KEYS)
        if unknown:
            raise ConfigError(f"sweep: unknown keys {unknown}; a sweep file has {sorted(_SPEC_KEYS)}")
        for key in ("recipe", "output_dir"):
            if not raw.get(key):
                raise ConfigError(f"sweep: '{key}' is required (e.g. recipe: examples/quickstart.yaml, "
                                  "output_dir: runs/my-sweep)")
        for key, example in (("recipe", "recipe: examples/quickstart.yaml"),
                             ("output_dir", "output_dir: runs/my-sweep"),
                             ("notebook", "notebook: notebooks/03_run.ipynb"), ("ray_address", 'ray_address: "auto"')):
            # A number or a list here would otherwise end the sweep in a TypeError from pathlib or Ray.
            if raw.get(key) is not None and not isinstance(raw[key], str):
                raise ConfigError(f"sweep: {key}={raw[key]!r} must be a string, e.g. {example}")
        if not raw.get("grid") and not raw.get("points"):
            raise ConfigError("sweep: give a 'grid' (key: [values]) or a list of 'points' (key: value maps)")
        grid = raw.get("grid") or {}
        if not isinstance(grid, dict):
            raise ConfigError(f"sweep: grid={grid!r} must map keys to lists of values, e.g. grid: "
                              "{lora.lora_rank: [8, 16]}")
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep: grid.{key}={values!r} must be a non-empty list of values")
        points = raw.get("points") or []
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ConfigError(f"sweep: points={points!r} must be a list of key: value maps, e.g. points: "
                              "[{lora.lora_rank: 4}, {lora.use_lora: false}]")
        for where, keys in [("grid", grid), *((f"points[{i}]", p) for i, p in enumerate(points))]:
            for key in keys:
                # YAML reads `8:` or `on:` as a number or a boolean; expand() would end in an AttributeError.
                if not isinstance(key, str):
                    raise ConfigError(f"sweep: {where} has the key {key!r}, not a name (YAML reads 8:, on:, "
                                      "yes: as numbers or booleans): keys are section.key names, e.g. "
                                      "lora.lora_rank")
        overrides = raw.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"sweep: overrides={overrides!r} must be a list of section.key=value strings, e.g. "
                              "overrides: [run.steps=20]")
        if raw.get("executor", "processes") not in ("processes", "ray"):
            raise ConfigError(f"sweep: executor={raw['executor']!r} must be processes or ray")
        parallel, timeout = raw.get("parallel", 1), raw.get("timeout", 3600)
        if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
            raise ConfigError(f"sweep: parallel={parallel!r} must be a whole number of at least 1 (points at a time)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            # .inf would pass and then end the sweep in an OverflowError as its first point starts
            raise ConfigError(f"sweep: timeout={timeout!r} must be a positive number of seconds per point, e.g. "
                              "timeout: 1800 (for no practical limit, a large one such as timeout: 604800)")
        # Absolute paths from here on: papermill runs each point's notebook in the repository's root, and
        # the results table's run folders must still be found from wherever the plots are drawn.
        resolve = lambda p: str(Path(p) if Path(p).is_absolute() else (base_dir / p).resolve())  # noqa: E731
        # A recipe not found from here stays relative: `read_yaml` then looks for it in the repository.
        recipe = resolve(raw["recipe"]) if (base_dir / raw["recipe"]).is_file() else raw["recipe"]
        notebook = resolve(raw["notebook"]) if raw.get("notebook") else ""
        if notebook and not Path(notebook).is_file():
            # Checked before anything runs, as every point's config is: each point would fail on it.
            raise ConfigError(f"sweep: notebook={raw['notebook']!r} is not a file (looked for {notebook}): give a "
                              "notebook with a parameters cell like notebooks/03_run.ipynb, or leave notebook out")
        return cls(recipe=recipe, output_dir=resolve(raw["output_dir"]),
                   overrides=tuple(overrides), grid=dict(grid), points=tuple(points), parallel=parallel,
                   timeout=float(timeout), executor=raw.get("executor", "processes"),
                   ray_address=raw.get("ray_address", ""),
                   notebook=notebook)


def load_spec(path: str | Path) -> SweepSpec:
    path = find_input(path)
    if path.is_dir():  # `lora-rl plot` takes the sweep folder; `lora-rl sweep` given it read it as a file
        written = path / "sweep.yaml"
        hint = (f": pass the sweep's YAML file, e.g. {str(written)!r}, the copy this sweep wrote there"
                if written.is_file() else ": pass a sweep YAML file such as examples/sweep_rank.yaml")
        raise ConfigError(f"sweep file {str(path)!r} is a folder{hint}")
    try:
        raw = read_yaml_text(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"sweep file {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except FileNotFoundError:
        raise ConfigError(f"sweep file {str(path)!r} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {str(path)!r} must be a mapping of sweep keys")
    if "recipe" not in raw and set(raw) & {f.name for f in fields(Config)}:
        # `lora-rl sweep examples/quickstart.yaml`: a run config's sections listed as unknown sweep keys
        raise ConfigError(f"{str(path)!r} is a run config (sections {sorted(raw)}), not a sweep file: train it with "
                          f"`lora-rl train {path}`, or sweep it from a file with recipe: {path} and a grid, such as "
                          "examples/sweep_rank.yaml")
    return SweepSpec.from_dict(raw)  # paths in a sweep file are relative to where lora-rl runs


@dataclass(frozen=True, slots=True)
class Point:
    id: str
    values: dict  # the swept keys and their values
    overrides: tuple[str, ...]  # common overrides, then the point's own


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the sweep, in a stable order, each with an id derived from its values."""
    combos = [dict(zip(spec.grid, values, strict=True)) for values in itertools.product(*spec.grid.values())] \
        if spec.grid else []
    combos += [dict(p) for p in spec.points]
    # What every point shares goes into each id too: a rerun after the recipe or the common overrides
    # change must not take the old results for finished points.
    shared = [yaml.safe_dump(read_yaml(spec.recipe), sort_keys=True), *spec.overrides]
    out, seen = [], set()
    for values in combos:
        own = tuple(override(k, v) for k, v in values.items())
        # The same settings listed in another key order (a point repeating a grid point as {b: 1, a: 2})
        # are the same point: it runs once. Its id keeps the order it was written in.
        same = frozenset(own)
        if same in seen:
            continue
        seen.add(same)
        digest = hashlib.sha1("\n".join([*shared, *own]).encode()).hexdigest()[:8]
        shown = lambda v: "+".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)  # noqa: E731
        readable = "-".join(f"{k.split('.')[-1]}={shown(v)}" for k, v in values.items())
        # Only safe characters: an id is a folder name inside the sweep folder, never a path.
        readable = "".join(c if c.isalnum() or c in "=-_.+" else "_" for c in readable)[:60]
        point_id = f"{readable}-{digest}"
        out.append(Point(point_id, values, (*spec.overrides, *own)))
    return out


def validate(spec: SweepSpec) -> list[Point]:
    """Check every point's config before anything runs, as `lora-rl validate` does but for the data (a
    point whose data is missing fails on its own and is recorded as failed); a bad point names itself."""
    from lora_rl.lora import check_config

    points = []
    for point in expand(spec):
        try:
            config = load_config(spec.recipe, [*point.overrides, "run.output_dir=validate"])
            check_config(config, data=False)
        except ConfigError as err:
            raise ConfigError(f"sweep point {point.id} ({point.values}): {err}") from None
        points.append(replace(point, overrides=(*point.overrides, *_absolute_paths(config))))
    return points


def _absolute_paths(config) -> list[str]:
    """Overrides making the config's relative folders absolute, as found from here: validation found them
    from this working directory, but papermill runs each point in the repository's root. Appended to the
    point's overrides after its id was made, so the id does not depend on where the sweep runs."""
    from lora_rl.models import BUILTINS

    out = []
    for key, value in (("model.path", config.model.path), ("task.data_dir", config.task.data_dir)):
        if value and value not in BUILTINS and not Path(value).is_absolute() and Path(value).exists():
            out.append(override(key, str(Path(value).resolve())))
    return out


# --- one point --------------------------------------------------------------------------------------------


def run_recipe(recipe: str, overrides: list[str], *, output_dir: str, result_path: str = "",
               progress: bool = False) -> dict:
    """Train one config and write a JSON result (summary, full config, metric aggregates) beside it.

    This is what `notebooks/03_run.ipynb` calls: the notebook, the sweep and a user's script share it."""
    from lora_rl.trainer import train

    config = load_config(recipe or None, [*overrides, override("run.output_dir", output_dir), f"run.progress={progress}"])
    return write_result(config, train(config), result_path)


def write_result(config, summary: dict, result_path: str = "") -> dict:
    """The JSON result of a finished run (summary, full config, metric aggregates): what `collect` reads."""
    output_dir = config.run.output_dir
    from lora_rl.metrics import MetricsLog

    records = MetricsLog(Path(output_dir) / "metrics.jsonl").read()
    result = {"config": config_to_dict(config), "summary": summary, "metrics": _aggregate(records)}
    path = Path(result_path) if result_path else Path(output_dir) / "result.json"
    from lora_rl.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def _aggregate(records: list[dict]) -> dict:
    """Per-run numbers for comparison tables: steady-state speeds skip the first (warm-up) step."""
    if not records:
        return {}
    steady = records[1:] or records
    mean = lambda key: sum(r[key] for r in steady) / len(steady)  # noqa: E731
    tail = records[-max(1, len(records) // 5):]
    return {
        "rollout_tokens_per_s": mean("rollout_tokens_per_s"), "update_tokens_per_s": mean("update_tokens_per_s"),
        "step_seconds": mean("rollout_seconds") + mean("update_seconds") + mean("sync_seconds"),
        "reward_first": records[0]["reward_mean"], "reward_last": sum(r["reward_mean"] for r in tail) / len(tail),
        "peak_memory_gib": max(r["peak_memory_gib"] for r in records), "memory_kind": records[-1]["memory_kind"],
        "steps": len(records),
    }


def _point_command(spec: SweepSpec, point: Point, folder: Path) -> list[str]:
    notebook = spec.notebook or str(RUN_NOTEBOOK)
    params = {"recipe": spec.recipe, "overrides": list(point.overrides), "output_dir": str(folder / "run"),
              "result_path": str(folder / "result.json"), "progress": False}
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    # Parameters travel as a YAML file: `-p` would turn the overrides list into a string. The kernel may take
    # as long to start as the point may run: papermill's 60 s fails a point whose kernel starts slowly on a
    # machine busy with the others (and a Ray instance starting), which is no fault of the point.
    return [sys.executable, "-m", "papermill", notebook, str(folder / "03_run.ipynb"), "-f",
            str(folder / "params.yaml"), "-k", "python3", "--cwd", str(REPO_ROOT), "--no-progress-bar",
            "--start-timeout", str(max(60, int(spec.timeout)))]


def _fresh_folder(spec: SweepSpec, point: Point) -> Path:
    folder = Path(spec.output_dir) / "points" / point.id
    if folder.exists():
        shutil.rmtree(folder)  # a point re-run starts clean (finished points are never re-run)
    folder.mkdir(parents=True)
    return folder


class _Running:
    """The points' processes running now, so that an interrupt of the sweep (Ctrl-C, a notebook's stop)
    kills them: each runs in a session of its own, where the terminal's SIGINT does not reach it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pids: set[int] = set()
        self.interrupted = threading.Event()

    def start(self, command: list[str], **kwargs) -> subprocess.Popen | None:
        with self.lock:  # no new point once interrupted
            if self.interrupted.is_set():
                return None
            process = subprocess.Popen(command, **kwargs)
            self.pids.add(process.pid)
            return process

    def finished(self, process: subprocess.Popen) -> None:
        with self.lock:
            self.pids.discard(process.pid)

    def interrupt(self) -> None:
        with self.lock:
            self.interrupted.set()
            pids = list(self.pids)
        for pid in pids:
            _kill_tree(pid)


_RUNNING = _Running()


class _Interrupted(Exception):
    """A point stopped by an interrupt of the sweep: it gets no status, so the next run starts it again."""


def _run_logged(command: list[str], log_path: Path, timeout: float, env: dict) -> tuple[str, int | None]:
    """Run `command` in a process group of its own, output to `log_path`; ("ok" | "timeout", exit code).
    Whatever it leaves behind (a kernel orphaned by a killed papermill, a vLLM server, torchrun ranks) is
    killed with it. Raises _Interrupted if the sweep was interrupted before or while it ran."""
    with open(log_path, "wb") as log:
        process = _RUNNING.start([*_DIE_WITH_PARENT, str(os.getpid()), *command], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        if process is None:
            raise _Interrupted
        pid_file = log_path.with_name("running.pid")
        try:
            _write_pid(pid_file, process.pid)
            code = process.wait(timeout=timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            _kill_tree(process.pid)
            process.wait()
            code = None
        except BaseException:  # a Ray worker's task cancelled (KeyboardInterrupt): its processes go with it
            _kill_tree(process.pid)
            raise
        finally:
            _RUNNING.finished(process)
            pid_file.unlink(missing_ok=True)
        if _RUNNING.interrupted.is_set():
            raise _Interrupted
        return ("ok", code) if code is not None else ("timeout", None)


# A point's top process is started through this: Linux kills it when the thread that started it dies, so a
# sweep (or Ray worker) killed with SIGKILL, which can run no handler, takes its points with it. Without this
# they ran on, and the sweep's lock died with it: a re-run started them again over their running folders.
# The Jupyter kernel follows papermill (it polls its parent); exec keeps the setting and the pid.
_DIE_WITH_PARENT = [sys.executable, "-c", (
    "import ctypes, os, signal, sys\n"
    "if sys.platform == 'linux':\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "    if os.getppid() != int(sys.argv[1]): sys.exit('sweep: the sweep died before this point started')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")]


def _write_pid(path: Path, pid: int) -> None:
    """The point's top process, with its start time (a pid alone may name another process by the time it is
    read): whoever ran the point can die without killing it (a Ray worker killed by Ray's memory monitor), and
    the driver then kills what it left from here."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        path.write_text(f"{pid} {psutil.Process(pid).create_time()}\n")


def _kill_left_behind(folder: Path) -> None:
    """Kill the point process recorded in `folder` and what is below it, if it still runs on this machine (a
    pid recorded on another node of a Ray cluster names nothing here: its start time will not match)."""
    import psutil

    path = folder / "running.pid"
    try:
        pid, started = path.read_text().split()
        process = psutil.Process(int(pid))
        if process.create_time() == float(started):
            _kill_tree(process.pid)
    except (OSError, ValueError, psutil.NoSuchProcess):
        pass  # nothing left, or never started
    path.unlink(missing_ok=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process, every process below it and its process group. The Jupyter kernel that papermill
    starts, and a vLLM server started from the notebook, run in sessions of their own, out of reach of
    a kill of the point's process group; the tree is listed before anything is killed, so no orphan
    escapes by being re-parented."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _outcome(ran: str, code: int | None, folder: Path, log_path: Path, timeout: float) -> tuple[str, str]:
    if ran == "timeout":
        return "timeout", f"killed after the sweep's timeout of {timeout:g} s"
    if code == 0 and (folder / "result.json").exists():
        return "ok", ""
    return "failed", _failure_reason(log_path, code)


def _write_status(folder: Path, point: Point, status: str, reason: str, seconds: float, **extra) -> dict:
    record = {"id": point.id, "status": status, "reason": reason, "seconds": seconds,
              "values": point.values, "overrides": list(point.overrides), **extra}
    from lora_rl.checkpoint import atomic_write_text

    atomic_write_text(folder / "status.json", json.dumps(record, indent=2, default=str) + "\n")
    return record


def run_point(spec: SweepSpec, point: Point) -> dict:
    """Run one point in processes of its own; returns and writes its status. Never raises for the point's
    own failure: a crash or a timeout is recorded with its reason."""
    if _RUNNING.interrupted.is_set():  # before _fresh_folder: an interrupted sweep removes nothing more
        raise _Interrupted
    folder = _fresh_folder(spec, point)
    start = time.perf_counter()
    log_path = folder / "papermill.log"
    extra = {}
    for attempt in (1, 2):
        left = max(1.0, spec.timeout - (time.perf_counter() - start))  # both tries share the point's timeout
        ran, code = _run_logged(_point_command(spec, point, folder), log_path, left, _point_environment(spec))
        status, reason = _outcome(ran, code, folder, log_path, spec.timeout)
        if status != "failed" or attempt == 2 or not _notebook_never_ran(folder / "03_run.ipynb"):
            break
        # The Jupyter kernel did not come up (a port another process took between Jupyter's choice and the
        # kernel's bind, a kernel killed as it started): the point's own code never ran, so it gets one more
        # try. Its first log stays beside the second.
        os.replace(log_path, folder / "papermill.first-try.log")
        extra = {"first_try": reason}
    return _write_status(folder, point, status, reason, time.perf_counter() - start, **extra)


def _notebook_never_ran(path: Path) -> bool:
    """Whether papermill failed before the kernel ran any cell of the point's notebook (or wrote none)."""
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return True
    return all(cell.get("execution_count") is None for cell in cells if cell.get("cell_type") == "code")


def run_pack(spec: SweepSpec, pack: tuple[Point, ...]) -> list[dict]:
    """Run points that differ only in LoRA settings as one multi-LoRA job (`python -m lora_rl.multi`) over one
    base model; each point still gets its own run folder, result.json and status.json. The job may take the
    sweep's per-point timeout once per point."""
    if _RUNNING.interrupted.is_set():
        raise _Interrupted
    folders = [_fresh_folder(spec, point) for point in pack]
    job = _pack_folder(spec, pack)
    job.mkdir(parents=True, exist_ok=True)
    members = [{"overrides": list(point.overrides), "output_dir": str(folder / "run"),
                "result_path": str(folder / "result.json")} for point, folder in zip(pack, folders, strict=True)]
    (job / "pack.json").write_text(json.dumps({"recipe": spec.recipe, "members": members}, indent=2))
    start = time.perf_counter()
    timeout = spec.timeout * len(pack)
    ran, code = _run_logged([sys.executable, "-m", "lora_rl.multi", str(job / "pack.json")], job / "job.log",
                            timeout, _point_environment(spec))
    seconds = time.perf_counter() - start
    return [_write_status(folder, point, *_outcome(ran, code, folder, job / "job.log", timeout), seconds,
                          pack=[p.id for p in pack])
            for point, folder in zip(pack, folders, strict=True)]


def _pack_folder(spec: SweepSpec, pack: tuple[Point, ...]) -> Path:
    return Path(spec.output_dir) / "packs" / f"pack-{hashlib.sha1(' '.join(p.id for p in pack).encode()).hexdigest()[:8]}"


def _lost(spec: SweepSpec, job: Point | tuple[Point, ...], why: str, seconds: float) -> list[dict]:
    """A job whose runner died under it (a Ray worker killed, its node lost): each of its points not already
    finished is recorded as failed with the reason, as its own crash would be. What it started dies with the
    worker on Linux (parent-death signal); elsewhere it is killed from here when it runs on this machine."""
    pack = job if isinstance(job, tuple) else (job,)
    _kill_left_behind(_pack_folder(spec, pack) if isinstance(job, tuple) else
                      Path(spec.output_dir) / "points" / job.id)
    out = []
    for point in pack:
        folder = Path(spec.output_dir) / "points" / point.id
        status = _status(spec, point)
        if status and status["status"] == "ok":  # the worker died after writing it: the point is done
            out.append(status)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        out.append(_write_status(folder, point, "failed", why[:500], seconds,
                                 **({"pack": [p.id for p in pack]} if isinstance(job, tuple) else {})))
    return out


def plan_packs(spec: SweepSpec, points: list[Point]) -> tuple[list[tuple[Point, ...]], list[Point], list[str]]:
    """Group points whose configs differ only in `lora_rl.multi.PACKABLE` keys (LoRA rank, alpha, target
    modules, lr, weight decay, seed) into multi-LoRA jobs. Returns (packs, points to run alone, why each
    point runs alone)."""
    from lora_rl.models import meta_model
    from lora_rl.multi import _check_model_dropout, check_packable, shared_settings

    groups: dict[str, list[tuple[Point, object]]] = {}
    for point in points:
        config = load_config(spec.recipe, [*point.overrides, f"run.output_dir=points/{point.id}"])
        groups.setdefault(json.dumps(shared_settings(config), sort_keys=True, default=str), []).append((point, config))
    packs, alone, notes = [], [], []
    for members in groups.values():
        if len(members) == 1:
            alone.append(members[0][0])
            notes.append(f"{members[0][0].id}: differs from every other point outside the LoRA settings")
            continue
        try:
            check_packable([config for _, config in members])
            # The job refuses a base model with dropout of its own (GPT-2's 0.1) when it loads it: checked here
            # on its module tree, so these points run alone instead of all failing together.
            config = members[0][1]
            _check_model_dropout(meta_model(config.model.path), config)
        except ConfigError as err:
            alone.extend(point for point, _ in members)
            notes.extend(f"{point.id}: not packable ({err})" for point, _ in members)
            continue
        packs.append(tuple(point for point, _ in members))
    return packs, alone, notes


def _point_environment(spec: SweepSpec) -> dict[str, str]:
    """Points running side by side share the cores: each gets its share of threads (unless set)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = str(max(1, (os.cpu_count() or 1) // spec.parallel))
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, threads)
    return env


def _failure_reason(log_path: Path, code: int) -> str:
    """The last error line papermill printed (the exception the notebook raised)."""
    if code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line.strip() for line in lines if "Error" in line or "error:" in line]
    return (errors[-1] if errors else f"exit code {code}")[:500]


def _status(spec: SweepSpec, point: Point) -> dict | None:
    path = Path(spec.output_dir) / "points" / point.id / "status.json"
    return json.loads(path.read_text()) if path.exists() else None


# --- the whole sweep --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`kill`, `timeout`, a batch system's stop) ends a sweep as Ctrl-C does, killing its running points:
    they run in sessions of their own, out of reach of a signal to the sweep's process group, and outlived it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set a handler
        yield
        return

    def terminate(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sweep_lock(spec: SweepSpec):
    """Held while a sweep runs over its folder. A second invocation over the same folder (started to run points
    added to the grid while the first still runs) sees the first one's running points without a status and
    would start them again, deleting their folders under the running processes."""
    from lora_rl.checkpoint import exclusive_lock

    return exclusive_lock(Path(spec.output_dir) / ".sweep.lock",
                          f"sweep: another lora-rl sweep is running over output_dir={spec.output_dir!r}: wait for "
                          "it to finish (a later invocation runs the points it leaves), or stop it, or give this "
                          "sweep another output_dir")


def run_sweep(spec: SweepSpec | str | Path, *, retry_failed: bool = False, pack: bool = False, log=print):
    """Run every point not yet finished; returns the results table (a pandas DataFrame). With `pack`, points
    that differ only in LoRA settings train together as one multi-LoRA job (`run_pack`)."""
    if not isinstance(spec, SweepSpec):
        spec = load_spec(spec)
    points = validate(spec)
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    with _sweep_lock(spec):
        (Path(spec.output_dir) / "sweep.yaml").write_text(yaml.safe_dump(_spec_dict(spec), sort_keys=False))
        todo = []
        for point in points:
            status = _status(spec, point)
            if status and (status["status"] == "ok" or not retry_failed):
                log(f"sweep: {point.id}: {status['status']} earlier, skipped")
                continue
            todo.append(point)
        jobs: list = list(todo)
        if pack and todo:
            packs, alone, notes = plan_packs(spec, todo)
            jobs = [*packs, *alone]
            for p in packs:
                log(f"sweep: packing {len(p)} points into one multi-LoRA job: {', '.join(q.id for q in p)}")
            for note in notes:
                log(f"sweep: runs separately: {note}")
        log(f"sweep: {len(points)} points, {len(todo)} to run as {len(jobs)} jobs, "
            f"{min(spec.parallel, max(len(jobs), 1))} at a time ({spec.executor})")
        if jobs:
            runner = _run_with_ray if spec.executor == "ray" else _run_with_processes
            try:
                with _terminate_as_interrupt():
                    for records in runner(spec, jobs):
                        for record in records:
                            log(f"sweep: {record['id']}: {record['status']} in {record['seconds']:.0f} s"
                                + (f" - {record['reason']}" if record["reason"] else ""))
            except BaseException:
                # Ctrl-C (or an error of the driver itself): the points finished so far have their status and
                # result, and the table must show them now, not an earlier invocation's table (or none) until
                # the sweep is run again.
                collect(spec)
                raise
        return collect(spec)


def run_job(spec: SweepSpec, job: Point | tuple[Point, ...]) -> list[dict]:
    """One point, or a pack of points (a tuple), run in processes of their own; their status records."""
    return run_pack(spec, job) if isinstance(job, tuple) else [run_point(spec, job)]


def _spec_dict(spec: SweepSpec) -> dict:
    return {name: (list(getattr(spec, name)) if isinstance(getattr(spec, name), tuple) else getattr(spec, name))
            for name in SweepSpec.__dataclass_fields__}


def _run_with_processes(spec: SweepSpec, jobs: list):
    # Threads only wait here: every point runs in processes of its own (papermill and its kernel).
    _RUNNING.interrupted.clear()
    pool = ThreadPoolExecutor(spec.parallel)
    futures = [pool.submit(run_job, spec, job) for job in jobs]
    try:
        # As they finish, not in order: an error of the driver in a later job stops the sweep now, not once
        # the earlier ones are done (while the pool started more points).
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        # Ctrl-C, or an error of the driver (a status it could not write): stop every running point now (their
        # processes are out of the terminal's reach and would outlive the sweep) and start no other; the
        # interrupted points get no status.json, so the next run starts them again.
        _RUNNING.interrupt()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _run_with_ray(spec: SweepSpec, jobs: list):
    try:
        import ray
    except ImportError:
        raise ConfigError("sweep: executor=ray needs the ray package (pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=spec.ray_address or None, include_dashboard=False, log_to_driver=False,
                 **({} if spec.ray_address else {"num_cpus": spec.parallel}))
    try:
        # No retries: a task Ray would retry after its worker died would run the point again over the folder
        # where the first try's processes may still be running. The point is recorded as failed instead.
        remote = ray.remote(num_cpus=1, max_retries=0)(run_job)
        submitted = time.perf_counter()
        jobs_of = {remote.remote(spec, job): job for job in jobs}
        pending = list(jobs_of)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    yield ray.get(done[0])
                except ray.exceptions.RayError as err:
                    if isinstance(err, ray.exceptions.RayTaskError):
                        raise  # the sweep's own code failed in the task: stop the sweep, as with processes
                    # The worker or node died under the task (Ray's memory monitor, a lost node): the point's
                    # failure, recorded with the reason; the other points run on.
                    why = f"its Ray worker died ({type(err).__name__}: {str(err).strip().splitlines()[0]})"
                    yield _lost(spec, jobs_of[done[0]], why, time.perf_counter() - submitted)
        except BaseException:
            # Ctrl-C, or an error of the driver: cancelling interrupts each running task (a KeyboardInterrupt in
            # its worker), which kills its points' processes: they run in sessions of their own, so ending the
            # workers would leave them running. Tasks not started yet never start; as with processes, no
            # interrupted point gets a status.
            for ref in pending:
                ray.cancel(ref)
            ray.wait(pending, num_returns=len(pending), timeout=CANCEL_WAIT_S)
            raise
    finally:
        if started:
            ray.shutdown()


def collect(spec: SweepSpec):
    """One row per point: status, the full config (flattened `section.key`), summary and metric aggregates.
    Written as results.csv and results.parquet in the sweep folder."""
    import pandas as pd

    rows = []
    for point in expand(spec):
        status = _status(spec, point)
        if status is None:
            continue
        folder = Path(spec.output_dir) / "points" / point.id
        row = {"point": point.id, "status": status["status"], "reason": status["reason"],
               "point_seconds": status["seconds"], "run_dir": str(folder / "run"),
               "pack": ",".join(status.get("pack", []))}  # packed points share one job's memory and speed
        result_path = folder / "result.json"
        if result_path.exists():
            result = json.loads(result_path.read_text())
            for section, values in result["config"].items():
                for key, value in values.items():
                    row[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
            row.update({k: v for k, v in result["summary"].items() if k not in ("run_dir", "model", "task")})
            row.update(result["metrics"])
        else:  # a failed point: its config is still known, with the folders it ran with (made absolute)
            overrides = status.get("overrides", list(point.overrides))
            config = load_config(spec.recipe, [*overrides, override("run.output_dir", str(folder / "run"))])
            for section, values in config_to_dict(config).items():
                for key, value in values.items():
                    row[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
        rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(spec.output_dir)
    # Temporary file, then rename: a sweep killed while writing never leaves a truncated table behind.
    for name, write in (("results.csv", table.to_csv), ("results.parquet", table.to_parquet)):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        write(tmp, index=False)
        os.replace(tmp, out / name)
    return table


def load_results(path: str | Path):
    """A sweep's results table from its folder, results.csv or results.parquet."""
    import pandas as pd

    path = find_input(path)
    if path.is_dir():
        path = path / "results.parquet" if (path / "results.parquet").exists() else path / "results.csv"
    if not path.exists():
        raise ConfigError(f"no sweep results at {str(path)!r} (looked for from {os.getcwd()} and the repository): "
                          "run `lora-rl sweep SWEEP.yaml` first, or pass the sweep folder's absolute path")
    if path.suffix not in (".csv", ".parquet"):
        raise ConfigError(f"{str(path)!r} is not a results table: pass a sweep folder, or its results.csv or "
                          "results.parquet")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError) as err:  # empty, cut short, or not a table (pandas and pyarrow raise ValueErrors)
        raise ConfigError(f"cannot read the sweep results {str(path)!r} ({type(err).__name__}: {err}): rewrite it "
                          "with `lora-rl sweep SWEEP.yaml`, which collects the finished points again") from None
    missing = [c for c in ("point", "status") if c not in table]
    if missing:
        raise ConfigError(f"{str(path)!r} is not a lora-rl sweep results table (no {missing} column): pass the "
                          "results.csv or results.parquet that `lora-rl sweep` wrote")
    if "run_dir" in table:
        # Run folders are recorded as absolute paths; a sweep folder that was moved or copied still holds
        # them at points/<point>/run (older sweeps recorded paths relative to where they ran).
        def located(row):
            recorded = Path(str(row["run_dir"]))
            moved = path.parent / "points" / str(row["point"]) / "run"
            return str(moved) if not recorded.is_absolute() or (not recorded.exists() and moved.exists()) \
                else str(recorded)

        table["run_dir"] = table.apply(located, axis=1) if len(table) else table["run_dir"]
    return table
