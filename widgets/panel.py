"""The LoRA control panel: pick rank, alpha, target modules, backend, engine and run knobs; see what they
cost before running; run and stop GRPO in the kernel with a live plot.

Every control edits one list of `section.key=value` overrides on top of a recipe; `config()` turns them
into the same `Config` the CLI builds (so a panel choice the CLI would refuse is refused here, with the
same message), and Run calls the same `lora_rl.trainer.train`. The logic is plain Python: tests set
`.value` and call `.click()`.
"""

from __future__ import annotations

import html
import threading
import time
import warnings
from pathlib import Path

import ipywidgets as w

from lora_rl.backends import BUILT as BUILT_BACKENDS
from lora_rl.config import ConfigError, load_config, override
from lora_rl.estimate import estimate_for_config
from lora_rl.lora import check_config, linear_module_names
from lora_rl.models import BUILTINS, meta_model
from lora_rl.rollout import BUILT as BUILT_ENGINES
from lora_rl.support import BACKENDS, ENGINES, pair_status

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _fmt_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _fmt_accuracy(accuracy: float | None) -> str:
    """None (summary.json's NaN: eval.size=0 skips evaluation) is no score, not 0%."""
    return "n/a (eval.size=0)" if accuracy is None else f"{100 * accuracy:.1f}%"


def _fmt_gib(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


class LoRAPanel:
    """`LoRAPanel(recipe)` in a notebook cell shows the panel (it is the cell's last expression)."""

    def __init__(self, recipe: str = "examples/quickstart.yaml", *, output_root: str = "runs", seq_len: int = 0):
        self.recipe = recipe
        base = load_config(recipe)
        self.output_root = output_root
        self.seq_len = seq_len  # tokens per sequence for the estimate; 0: prompt ~ completion budget
        style = {"description_width": "130px"}
        layout = w.Layout(width="420px")
        models = list(dict.fromkeys([base.model.path, *BUILTINS]))
        self.model = w.Dropdown(options=models, value=base.model.path, description="model", style=style,
                                layout=layout)
        self.task = w.Dropdown(options=["arithmetic", "gsm8k"], value=base.task.name, description="task",
                               style=style, layout=layout)
        # The recipe's own rank is one of the choices, so opening the panel changes nothing by itself.
        self.rank = w.SelectionSlider(options=sorted({*RANKS, base.lora.lora_rank}), value=base.lora.lora_rank,
                                      description="lora_rank", style=style, layout=layout, continuous_update=False)
        self.alpha = w.FloatText(value=base.lora.lora_alpha, description="lora_alpha", style=style, layout=layout)
        self.targets = w.SelectMultiple(options=["all-linear"], value=["all-linear"], rows=5,
                                        description="target_modules", style=style, layout=layout)
        self.use_lora = w.Checkbox(value=base.lora.use_lora, description="use_lora (off: full fine-tuning)")
        self.backend = w.Dropdown(options=list(BACKENDS), value=base.backend.name, description="backend",
                                  style=style, layout=layout)
        self.engine = w.Dropdown(options=list(ENGINES), value=base.rollout.engine, description="rollout engine",
                                 style=style, layout=layout)
        self.devices = w.BoundedIntText(value=1, min=1, max=64, description="GPUs (estimate)", style=style,
                                        layout=layout)
        # The bounds take in the recipe's own values: a bounded box clamps a value above its max, which silently
        # trained 100,000 steps or groups of 256 where the recipe (and the CLI) said more.
        self.steps = w.BoundedIntText(value=base.run.steps, min=1, max=max(100_000, base.run.steps),
                                      description="steps", style=style, layout=layout)
        self.group_size = w.BoundedIntText(value=base.rollout.group_size, min=2, max=max(256, base.rollout.group_size),
                                           description="group size", style=style, layout=layout)
        self.lr = w.FloatText(value=base.train.lr, description="lr", style=style, layout=layout)
        self.info = w.HTML()
        self.status = w.HTML()
        self.run_button = w.Button(description="Run", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="warning", icon="stop", disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=base.run.steps, description="step 0")
        self.plot = w.Output()
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self.summary: dict | None = None
        self.error: str | None = None
        self._choose_model()
        for control in (self.rank, self.alpha, self.targets, self.use_lora, self.backend, self.engine, self.devices,
                        self.steps, self.group_size, self.lr, self.task):
            control.observe(lambda _: self.refresh(), names="value")
        self.model.observe(lambda _: (self._choose_model(), self.refresh()), names="value")
        self.refresh()
        controls = w.VBox([self.model, self.task, self.use_lora, self.rank, self.alpha, self.targets, self.backend,
                           self.engine, self.steps, self.group_size, self.lr, self.devices])
        self.widget = w.VBox([w.HBox([controls, self.info]), self.status,
                              w.HBox([self.run_button, self.stop_button, self.progress]), self.plot])

    # --- what the controls mean ------------------------------------------------------------------------

    def _choose_model(self) -> None:
        """Take in the model chosen. One this environment cannot load (a broken config.json, a package it
        needs missing) must not raise out of the dropdown's observer, which left the panel showing the
        previous model with Run enabled: its message (field, value, fix) becomes why Run is off."""
        self._model_error = ""  # before the targets change: their observer refreshes the panel
        try:
            self._refresh_targets()
        except ConfigError as err:
            self._model_error = str(err)
            self._total_params = None
            self.targets.options, self.targets.value = ["all-linear"], ["all-linear"]  # not the last model's names

    def _refresh_targets(self) -> None:
        """The chosen model's linear layers as choices. The recipe's own targets stay chosen while its
        model is (opening the panel changes nothing by itself); another model starts from all-linear."""
        meta = meta_model(self.model.value)
        names = linear_module_names(meta)
        self._total_params = sum(p.numel() for p in meta.parameters())
        base = load_config(self.recipe)
        keep = base.lora.target_modules if self.model.value == base.model.path else ()
        self.targets.options = list(dict.fromkeys(["all-linear", *names, *keep]))
        self.targets.value = list(keep) if keep else ["all-linear"]

    def overrides(self) -> list[str]:
        # override(): a model folder with " #" in its name must reach the config as it is, not cut at a comment.
        return [override("model.path", self.model.value), override("task.name", self.task.value),
                override("lora.use_lora", self.use_lora.value), override("lora.lora_rank", self.rank.value),
                override("lora.lora_alpha", self.alpha.value), override("lora.target_modules", list(self.targets.value)),
                override("backend.name", self.backend.value), override("rollout.engine", self.engine.value),
                override("run.steps", self.steps.value), override("rollout.group_size", self.group_size.value),
                override("train.lr", self.lr.value)]

    def config(self, output_dir: str = "runs/panel"):
        """The Config these choices make; raises ConfigError exactly as `lora-rl train` would."""
        return load_config(self.recipe, [*self.overrides(), override("run.output_dir", output_dir)])

    def why_not_runnable(self) -> str:
        """Empty when Run may start; else the reason, as the library words it."""
        if self._model_error:
            return self._model_error
        cell = pair_status(self.backend.value, self.engine.value)
        if not cell.ok:
            return cell.why
        if self.backend.value not in BUILT_BACKENDS:
            return f"backend {self.backend.value} is in the support matrix but not built in this version"
        if self.engine.value not in BUILT_ENGINES:
            return f"rollout engine {self.engine.value} is in the support matrix but not built in this version"
        try:
            # What `lora-rl validate` checks, but the data's presence: the panel re-checks on every change.
            check_config(self.config(), data=False)
        except ConfigError as err:
            return str(err)
        return ""

    def estimate(self):
        """(this choice, full fine-tuning), from the Config Run would train and counted by the function
        `lora-rl estimate` calls, so the panel and the CLI give the same numbers for the same settings;
        full fine-tuning runs on FSDP2 whatever the backend (Megatron trains adapters only). Raises
        ConfigError for a config Run would refuse or a layout the estimator does not model (GPT-2)."""
        config = self.config()
        seq_len = self.seq_len or None  # None: the CLI's default (prompt ~ completion budget)
        return (estimate_for_config(config, seq_len=seq_len, devices=self.devices.value),
                estimate_for_config(config, seq_len=seq_len, devices=self.devices.value, use_lora=False))

    def refresh(self) -> None:
        with warnings.catch_warnings(record=True) as caught:  # shown in the panel: a callback's stderr is lost
            warnings.simplefilter("always")
            why = self.why_not_runnable()
        notes = "".join(f"<br><span style='color:#a60' class='warning'>{html.escape(str(c.message))}</span>"
                        for c in caught if str(c.message).startswith("lora-rl: "))
        if self._model_error:  # nothing to count or estimate without the model: only why Run is off
            self.info.value = (f"<b>{html.escape(self.model.value)}</b>: "
                               f"<span style='color:#b00' class='why'>cannot run: {html.escape(why)}</span>")
        else:
            self.info.value = self._describe(why) + notes
        self.run_button.disabled = bool(why) or self._running
        self.run_button.tooltip = why or "train with these settings"

    def _describe(self, why: str) -> str:
        """The info area for a model that loads: its size, what trains, the memory estimate, and whether
        Run may start (why: why_not_runnable's answer)."""
        try:
            chosen, full = self.estimate()
        except ConfigError as err:  # a layout or choice the estimator does not model: Run may still work
            chosen = full = None
            estimate = f"<span class='why'>no memory estimate: {html.escape(str(err))}</span>"
        if chosen is not None:
            estimate = (
                f"predicted peak memory per GPU ({self.devices.value} GPU): "
                f"<b><span class='estimate'>{_fmt_gib(chosen.total_gib)}</span></b>"
                f" {'(LoRA)' if self.use_lora.value else '(full fine-tuning)'}; full fine-tuning {_fmt_gib(full.total_gib)}"
                f"<br><small>weights {_fmt_gib(chosen.weights_gib)} + trainable state {_fmt_gib(chosen.trainable_gib)} + "
                f"activations {_fmt_gib(chosen.activations_gib)} + logits {_fmt_gib(chosen.logits_gib)}</small>")
        total = self._total_params
        if self.use_lora.value:
            # The adapter the backend really trains (Megatron widens q_proj to q, k and v): the estimate's
            # count, so n/a where there is no estimate (its reason is shown below).
            adapter = chosen.trainable_params if chosen is not None else None
            trainable = (f"trainable (LoRA r={self.rank.value}, alpha/r={self.alpha.value / self.rank.value:.2f}): "
                         + (f"<b><span class='trainable'>{_fmt_count(adapter)}</span></b> "
                            f"({100 * adapter / total:.2f}%)<br>adapter size: "
                            f"<b>{adapter * _BYTES.get(self.config().model.dtype, 4) / 1e6:.2f} MB</b><br>"
                            if adapter is not None else "n/a<br>"))
        else:  # full fine-tuning trains every weight and saves no adapter
            trainable = (f"trainable (full fine-tuning): <b><span class='trainable'>{_fmt_count(total)}</span></b> "
                         "(100%)<br>")
        return (f"<b>{self.model.value}</b>: {_fmt_count(total)} parameters<br>" + trainable + f"{estimate}<br>"
                f"{self.backend.value} + {self.engine.value}: "
                + ("<span style='color:green'>supported</span>" if not why else
                   f"<span style='color:#b00' class='why'>cannot run: {html.escape(why)}</span>"))

    # --- running ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Train in a background thread (the kernel stays responsive); Stop ends after the current step
        with a checkpoint."""
        if self._running:  # the status already says where the run in progress writes
            return
        why = self.why_not_runnable()
        if why:  # say so: a stale button or a direct call must not silently do nothing
            self.status.value = f"<span style='color:#b00' class='why'>not started: {html.escape(why)}</span>"
            return
        from lora_rl.live import LivePlot

        stamp = time.strftime("%Y%m%d-%H%M%S")
        # Absolute, so the status names the folder unambiguously (a kernel runs in notebooks/, a shell elsewhere).
        output_dir = next(str(d) for n in range(1000)
                          if not (d := Path(self.output_root).resolve() / f"panel-{stamp}{f'-{n}' if n else ''}").exists())
        config = load_config(self.recipe, [*self.overrides(), override("run.output_dir", output_dir), "run.progress=false"])
        self._stop.clear()
        self.summary, self.error = None, None
        self.progress.max, self.progress.value = config.run.steps, 0
        live = LivePlot(every=max(1, config.run.steps // 50), total=config.run.steps, title=f"r={self.rank.value}")

        def on_step(record):
            self.progress.value = record["step"]
            self.progress.description = f"step {record['step']}"
            with self.plot:
                live(record)

        def work():
            from lora_rl.trainer import train

            try:
                self.summary = train(config, on_step=on_step, should_stop=self._stop.is_set)
                done = "stopped" if self.summary["stopped_early"] else "finished"
                self.status.value = (f"{done} after step {self.summary['steps_done']}: held-out accuracy "
                                     f"{_fmt_accuracy(self.summary['accuracy_before'])} -> "
                                     f"{_fmt_accuracy(self.summary['accuracy_after'])}; run folder "
                                     f"{html.escape(output_dir)}")
            except Exception as err:  # shown in the panel; the thread must not die silently
                self.error = f"{type(err).__name__}: {err}"
                self.status.value = f"<span style='color:#b00'>failed: {html.escape(self.error)}</span>"
            finally:
                with self.plot:
                    live.finish()  # Stop between redraws: show the last steps too
                self._running = False
                self.stop_button.disabled = True
                self.refresh()

        self.status.value = f"running in {output_dir} ..."
        self.stop_button.disabled = False
        self._running = True
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()
        self.refresh()

    def stop(self) -> None:
        self._stop.set()
        self.status.value = "stopping after the current step (a checkpoint is kept) ..."

    def wait(self, timeout: float | None = None) -> dict | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.summary

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
