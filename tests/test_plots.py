"""Comparison plots from a results table: which plots appear, both formats, byte-identical PNGs."""

from __future__ import annotations

import json

import pandas as pd

from lora_rl.plots import write_plots


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
