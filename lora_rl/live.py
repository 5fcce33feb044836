"""A live reward/memory plot for notebooks: `train(config, on_step=LivePlot())`.

The figure is rendered to PNG and shown through one display handle that each step updates, so a
notebook run headless by papermill keeps the final plot as an ordinary output (FIELD_NOTES section 8).
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure


class LivePlot:
    """Redraws every `every` steps and at step `total`; `finish()` (or leaving a `with` block) draws what a
    run stopped early left undrawn."""

    def __init__(self, every: int = 1, total: int = 0, title: str = "GRPO"):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"LivePlot(every={every!r}): draw every 1 or more steps, e.g. every=10")
        self.every = every
        self.total = total  # the run's last step, always drawn
        self.title = title
        self.records: list[dict] = []
        self._handle = None
        self._drawn = 0  # records on the figure shown

    def __call__(self, record: dict) -> None:
        self.records.append(record)
        if record["step"] % self.every == 0 or record["step"] == self.total:
            self.show()

    def finish(self) -> None:
        """Draw the last records if the last redraw missed them (a run stopped between redraws)."""
        if self.records and self._drawn < len(self.records):
            self.show()

    # `with LivePlot(...) as live: train(config, on_step=live)` draws the last steps however the run ends
    # (Interrupt Kernel stops it gracefully between redraws; an error ends it too).
    def __enter__(self) -> "LivePlot":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()

    def figure(self) -> Figure:
        fig = Figure(figsize=(9, 3))
        reward, memory = fig.subplots(1, 2)
        steps = [r["step"] for r in self.records]
        marker = "o" if len(steps) == 1 else None  # a line through one point draws nothing
        reward.plot(steps, [r["reward_mean"] for r in self.records], label="reward", marker=marker)
        reward.plot(steps, [r["format_rate"] for r in self.records], label="format rate", alpha=0.6, marker=marker)
        reward.set_xlabel("step")
        reward.set_title(f"{self.title}: reward")
        reward.legend(fontsize=8)
        reward.grid(alpha=0.3)
        kind = self.records[-1]["memory_kind"] if self.records else ""
        memory.plot(steps, [r["peak_memory_gib"] for r in self.records], color="tab:red", marker=marker)
        memory.set_xlabel("step")
        memory.set_title(f"peak memory, GiB ({kind})")
        memory.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.figure().savefig(buffer, format="png", dpi=80, metadata={"Software": None})
        return buffer.getvalue()

    def show(self) -> None:
        from IPython.display import Image, display

        image = Image(data=self.png())
        self._drawn = len(self.records)
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)
