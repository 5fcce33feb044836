"""Comparison plots from a results table: which plots appear, both formats, byte-identical PNGs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lora_rl import plots
from lora_rl.config import ConfigError
from lora_rl.metrics import MetricsLog
from lora_rl.plots import plot_notes, write_plots


def _table(tmp_path):
    rows = []
    for i, (use_lora, rank, targets) in enumerate([(True, 4, ["all-linear"]), (True, 8, ["all-linear"]),
                                                   (True, 8, ["q_proj", "v_proj"]), (False, 8, ["all-linear"])]):
        run = tmp_path / f"run{i}"
        run.mkdir()
        run.joinpath("metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "reward_mean": s / 10 + i / 100})
                                                           for s in range(1, 6)) + "\n")
        rows.append({"point": f"p{i}", "status": "ok", "lora.use_lora": use_lora, "lora.lora_rank": rank,
                     "lora.target_modules": json.dumps(targets), "peak_memory_gib": 1 + rank / 10 + (not use_lora),
                     "update_tokens_per_s": 1000 - rank, "rollout_tokens_per_s": 500.0,
                     "trainable_params": 10 ** 6 if not use_lora else 1000 * rank, "run_dir": str(run),
                     "memory_kind": "cpu-peak-rss"})
    rows.append({"point": "broken", "status": "failed", "lora.use_lora": True, "lora.lora_rank": 16,
                 "lora.target_modules": '["all-linear"]', "run_dir": str(tmp_path / "none")})
    return pd.DataFrame(rows)


def test_every_plot_in_png_and_svg(tmp_path):
    written = write_plots(_table(tmp_path), tmp_path / "plots")
    assert sorted(written) == ["lora_vs_full", "memory_vs_rank", "reward_curves", "speed_vs_rank"]
    for files in written.values():
        assert [f.suffix for f in files] == [".png", ".svg"]
        assert files[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in files[1].read_bytes()[:2000]


def test_pngs_are_reproducible(tmp_path):
    """The same results, even after a CSV round trip, give byte-identical PNGs (no timestamps)."""
    table = _table(tmp_path)
    first = write_plots(table, tmp_path / "a")
    table.to_csv(tmp_path / "results.csv", index=False)
    second = write_plots(pd.read_csv(tmp_path / "results.csv"), tmp_path / "b")
    for name in first:
        assert first[name][0].read_bytes() == second[name][0].read_bytes(), name


def test_no_full_fine_tuning_point_no_bar_chart(tmp_path):
    table = _table(tmp_path)
    written = write_plots(table[table["lora.use_lora"] != False], tmp_path / "plots")  # noqa: E712
    assert "lora_vs_full" not in written and "memory_vs_rank" in written


def test_an_interrupted_runs_torn_last_line_is_skipped(tmp_path):
    """A run killed while appending leaves half a line; the plot draws the steps before it."""
    table = _table(tmp_path)
    with open(tmp_path / "run0" / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 6, "reward_me')
    assert "reward_curves" in write_plots(table, tmp_path / "plots")
    log = MetricsLog(tmp_path / "run0" / "metrics.jsonl")
    assert len(log.read()) == 5
    log.truncate_after(3)  # what --resume does with it: the torn line goes with the steps past the checkpoint
    assert [r["step"] for r in log.read()] == [1, 2, 3] and log.path.read_text().endswith("}\n")
    (tmp_path / "run1" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match=r"run1/metrics.jsonl: line 2 of 3 is not a JSON record"):
        write_plots(table, tmp_path / "plots")


def test_notes_name_what_the_plots_leave_out(tmp_path):
    table = _table(tmp_path)
    (tmp_path / "run2" / "metrics.jsonl").unlink()
    table.loc[table["point"].isin(["p0", "p1"]), "pack"] = "p0,p1"
    notes = plot_notes(table)
    assert any("point broken did not finish (failed" in n for n in notes)
    assert any("no reward curve for point p2" in n for n in notes)
    assert any(n.startswith("2 packed points") for n in notes)
    # the packed points' shared job memory is not drawn as theirs
    figure = plots.memory_vs_rank(table)
    assert [list(line.get_xdata()) for line in figure.axes[0].get_lines()] == [[8]]


def test_a_plot_without_data_is_removed_not_left_stale(tmp_path):
    table = _table(tmp_path)
    write_plots(table, tmp_path / "plots")
    written = write_plots(table[table["lora.use_lora"] != False], tmp_path / "plots")  # noqa: E712
    assert "lora_vs_full" not in written
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        f.name for files in written.values() for f in files)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match=r"--out .*afile' is a file"):
        write_plots(table, tmp_path / "afile")


def test_a_plot_that_fails_leaves_the_folder_as_it_was(tmp_path):
    """A damaged metrics.jsonl stops reward_curves: the plots drawn before it must not have replaced the
    older table's, or the folder would hold new memory plots beside an old bar chart."""
    table = _table(tmp_path)
    write_plots(table, tmp_path / "plots")
    before = {f.name: f.read_bytes() for f in (tmp_path / "plots").iterdir()}
    (tmp_path / "run1" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ConfigError, match="line 2 of 3 is not a JSON record"):
        write_plots(table.assign(peak_memory_gib=table["peak_memory_gib"] * 2), tmp_path / "plots")
    assert {f.name: f.read_bytes() for f in (tmp_path / "plots").iterdir()} == before


def test_results_tables_that_cannot_be_plotted_are_clear_errors(tmp_path):
    from lora_rl.cli import main
    from lora_rl.sweep import load_results

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    (tmp_path / "sweep.yaml").write_text("recipe: x\n")
    for name, needle in [("empty.csv", "cannot read the sweep results"), ("other.csv", "is not a lora-rl sweep results "
                         "table"), ("sweep.yaml", "is not a results table")]:
        with pytest.raises(ConfigError, match=needle):
            load_results(tmp_path / name)
        assert main(["plot", str(tmp_path / name)]) == 2
    table = _table(tmp_path)
    table.assign(status="failed").to_csv(tmp_path / "failed.csv", index=False)
    assert main(["plot", str(tmp_path / "failed.csv"), "--out", str(tmp_path / "p")]) == 2


def test_a_moved_sweep_folder_still_finds_its_runs(tmp_path):
    from lora_rl.sweep import load_results

    moved = tmp_path / "moved"
    (moved / "points" / "p0" / "run").mkdir(parents=True)
    (moved / "points" / "p0" / "run" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    pd.DataFrame([{"point": "p0", "status": "ok", "run_dir": str(tmp_path / "gone" / "points" / "p0" / "run")},
                  {"point": "p1", "status": "ok", "run_dir": "sweep/points/p1/run"}]).to_csv(moved / "results.csv",
                                                                                              index=False)
    table = load_results(moved)
    assert table["run_dir"].tolist() == [str(moved / "points" / "p0" / "run"), str(moved / "points" / "p1" / "run")]
    assert "reward_curves" in write_plots(table, tmp_path / "plots")


def test_live_plot_draws_the_last_steps_of_a_stopped_run():
    from lora_rl.live import LivePlot

    live = LivePlot(every=3, total=10)
    for step in range(1, 6):  # a run stopped after step 5
        live({"step": step, "reward_mean": step / 10, "format_rate": 0.5, "peak_memory_gib": 1.0,
              "memory_kind": "cpu-peak-rss"})
    assert live._drawn == 3
    live.finish()
    assert live._drawn == 5
    # As the quickstart notebook uses it: leaving the block draws what a run ended by an error left undrawn.
    with pytest.raises(KeyboardInterrupt), LivePlot(every=3, total=10) as live:
        for step in range(1, 6):
            live({"step": step, "reward_mean": 0.1, "format_rate": 0.5, "peak_memory_gib": 1.0,
                  "memory_kind": "cpu-peak-rss"})
        raise KeyboardInterrupt
    assert live._drawn == 5
    with pytest.raises(ValueError, match=r"LivePlot\(every=0\)"):
        LivePlot(every=0)


def test_points_of_one_rank_with_other_settings_get_lines_of_their_own(tmp_path):
    """A rank × group-size grid: the rank plots draw a line per group size instead of averaging the two
    (which mixed settings with no word); replicate seeds and alpha tied to the rank are still one line."""
    rows = [{"point": f"r{rank}-g{group}-s{seed}", "status": "ok", "lora.use_lora": True, "lora.lora_rank": rank,
             "lora.lora_alpha": 2 * rank, "lora.target_modules": '["all-linear"]', "rollout.group_size": group,
             "run.seed": seed, "run.output_dir": f"/runs/{rank}-{group}-{seed}", "update_tokens_per_s": 10000 / group + seed,
             "rollout_tokens_per_s": 500.0, "peak_memory_gib": 1.0, "trainable_params": 1000 * rank}
            for rank in (4, 16) for group in (2, 4) for seed in (0, 1)]
    rows.append({**rows[0], "point": "full", "lora.use_lora": False, "trainable_params": 10 ** 6})
    table = pd.DataFrame(rows)
    update_lines = {line.get_label(): list(line.get_ydata())
                    for line in plots.speed_vs_rank(table).axes[0].lines if line.get_label().startswith("update")}
    assert update_lines == {"update: all-linear, group_size=2": [5000.5, 5000.5],
                            "update: all-linear, group_size=4": [2500.5, 2500.5]}
    bars = [t.get_text() for t in plots.lora_vs_full(table).axes[0].get_xticklabels()]
    assert bars == ["full fine-tuning", "LoRA r=4 all-linear (group_size=2)", "LoRA r=4 all-linear (group_size=4)",
                    "LoRA r=16 all-linear (group_size=2)", "LoRA r=16 all-linear (group_size=4)"]


def test_full_fine_tuning_points_with_other_settings_get_bars_of_their_own():
    """Full fine-tuning at group sizes 2 and 4 beside LoRA at both: two bars, not one averaging the two
    (peak memory 3.0 drawn for runs that peaked at 2.0 and 4.0); replicate seeds and LoRA's own settings
    (rank, targets, alpha: a grid crossed with use_lora) are still one bar."""
    rows = [{"point": f"{kind}-g{group}-s{seed}", "status": "ok", "lora.use_lora": kind == "lora", "lora.lora_rank": rank,
             "lora.lora_alpha": 2 * rank, "lora.target_modules": '["all-linear"]', "rollout.group_size": group,
             "run.seed": seed, "update_tokens_per_s": 1000.0, "peak_memory_gib": float(group) + (kind == "full"),
             "trainable_params": 1000 * rank if kind == "lora" else 10 ** 6}
            for kind in ("lora", "full") for rank in (4, 16) for group in (2, 4) for seed in (0, 1)]
    axes = plots.lora_vs_full(pd.DataFrame(rows)).axes
    assert [t.get_text() for t in axes[0].get_xticklabels()][:2] == ["full fine-tuning (group_size=2)",
                                                                     "full fine-tuning (group_size=4)"]
    assert [bar.get_height() for bar in axes[0].patches][:2] == [3.0, 5.0]
    assert len(axes[0].patches) == 6  # and four LoRA bars: two ranks at two group sizes


def test_settings_missing_in_some_rows_or_held_as_lists_do_not_split_lines():
    """A table built in Python may hold lists; one mixing older results lacks a newer column in some rows:
    neither is a setting that was varied, so replicate seeds stay one line."""
    rows = [{"point": f"s{seed}", "status": "ok", "lora.use_lora": True, "lora.lora_rank": 8,
             "lora.target_modules": '["all-linear"]', "train.betas": [0.9, 0.999], "run.seed": seed,
             "train.new_knob": 1.0 if seed else float("nan"), "update_tokens_per_s": 100.0 + seed,
             "rollout_tokens_per_s": 50.0} for seed in (0, 1)]
    labels = [line.get_label() for line in plots.speed_vs_rank(pd.DataFrame(rows)).axes[0].lines]
    assert labels == ["update: all-linear", "rollout: all-linear"]


def test_a_write_that_fails_leaves_no_temporary_and_no_mixed_folder(tmp_path, monkeypatch):
    """A full disk while saving the third file: the folder must hold the older table's plots, all of them and
    nothing else (it kept a half-written .speed_vs_rank.svg.tmp-PID beside new memory plots and old others)."""
    import errno

    from matplotlib.figure import Figure

    table = _table(tmp_path)
    write_plots(table, tmp_path / "plots")
    before = {f.name: f.read_bytes() for f in (tmp_path / "plots").iterdir()}
    real, calls = Figure.savefig, []

    def savefig(self, fname, **kwargs):
        calls.append(fname)
        if len(calls) == 3:
            open(fname, "wb").write(b"<svg half")
            raise OSError(errno.ENOSPC, "No space left on device", str(fname))
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError, match="No space left"):
        write_plots(table.assign(peak_memory_gib=table["peak_memory_gib"] * 2), tmp_path / "plots")
    assert {f.name: f.read_bytes() for f in (tmp_path / "plots").iterdir()} == before


def test_target_modules_held_as_lists_are_drawn_as_the_csv_s():
    """A table built in Python (from result.json files, say) holds target_modules as lists: lora_vs_full
    raised TypeError (unhashable type: 'list'), failing write_plots, and the rank plots' labels read
    "['q_proj', 'v_proj']"."""
    rows = [{"point": f"p{i}", "status": "ok", "lora.use_lora": use_lora, "lora.lora_rank": rank,
             "lora.target_modules": targets, "update_tokens_per_s": 100.0, "rollout_tokens_per_s": 50.0,
             "peak_memory_gib": 1.0, "trainable_params": 1000 * rank}
            for i, (use_lora, rank, targets) in enumerate([(True, 8, ["q_proj", "v_proj"]), (True, 4, ["all-linear"]),
                                                           (False, 8, ["all-linear"])])]
    listed = pd.DataFrame(rows)
    as_csv = listed.assign(**{"lora.target_modules": listed["lora.target_modules"].map(json.dumps)})
    for figure in (plots.lora_vs_full, plots.speed_vs_rank):
        labels = [[t.get_text() for t in figure(table).axes[0].get_xticklabels()] +
                  [line.get_label() for line in figure(table).axes[0].lines] for table in (listed, as_csv)]
        assert labels[0] == labels[1], figure.__name__
    assert [t.get_text() for t in plots.lora_vs_full(listed).axes[0].get_xticklabels()] == [
        "full fine-tuning", "LoRA r=4 all-linear", "LoRA r=8 q_proj,v_proj"]


def test_a_run_of_one_step_is_drawn(tmp_path):
    """A line through one point draws nothing: a run stopped after its first step (the panel redraws every
    step below 100 steps) showed empty live axes, and a one-step point no reward curve."""
    import io

    import numpy as np
    from matplotlib.image import imread

    from lora_rl.live import LivePlot

    live = LivePlot()
    live({"step": 1, "reward_mean": 0.1, "format_rate": 0.5, "peak_memory_gib": 2.0, "memory_kind": "cpu-peak-rss"})
    pixels = imread(io.BytesIO(live.png()))[..., :3]
    red = (np.abs(pixels - np.array([214, 39, 40]) / 255).sum(-1) < 0.1).sum()  # the memory line: tab:red
    assert red > 0, "the peak-memory axes are empty"
    table = _table(tmp_path)
    (tmp_path / "run0" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5}\n')
    one_step = [line for line in plots.reward_curves(table).axes[0].lines if line.get_label() == "p0"]
    assert [line.get_marker() not in (None, "None", "") for line in one_step] == [True]
