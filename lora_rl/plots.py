"""Comparison plots of a sweep's results (matplotlib, PNG and SVG).

  memory_vs_rank     peak memory against LoRA rank, one line per target-module set
  speed_vs_rank      update and rollout tokens/s against LoRA rank, one line per target-module set
  reward_curves      reward per step of every finished point (from its metrics.jsonl)
  lora_vs_full       peak memory, update tokens/s and trainable parameters: LoRA points against full fine-tuning

`write_plots(results, out_dir)` writes every plot the table has data for; `lora-rl plot` and
`notebooks/04_compare.ipynb` call it, and print `plot_notes(results)`: what the plots leave out (failed
points, runs without metrics, packed points' shared memory and speed). PNGs are byte-identical for
identical data (no timestamp).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, safe in threads

from lora_rl.config import Config, ConfigError, find_input
from lora_rl.metrics import MetricsLog

_METADATA = {"png": {"Software": None}, "svg": {"Date": None}}


def _finished(results):
    return results[results["status"] == "ok"] if "status" in results else results


def _measured_alone(results):
    """Finished points whose memory and speed are their own: the points of a multi-LoRA pack (`lora-rl sweep
    --pack`) share one job, and each reports that job's peak memory and throughput."""
    data = _finished(results)
    if "pack" not in data:
        return data
    return data[data["pack"].fillna("").astype(str) == ""]


def _metrics_path(row) -> Path | None:
    path = Path(str(row["run_dir"])) / "metrics.jsonl" if "run_dir" in row and isinstance(row["run_dir"], str) else None
    return path if path is not None and path.is_file() else None


def _targets_label(value) -> str:
    if isinstance(value, (list, tuple)):  # a table built in Python, not read from results.csv
        return ",".join(map(str, value))
    try:
        return ",".join(json.loads(value))
    except (TypeError, ValueError):
        return str(value)


def _targets(data):
    """Each row's target-module label ("" for a table without the column)."""
    if "lora.target_modules" not in data:
        return data.index.to_series().map(lambda _: "")
    return data["lora.target_modules"].map(_targets_label)


# Config columns that never make a line of their own: the plots' axes and groups, each point's own folder, and
# replicate seeds (points differing only in run.seed are averaged: their mean is the setting's value).
_NOT_A_SETTING = ("lora.lora_rank", "lora.target_modules", "lora.use_lora", "run.output_dir", "run.seed")
_SECTIONS = {f.name for f in dataclasses.fields(Config)}


def _setting_columns(data) -> list[str]:
    """Config columns (`section.key`) that may tell points apart."""
    # A column missing in some rows (results mixing older result.json files) is not a setting that was varied.
    return [c for c in data.columns if "." in c and c not in _NOT_A_SETTING and c.split(".", 1)[0] in _SECTIONS
            and not data[c].isna().any()]


def _other_settings(data) -> list[str]:
    """Config columns (`section.key`) that differ between points of the same rank and target modules, e.g.
    rollout.group_size in a rank × group-size grid: averaging over them would mix settings silently."""
    columns = _setting_columns(data)
    if data.empty or "lora.lora_rank" not in data:
        return []
    # As text: a table built in Python may hold lists, which do not hash.
    groups = data[columns].astype(str).groupby([_targets(data), data["lora.lora_rank"]])
    return [c for c in columns if (groups[c].nunique() > 1).any()]


def _setting_label(row, columns: list[str]) -> str:
    return ", ".join(f"{c.split('.', 1)[1]}={row[c]}" for c in columns)


def _finish(fig, ax, xlabel: str, ylabel: str, title: str, *, legend_size: int):
    """Labels, grid and legend shared by the line plots."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    return fig


def _by_rank(results, ys: list[tuple[str, str]], ylabel: str, title: str):
    data = _measured_alone(results)
    data = data[data["lora.use_lora"].astype(bool)] if "lora.use_lora" in data else data
    if data.empty or "lora.lora_rank" not in data:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    others = _other_settings(data)
    lines = data.apply(lambda row: ", ".join(filter(None, [_targets_label(row.get("lora.target_modules", "")),
                                                              _setting_label(row, others)])), axis=1)
    for label, group in data.groupby(lines):
        group = group.groupby("lora.lora_rank").mean(numeric_only=True).sort_index()
        for column, name in ys:
            if column in group:
                ax.plot(group.index, group[column], marker="o", label=f"{name}{label}")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, "LoRA rank", ylabel, title, legend_size=8)


def memory_vs_rank(results):
    kind = _memory_kind(results)
    return _by_rank(results, [("peak_memory_gib", "")], f"peak memory, GiB ({kind})", "Peak memory vs LoRA rank")


def speed_vs_rank(results):
    return _by_rank(results, [("update_tokens_per_s", "update: "), ("rollout_tokens_per_s", "rollout: ")],
                    "tokens/s", "Throughput vs LoRA rank")


def reward_curves(results):
    data = _finished(results)
    if data.empty or "run_dir" not in data:
        return None
    curves = [(str(row.get("point", "")), MetricsLog(path).read()) for _, row in data.iterrows()
              if (path := _metrics_path(row)) is not None]
    curves = [(name, records) for name, records in curves if records]
    if not curves:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, records in curves:
        ax.plot([r["step"] for r in records], [_number(r.get("reward_mean")) for r in records], label=name,
                marker="o" if len(records) == 1 else None)  # a line through one point draws nothing
    return _finish(fig, ax, "GRPO step", "mean reward", "Reward per configuration", legend_size=7)


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def lora_vs_full(results):
    data = _measured_alone(results)
    if "lora.use_lora" not in data or "lora.lora_rank" not in data:
        return None
    use_lora = data["lora.use_lora"].astype(bool)
    if not use_lora.any() or use_lora.all():
        return None
    lora = data[use_lora]
    others = _other_settings(lora)
    names = lora.apply(lambda row: f"LoRA r={int(row['lora.lora_rank'])} {_targets_label(row.get('lora.target_modules', ''))}"
                       + (f" ({_setting_label(row, others)})" if others else ""), axis=1)
    # Sorted by the targets as results.csv holds them (JSON text): lists, which a table built in Python may
    # hold, do not hash and cannot be sorted by pandas.
    targets = (lora["lora.target_modules"].map(lambda v: json.dumps(v) if isinstance(v, (list, tuple)) else v)
               if "lora.target_modules" in lora else "")
    order = lora.assign(_name=names, _targets=targets).sort_values(["_targets", "lora.lora_rank"])
    settings = list(dict.fromkeys(order["_name"]))
    # Full fine-tuning points that differ in a setting (a grid's group size crossed with use_lora) get a bar
    # each too, rather than one bar averaging them; LoRA's settings (rank, targets, alpha) do not apply to them.
    full = data[~use_lora]
    full_others = [c for c in _setting_columns(full) if not c.startswith("lora.") and full[c].astype(str).nunique() > 1]
    full_names = full.apply(lambda row: "full fine-tuning" + (f" ({_setting_label(row, full_others)})"
                                                              if full_others else ""), axis=1)
    full_settings = list(dict.fromkeys(full_names))  # in the table's (the sweep's) order
    labels = full_settings + settings
    groups = [full[full_names == name] for name in full_settings] + [lora[names == name] for name in settings]
    metrics = [("peak_memory_gib", f"peak memory, GiB ({_memory_kind(results)})"),
               ("update_tokens_per_s", "update tokens/s"), ("trainable_params", "trainable parameters")]
    fig = Figure(figsize=(4 * len(metrics), 4.5))
    axes = fig.subplots(1, len(metrics))
    for ax, (column, title) in zip(axes, metrics, strict=True):
        values = [g[column].mean() if column in g else float("nan") for g in groups]
        ax.bar(range(len(labels)), values, color=["tab:gray"] * len(full_settings) + ["tab:blue"] * len(settings))
        for x, value in enumerate(values):  # an empty bar would read as 0
            if value != value:
                ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        if column == "trainable_params" and any(v > 0 for v in values):  # log of nothing positive fails
            ax.set_yscale("log")
    fig.suptitle("LoRA vs full fine-tuning")
    fig.tight_layout()
    return fig


def _memory_kind(results) -> str:
    if "memory_kind" in results and results["memory_kind"].notna().any():
        return str(results["memory_kind"].dropna().iloc[0])
    return "measured"


PLOTS = {"memory_vs_rank": memory_vs_rank, "speed_vs_rank": speed_vs_rank, "reward_curves": reward_curves,
         "lora_vs_full": lora_vs_full}


def plots_folder(results_path: str | Path) -> Path:
    """Default home of a sweep's plots: `plots/` in its folder."""
    path = find_input(results_path)  # where load_results found the table
    return (path if path.is_dir() else path.parent) / "plots"


def plot_notes(results) -> list[str]:
    """What the plots leave out of the table, one line each, for the caller to print."""
    notes = []
    if "status" in results:
        failed = results[results["status"] != "ok"]
        for _, row in failed.iterrows():
            notes.append(f"left out: point {row.get('point', '?')} did not finish ({row['status']}: "
                         f"{row.get('reason', '')})")
    finished = _finished(results)
    if "run_dir" in finished:
        for _, row in finished.iterrows():
            if _metrics_path(row) is None:
                notes.append(f"no reward curve for point {row.get('point', '?')}: no metrics.jsonl in {row['run_dir']}")
    packed = len(finished) - len(_measured_alone(results))
    if packed:
        notes.append(f"{packed} packed points (lora-rl sweep --pack) are left out of memory_vs_rank, speed_vs_rank "
                     "and lora_vs_full: each reports its multi-LoRA job's shared peak memory and throughput")
    return notes


def write_plots(results, out_dir: str | Path) -> dict[str, list[Path]]:
    """Every plot the results have data for, as PNG and SVG; returns {name: [files]}. Each file is written
    under a temporary name and renamed; a plot the table no longer has data for is removed from `out_dir`,
    so the folder never mixes this table's plots with an older one's."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file: name a folder for the plots")
    # Every figure first: one that fails (a damaged metrics.jsonl) must leave the folder as it was, not
    # half replaced with this table's plots.
    figures = {name: make(results) for name, make in PLOTS.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {name: [out_dir / f"{name}.{fmt}" for fmt in ("png", "svg")] for name in figures}
    # Every file under its temporary name next, then the renames: a write that fails (a full disk) must
    # neither leave its half-written temporary behind nor some plots replaced and others not.
    staged = []
    try:
        for name, fig in figures.items():
            for path in written[name] if fig is not None else []:
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                staged.append((tmp, path))
                fig.savefig(tmp, format=path.suffix[1:], dpi=100, metadata=_METADATA[path.suffix[1:]])
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)
    for name, fig in figures.items():
        if fig is None:
            for path in written.pop(name):
                path.unlink(missing_ok=True)
    return written


def display_plots(written: dict[str, list[Path]]) -> None:
    """Show written plots in a notebook (the PNGs, so headless papermill keeps them as outputs)."""
    from IPython.display import Image, display

    for files in written.values():
        display(Image(filename=str(files[0])))
