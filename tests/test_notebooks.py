"""The notebooks: committed clean (no outputs, one `parameters` cell where parameterised), and every one
executes headless under papermill on a tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_tune_lora.ipynb", "03_run.ipynb", "04_compare.ipynb"]


def test_the_four_notebooks_exist():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_with_one_parameters_cell(name):
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(book)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs before committing"
    assert sum("parameters" in c.metadata.get("tags", []) for c in book.cells) == 1
    # Thin: every code cell is a few lines of library calls, no function or class definitions.
    for cell in code:
        assert len(cell.source.splitlines()) <= 5 and "def " not in cell.source and "class " not in cell.source
        # A live plot drawn every few steps must draw the last ones of a run stopped between redraws.
        assert "LivePlot(" not in cell.source or "with LivePlot(" in cell.source, cell.source


def _papermill(name, out_dir, params):
    params_file = out_dir / f"{name}.params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "papermill", str(NOTEBOOKS / name), str(out_dir / name), "-f",
                           str(params_file), "-k", "python3", "--cwd", str(NOTEBOOKS), "--no-progress-bar"],
                          capture_output=True, text=True, timeout=600)


def _tiny(model_dir):
    return [f"model.path={model_dir}", "run.steps=3", "rollout.prompts_per_step=4", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "task.difficulty=1", "eval.size=10"]


def test_every_notebook_runs_headless(random_model_dir, tmp_path):
    # 01 and 03 train; 03's JSON side file then feeds a one-point "sweep" folder that 04 compares.
    quick = _papermill("01_quickstart.ipynb", tmp_path, {"overrides": _tiny(random_model_dir),
                                                         "output_dir": str(tmp_path / "quick")})
    assert quick.returncode == 0, quick.stderr[-3000:]
    assert json.loads((tmp_path / "quick" / "summary.json").read_text())["steps_done"] == 3
    executed = nbformat.read(tmp_path / "01_quickstart.ipynb", as_version=4)
    assert any(o.get("data", {}).get("image/png") for c in executed.cells if c.cell_type == "code"
               for o in c.outputs), "the live plot must stay in the output notebook"

    result = tmp_path / "point" / "result.json"
    run = _papermill("03_run.ipynb", tmp_path, {"recipe": "examples/quickstart.yaml",
                                                "overrides": _tiny(random_model_dir),
                                                "output_dir": str(tmp_path / "point" / "run"),
                                                "result_path": str(result)})
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(result.read_text())
    assert saved["config"]["model"]["path"] == str(random_model_dir) and saved["summary"]["steps_done"] == 3

    panel = _papermill("02_tune_lora.ipynb", tmp_path, {"recipe": "examples/quickstart.yaml"})
    assert panel.returncode == 0, panel.stderr[-3000:]

    from lora_rl.sweep import SweepSpec, collect

    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "overrides": _tiny(random_model_dir), "points": [{"lora.lora_rank": 8}]})
    from lora_rl.sweep import expand

    (point,) = expand(spec)
    folder = tmp_path / "sweep" / "points" / point.id
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(result.read_text())
    shutil.copytree(tmp_path / "point" / "run", folder / "run")  # where the sweep keeps the point's run
    (folder / "status.json").write_text(json.dumps({"status": "ok", "reason": "", "seconds": 1.0}))
    collect(spec)
    compare = _papermill("04_compare.ipynb", tmp_path, {"results": str(tmp_path / "sweep")})
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert (tmp_path / "sweep" / "plots" / "reward_curves.png").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_papermill_reads_every_parameter(name):
    """A parameter papermill cannot parse still runs, but with a warning and no type: keep them parseable."""
    from papermill.translators import PythonTranslator

    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    (cell,) = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    names = [p.name for p in PythonTranslator.inspect(cell)]
    assert names == [line.split(":")[0].split("=")[0].strip() for line in cell.source.splitlines()]


def test_compare_notebook_on_a_sweep_where_no_point_finished(tmp_path):
    """No metric columns at all: the table shows them empty and the notes name the failed point."""
    from lora_rl.sweep import SweepSpec, collect, expand

    spec = SweepSpec.from_dict({"recipe": "examples/quickstart.yaml", "output_dir": str(tmp_path / "sweep"),
                                "points": [{"lora.lora_rank": 8}]})
    (point,) = expand(spec)
    folder = tmp_path / "sweep" / "points" / point.id
    folder.mkdir(parents=True)
    (folder / "status.json").write_text(json.dumps({"status": "failed", "reason": "ConfigError: boom", "seconds": 1.0}))
    collect(spec)
    compare = _papermill("04_compare.ipynb", tmp_path, {"results": str(tmp_path / "sweep")})
    assert "KeyError" not in compare.stderr, compare.stderr[-3000:]
    executed = nbformat.read(tmp_path / "04_compare.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "boom" in printed
