"""Sweeps: expansion and validation, a real 4-point sweep through papermill with one failing point,
resuming, and the same sweep handed to a local Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lora_rl.config import ConfigError
from lora_rl.sweep import SweepSpec, expand, load_results, run_sweep, validate


def _spec(tmp_path, model_dir, **extra):
    raw = {"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
           "overrides": [f"model.path={model_dir}", "run.steps=2", "rollout.prompts_per_step=4",
                         "rollout.group_size=2", "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=8"],
           "parallel": 2, "timeout": 300}
    return SweepSpec.from_dict(raw | extra)


def _why(table, sweep_dir) -> str:
    """For an assertion's message: each point not ok, its reason and the end of its papermill log (a failure
    in CI is otherwise only a status)."""
    out = []
    for row in table[table["status"] != "ok"].to_dict("records"):
        log = sweep_dir / "points" / row["point"] / "papermill.log"
        tail = log.read_text(errors="replace").splitlines()[-25:] if log.is_file() else ["(no papermill.log)"]
        out.append(f"{row['point']}: {row['status']}: {row['reason']}\n" + "\n".join(tail))
    return "\n".join(out)


def test_grid_and_points_expand_to_stable_ids(tmp_path):
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path),
                                "grid": {"lora.lora_rank": [4, 8], "lora.target_modules": [["all-linear"],
                                                                                          ["q_proj", "v_proj"]]},
                                "points": [{"lora.use_lora": False}, {"lora.lora_rank": 4,
                                                                      "lora.target_modules": ["all-linear"]}]})
    points = expand(spec)
    assert len(points) == 5  # the explicit duplicate of a grid point runs once
    assert points[1].overrides[-1] == "lora.target_modules=[q_proj,v_proj]"
    assert points[-1].overrides == ("lora.use_lora=false",)
    assert [p.id for p in expand(spec)] == [p.id for p in points]
    assert len({p.id for p in points}) == 5
    # What every point shares is part of each id: finished points of another setting are never reused.
    changed = SweepSpec.from_dict({**_spec_dict(spec), "overrides": ["run.steps=200"]})
    assert not {p.id for p in expand(changed)} & {p.id for p in points}


def test_a_point_repeating_a_grid_point_in_another_key_order_runs_once(tmp_path):
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path),
                                "grid": {"lora.lora_rank": [4, 8], "train.lr": [0.001]},
                                "points": [{"train.lr": 0.001, "lora.lora_rank": 4}]})
    points = expand(spec)
    assert [p.values for p in points] == [{"lora.lora_rank": 4, "train.lr": 0.001},
                                          {"lora.lora_rank": 8, "train.lr": 0.001}]


def _spec_dict(spec):
    return {"recipe": spec.recipe, "output_dir": spec.output_dir, "grid": spec.grid, "points": list(spec.points)}


def test_validation_checks_each_point_against_the_model(tmp_path, random_model_dir):
    """A target that the model lacks is refused before anything runs, naming the point."""
    spec = _spec(tmp_path, random_model_dir, grid={"lora.target_modules": [["q_proj"], ["q_projx"]]})
    with pytest.raises(ConfigError, match=r"sweep point .*q_projx.* match no linear layer"):
        validate(spec)


@pytest.mark.parametrize(("raw", "needle"), [
    ({"grid": {"lora.lora_rank": [8]}}, "'recipe' is required"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x"}, "give a 'grid'"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"lora.lora_rank": 8}},
     "grid.lora.lora_rank=8 must be a non-empty list"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "executor": "slurm"},
     "executor='slurm' must be processes or ray"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "paralel": 2},
     "unknown keys ['paralel']"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "parallel": "two"},
     "parallel='two' must be a whole number"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "timeout": "30m"},
     "timeout='30m' must be a positive number of seconds"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "timeout": float("inf")},
     "timeout=inf must be a positive number of seconds .* a large one such as timeout: 604800"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": [{"a.b": [1]}]}, "must map keys to lists"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "points": ["a.b=1"]}, "must be a list of key: value maps"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "overrides": "run.steps=2"},
     "overrides='run.steps=2' must be a list of section.key=value strings"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {8: [1]}},
     "grid has the key 8, not a name .*: keys are section.key names"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "points": [{"a.b": 1}, {True: 1}]},
     "points[1] has the key True, not a name"),
    ({"recipe": 5, "output_dir": "x", "grid": {"a.b": [1]}}, "recipe=5 must be a string, e.g. recipe: examples/"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": ["x"], "grid": {"a.b": [1]}},
     "output_dir=['x'] must be a string"),
    ({"recipe": "examples/quickstart.yaml", "output_dir": "x", "grid": {"a.b": [1]}, "notebook": "no-such.ipynb"},
     "notebook='no-such.ipynb' is not a file .*: give a notebook with a parameters cell"),
])
def test_bad_sweep_files_are_refused(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        SweepSpec.from_dict(raw | ({"output_dir": "x"} if "recipe" not in raw else {}))


def test_a_sweep_folder_given_as_the_sweep_file_is_refused_by_name(tmp_path):
    from lora_rl.sweep import _spec_dict, load_spec

    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4]}})
    with pytest.raises(ConfigError, match=r"is a folder: pass a sweep YAML file"):
        load_spec(tmp_path)
    (tmp_path / "sweep").mkdir()  # what run_sweep leaves: its copy of the spec
    (tmp_path / "sweep" / "sweep.yaml").write_text(yaml.safe_dump(_spec_dict(spec), sort_keys=False))
    with pytest.raises(ConfigError, match=r"is a folder: pass the sweep's YAML file, e.g. .*sweep\.yaml"):
        load_spec(tmp_path / "sweep")
    assert [p.id for p in expand(load_spec(tmp_path / "sweep" / "sweep.yaml"))] == [p.id for p in expand(spec)]


def test_a_bad_point_is_refused_before_anything_runs(tmp_path, random_model_dir):
    spec = _spec(tmp_path, random_model_dir, grid={"lora.lora_rank": [8, -1]})
    with pytest.raises(ConfigError, match=r"sweep point lora_rank=-1-\w+ .*lora.lora_rank=-1 must be a positive"):
        validate(spec)
    assert not (tmp_path / "sweep").exists()


def test_four_points_one_failing_then_resume(tmp_path, random_model_dir):
    spec = _spec(tmp_path, random_model_dir, grid={"lora.lora_rank": [4, 8, 16]},
                 points=[{"task.name": "gsm8k", "task.data_dir": str(tmp_path / "no-such-folder")}])
    lines = []
    table = run_sweep(spec, log=lines.append)
    assert len(table) == 4
    ok, failed = table[table["status"] == "ok"], table[table["status"] != "ok"]
    assert len(ok) == 3 and len(failed) == 1, _why(table, tmp_path / "sweep")
    assert "is not a folder" in failed.iloc[0]["reason"] and failed.iloc[0]["task.name"] == "gsm8k"
    assert not (tmp_path / "sweep" / "points" / failed.iloc[0]["point"] / "papermill.first-try.log").exists()
    assert sorted(ok["lora.lora_rank"]) == [4, 8, 16]
    assert (ok["steps_done"] == 2).all() and (ok["trainable_params"].diff().dropna() > 0).all()
    for column in ("model.path", "rollout.group_size", "train.lr", "peak_memory_gib", "update_tokens_per_s"):
        assert column in table, column
    # One output notebook per point; results as CSV and Parquet with the same rows.
    for point in ok["point"]:
        assert (tmp_path / "sweep" / "points" / point / "03_run.ipynb").is_file()
    assert len(pd.read_csv(tmp_path / "sweep" / "results.csv")) == len(load_results(tmp_path / "sweep")) == 4

    stamps = {p: (tmp_path / "sweep" / "points" / p / "status.json").stat().st_mtime_ns for p in table["point"]}
    again = run_sweep(spec, log=lines.append)
    assert {p: (tmp_path / "sweep" / "points" / p / "status.json").stat().st_mtime_ns for p in table["point"]} \
        == stamps, "a second invocation must re-run nothing that finished"
    assert sum("skipped" in line for line in lines) == 4 and len(again) == 4


def test_the_same_sweep_on_a_local_ray_instance(tmp_path, random_model_dir):
    pytest.importorskip("ray")
    spec = _spec(tmp_path, random_model_dir, grid={"lora.lora_rank": [4, 8]}, executor="ray")
    table = run_sweep(spec, log=lambda line: None)
    assert list(table["status"]) == ["ok", "ok"], _why(table, tmp_path / "sweep")
    result = json.loads((tmp_path / "sweep" / "points" / table["point"][0] / "result.json").read_text())
    assert result["summary"]["steps_done"] == 2


def test_a_points_kernel_may_start_as_slowly_as_the_point_may_run(tmp_path, random_model_dir):
    """papermill gives a kernel 60 s to start; on a machine busy with the other points (and a Ray instance
    starting) a slow start is no fault of the point, which has the sweep's timeout to finish."""
    from lora_rl.sweep import _point_command

    spec = _spec(tmp_path, random_model_dir, grid={"lora.lora_rank": [4]}, timeout=900)
    (point,) = validate(spec)
    (tmp_path / "p").mkdir()
    command = _point_command(spec, point, tmp_path / "p")
    assert command[command.index("--start-timeout") + 1] == "900"


def test_a_point_past_the_timeout_is_killed_and_recorded(tmp_path, random_model_dir):
    spec = _spec(tmp_path, random_model_dir, points=[{"run.steps": 1000}], timeout=4)
    table = run_sweep(spec, log=lambda line: None)
    (row,) = table.to_dict("records")
    assert row["status"] == "timeout" and "timeout of 4 s" in row["reason"]
    status = json.loads((tmp_path / "sweep" / "points" / row["point"] / "status.json").read_text())
    assert status["status"] == "timeout" and status["overrides"][-1] == "run.steps=1000"


def test_paths_are_absolute_so_points_and_plots_find_them_from_anywhere(tmp_path, monkeypatch):
    """papermill runs a point's notebook in the repository's root: a relative output folder would put its
    results there instead of where the sweep looks. A recipe found from here becomes absolute too; one that
    is not found here stays as given, for the repository fallback."""
    (tmp_path / "mine.yaml").write_text("lora:\n  lora_rank: 8\n")
    monkeypatch.chdir(tmp_path)
    spec = SweepSpec.from_dict({"recipe": "mine.yaml", "output_dir": "runs/s", "grid": {"lora.lora_rank": [4]}})
    assert spec.output_dir == str(tmp_path / "runs" / "s") and spec.recipe == str(tmp_path / "mine.yaml")
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": "s", "grid": {"lora.lora_rank": [4]}})
    assert spec.recipe == "examples/quickstart.yaml" and len(validate(spec)) == 1


def test_a_timeout_kills_what_the_point_started_in_other_sessions(tmp_path):
    """A point's process that starts a child in a session of its own (as Jupyter starts its kernel, and
    the notebook a vLLM server): past the timeout, the child is killed too."""
    import os
    import sys
    import time

    from lora_rl.sweep import _run_logged

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    ran, code = _run_logged([sys.executable, "-c", script], tmp_path / "log.txt", timeout=3, env=dict(os.environ))
    assert ran == "timeout" and code is None
    child = int(pid_file.read_text())
    for _ in range(50):  # SIGKILL is delivered asynchronously; a killed child may linger as a zombie briefly
        try:
            os.kill(child, 0)
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().split(") ")[1].startswith("Z"):
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the point's child {child} outlived the timeout")


def test_point_values_reach_the_config_as_written(tmp_path):
    """A value YAML would read otherwise (" #" is a comment) reaches the point's config as written, as
    does a sweep folder with " #" in its name (run_recipe's run.output_dir)."""
    from lora_rl.config import load_config, override

    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep #2"),
                                "points": [{"model.path": "/data/my model #2"}]})
    (point,) = expand(spec)
    folder = f"{spec.output_dir}/points/{point.id}/run"
    config = load_config(spec.recipe, [*point.overrides, override("run.output_dir", folder)])
    assert config.model.path == "/data/my model #2"
    assert config.run.output_dir == folder


def _gone(pid: int) -> bool:
    import os
    import time

    for _ in range(50):  # SIGKILL is delivered asynchronously; a killed process may linger as a zombie briefly
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(") ")[1].startswith("Z"):
                    return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.1)
    return False


def _ctrl_c_once_written(pid_file, request) -> None:
    """Deliver what Ctrl-C delivers (SIGINT to the main thread) once `pid_file` is written, from a thread."""
    import signal
    import threading
    import time

    def press_ctrl_c():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGINT)

    main = threading.get_ident()
    # Python's own SIGINT handler, as a `lora-rl sweep` process has it: earlier tests in this process may have
    # left another one installed (in the full suite one did, and the Ctrl-C never raised).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    threading.Thread(target=press_ctrl_c, daemon=True).start()


def test_an_interrupt_stops_the_running_point_and_starts_no_other(tmp_path, monkeypatch, request):
    """Ctrl-C (KeyboardInterrupt in the main thread): the running point's processes, which run in sessions
    of their own out of the terminal's reach, are killed at once; the point gets no status (the next run
    starts it again) and the next point is never started."""
    import sys
    import time

    from lora_rl import sweep

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [sys.executable, "-c", script])
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4, 8]}, "parallel": 1, "timeout": 300})
    first, second = expand(spec)

    _ctrl_c_once_written(pid_file, request)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        list(sweep._run_with_processes(spec, [first, second]))
    assert time.perf_counter() - start < 60
    assert _gone(int(pid_file.read_text())), "the point's child outlived the interrupt"
    points = tmp_path / "sweep" / "points"
    assert not (points / first.id / "status.json").exists()
    assert not (points / second.id).exists()


def test_relative_folders_reach_the_points_as_validation_found_them(tmp_path, random_model_dir, monkeypatch):
    """Validation finds model.path from here; papermill runs each point in the repository's root, so the
    point gets the folder made absolute (its id unchanged)."""
    import os

    from lora_rl.config import load_config

    os.symlink(random_model_dir, tmp_path / "mymodel")
    monkeypatch.chdir(tmp_path)
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": ["model.path=mymodel"], "grid": {"lora.lora_rank": [4]}})
    (point,) = validate(spec)
    assert point.id == expand(spec)[0].id
    monkeypatch.chdir(tmp_path.parent)  # as the point's notebook runs: somewhere else
    config = load_config(spec.recipe, list(point.overrides))
    assert config.model.path == str((tmp_path / "mymodel").resolve())


def test_a_failed_points_row_shows_the_folders_it_ran_with(tmp_path, random_model_dir, monkeypatch):
    """A finished point's row comes from its result (absolute folders); a failed one's is rebuilt from its
    config, which showed model.path relative to wherever the table was collected."""
    import os
    import sys

    from lora_rl import sweep

    os.symlink(random_model_dir, tmp_path / "mymodel")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [sys.executable, "-c", "pass"])
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": ["model.path=mymodel"], "grid": {"lora.lora_rank": [4]}})
    (row,) = run_sweep(spec, log=lambda line: None).to_dict("records")
    assert row["status"] == "failed" and row["model.path"] == str((tmp_path / "mymodel").resolve())


def test_inputs_named_from_the_repository_are_found_from_a_notebook(monkeypatch, tmp_path):
    """Jupyter runs notebooks in notebooks/; the README names recipes, sweep files and sweep folders from the
    repository root. Inputs are found from either; a missing one says where it was looked for."""
    from pathlib import Path

    from lora_rl.plots import plots_folder
    from lora_rl.sweep import load_spec

    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo / "notebooks")
    assert load_spec("examples/sweep_rank.yaml").recipe.endswith("quickstart.yaml")
    assert plots_folder("examples") == repo / "examples" / "plots"
    with pytest.raises(ConfigError, match=r"no sweep results at 'runs/no-such-sweep' \(looked for from "
                                          r".*notebooks and the repository\)"):
        load_results("runs/no-such-sweep")


def test_an_interrupt_of_a_ray_sweep_stops_its_points(tmp_path, request):
    """Ctrl-C during a Ray sweep: the running point's processes (papermill, its kernel, what the notebook
    started), which a Ray worker started in sessions of their own, are killed; no point gets a status and
    no other starts. Before, ray.shutdown() ended the workers and left their points running."""
    pytest.importorskip("ray")
    import nbformat

    from lora_rl import sweep

    pid_file = tmp_path / "child.pid"
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\ntime.sleep(300)")]
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(book, tmp_path / "sleep.ipynb")
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4, 8]}, "parallel": 1, "timeout": 300,
                                "executor": "ray", "notebook": str(tmp_path / "sleep.ipynb")})
    first, second = expand(spec)

    _ctrl_c_once_written(pid_file, request)
    with pytest.raises(KeyboardInterrupt):
        list(sweep._run_with_ray(spec, [first, second]))
    assert _gone(int(pid_file.read_text())), "the point's child outlived the interrupt"
    points = tmp_path / "sweep" / "points"
    assert not (points / first.id / "status.json").exists()
    assert not (points / second.id).exists()


def test_an_interrupted_sweep_still_tables_the_points_that_finished(tmp_path, monkeypatch, request):
    """Ctrl-C after one point finished: results.csv holds that point's row at once. Before, the table was only
    written when every point had run, so an interrupted sweep left no table (or an earlier invocation's)."""
    import sys

    from lora_rl import sweep

    pid_file = tmp_path / "running.pid"

    def command(spec, point, folder):
        if point.values["lora.lora_rank"] == 4:  # finishes, with a result as the notebook writes it
            result = {"config": {"lora": {"lora_rank": 4}}, "summary": {"steps_done": 2}, "metrics": {}}
            return [sys.executable, "-c", f"open({str(folder / 'result.json')!r}, 'w').write({json.dumps(result)!r})"]
        return [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                      "time.sleep(120)"]

    monkeypatch.setattr(sweep, "_point_command", command)
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4, 8]}, "parallel": 1, "timeout": 300})
    _ctrl_c_once_written(pid_file, request)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, log=lambda line: None)
    assert _gone(int(pid_file.read_text()))
    table = load_results(tmp_path / "sweep")
    assert list(table["status"]) == ["ok"] and list(table["lora.lora_rank"]) == [4]


def test_a_second_sweep_over_a_running_sweeps_folder_is_refused(tmp_path, monkeypatch):
    """A second invocation while the first still runs (to run points added to the grid) would take the first
    one's running points, which have no status yet, for unstarted ones and delete their folders under them."""
    import fcntl
    import sys

    from lora_rl import sweep

    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [sys.executable, "-c", "pass"])
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4]}, "parallel": 1, "timeout": 300})
    (tmp_path / "sweep").mkdir()
    with open(tmp_path / "sweep" / ".sweep.lock", "w") as running:  # as the first invocation holds it
        fcntl.flock(running, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match=r"another lora-rl sweep is running over output_dir='.*sweep': wait"):
            run_sweep(spec, log=lambda line: None)
        assert not (tmp_path / "sweep" / "points").exists()
    assert list(run_sweep(spec, log=lambda line: None)["status"]) == ["failed"]  # no result.json: ran, once free


def test_a_terminated_sweep_stops_its_points(tmp_path, monkeypatch, request):
    """SIGTERM to the sweep (`kill`, `timeout`, a batch system) kills the running point's processes as Ctrl-C
    does; before, the sweep died and its points, in sessions of their own, ran on."""
    import signal
    import sys
    import threading
    import time

    from lora_rl import sweep

    pid_file = tmp_path / "running.pid"
    script = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [sys.executable, "-c", script])
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4]}, "parallel": 1, "timeout": 20})

    def terminate():
        while not pid_file.exists() or not pid_file.read_text():
            time.sleep(0.05)
        signal.pthread_kill(main, signal.SIGTERM)

    main = threading.get_ident()
    # Without the sweep's own handler SIGTERM would end pytest: this one ignores it, so the sweep would run on.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))
    threading.Thread(target=terminate, daemon=True).start()
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, log=lambda line: None)
    assert time.perf_counter() - start < 15 and _gone(int(pid_file.read_text()))


def test_an_error_of_the_driver_stops_the_running_points(tmp_path, monkeypatch):
    """Not only Ctrl-C: a sweep that stops on an error of its own (here a status it cannot write) kills the
    points still running, which otherwise ran on in their sessions after the sweep had failed."""
    import sys
    import time

    from lora_rl import sweep

    pid_file = tmp_path / "slow.pid"
    slow = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    # The failing job is the second one: the sweep stops at its error, not once the first point is done.
    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [
        sys.executable, "-c", slow if point.values["lora.lora_rank"] == 4 else "pass"])
    real_write = sweep._write_status

    def disk_full(folder, point, *args, **kwargs):
        if point.values["lora.lora_rank"] == 8:
            while not pid_file.exists() or not pid_file.read_text():
                time.sleep(0.05)  # the other point is running now
            raise OSError(28, "No space left on device")
        return real_write(folder, point, *args, **kwargs)

    monkeypatch.setattr(sweep, "_write_status", disk_full)
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4, 8]}, "parallel": 2, "timeout": 300})
    start = time.perf_counter()
    with pytest.raises(OSError, match="No space left"):
        run_sweep(spec, log=lambda line: None)
    assert time.perf_counter() - start < 60
    assert _gone(int(pid_file.read_text())), "the running point outlived the sweep"


def test_a_point_whose_ray_worker_dies_is_recorded_and_the_others_run_on(tmp_path):
    """Ray's memory monitor kills the worker running a point: the point is recorded as failed with the reason
    (Ray retried the task before, running it again over its folder), what it started is killed, not left
    running in its own session, and the other point finishes."""
    pytest.importorskip("ray")
    import os
    import signal
    import time

    import nbformat
    import psutil

    kernel_pid = tmp_path / "kernel.pid"
    body = f"""import json, os, pathlib, time
if "lora.lora_rank=8" in overrides:
    pathlib.Path({str(kernel_pid)!r}).write_text(str(os.getpid()))
    time.sleep(300)
pathlib.Path(result_path).write_text(json.dumps({{"config": {{}}, "summary": {{"steps_done": 0}}, "metrics": {{}}}}))
"""
    parameters = nbformat.v4.new_code_cell('recipe = ""\noverrides = []\noutput_dir = ""\nresult_path = ""\n'
                                           'progress = False')
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(body)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "point.ipynb")
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4, 8]}, "parallel": 2, "timeout": 300,
                                "executor": "ray", "notebook": str(tmp_path / "point.ipynb")})

    def kill_the_worker():
        while not kernel_pid.exists() or not kernel_pid.read_text():
            time.sleep(0.1)
        kernel = psutil.Process(int(kernel_pid.read_text()))
        worker = kernel.parent().parent()  # kernel <- papermill <- the Ray worker
        assert "ray" in " ".join(worker.cmdline()).lower(), worker.cmdline()
        os.kill(worker.pid, signal.SIGKILL)

    import threading

    threading.Thread(target=kill_the_worker, daemon=True).start()
    start = time.perf_counter()
    table = run_sweep(spec, log=lambda line: None)
    assert time.perf_counter() - start < 200
    rows = {row["point"].split("-")[0]: row for row in table.to_dict("records")}
    assert rows["lora_rank=4"]["status"] == "ok", _why(table, tmp_path / "sweep")
    assert rows["lora_rank=8"]["status"] == "failed" and "Ray worker died" in rows["lora_rank=8"]["reason"]
    assert _gone(int(kernel_pid.read_text())), "the dead worker's point ran on"


def test_a_sweep_killed_outright_takes_its_points_with_it(tmp_path):
    """SIGKILL runs no handler: the sweep's points, in sessions of their own, ran on, and the sweep's lock went
    with it, so a re-run started them again over their running folders."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "point.pid"
    driver = f"""
import sys
from lora_rl import sweep
point = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
sweep._point_command = lambda spec, p, folder: [sys.executable, "-c", point]
sweep.run_sweep(sweep.SweepSpec.from_dict({{"recipe": "examples/quickstart.yaml",
    "output_dir": {str(tmp_path / "sweep")!r}, "grid": {{"lora.lora_rank": [4]}}, "timeout": 300}}))
"""
    process = subprocess.Popen([sys.executable, "-c", driver], cwd=Path(__file__).resolve().parent.parent)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and process.poll() is None, "the point never started"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert _gone(int(pid_file.read_text())), "the point outlived its sweep"
    finally:
        process.kill()


def test_a_point_whose_kernel_never_started_gets_one_more_try(tmp_path, monkeypatch):
    """papermill failing before the kernel ran any cell (a port taken between Jupyter's choice and the
    kernel's bind, a kernel killed as it started) is no failure of the point's own code: one more try, with
    the first try's log kept. A point whose notebook ran and failed is not tried again (the four-point test)."""
    import sys

    from lora_rl import sweep

    tries = tmp_path / "tries"
    script = ("import json, pathlib, sys\n"
              f"tries = pathlib.Path({str(tries)!r}); tries.write_text(tries.read_text() + 'x' if tries.exists() else 'x')\n"
              "if len(tries.read_text()) == 1: sys.exit('RuntimeError: Kernel died before replying to kernel_info')\n"
              "out = pathlib.Path(sys.argv[1])\n"
              "(out / '03_run.ipynb').write_text(json.dumps({'cells': [{'cell_type': 'code', 'execution_count': 1}]}))\n"
              "(out / 'result.json').write_text('{}')\n")
    monkeypatch.setattr(sweep, "_point_command", lambda spec, point, folder: [sys.executable, "-c", script, str(folder)])
    monkeypatch.setattr(sweep, "_RUNNING", sweep._Running())  # an earlier test's interrupt is not this one's
    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "grid": {"lora.lora_rank": [4]}, "parallel": 1, "timeout": 300})
    (point,) = validate(spec)
    record = sweep.run_point(spec, point)
    assert record["status"] == "ok" and "Kernel died" in record["first_try"] and tries.read_text() == "xx"
    folder = tmp_path / "sweep" / "points" / point.id
    assert "Kernel died" in (folder / "papermill.first-try.log").read_text()


def test_a_run_config_given_as_the_sweep_file_points_to_lora_rl_train():
    from lora_rl.sweep import load_spec

    # It was "unknown keys ['lora', 'model', ...]", as if the file were a broken sweep file.
    with pytest.raises(ConfigError, match=r"is a run config .*: train it with `lora-rl train examples/quickstart.yaml`"):
        load_spec("examples/quickstart.yaml")
