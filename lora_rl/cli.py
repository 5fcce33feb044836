"""`lora-rl` command line: train, validate. Builds the same Config the notebooks and widgets build.

    lora-rl train examples/quickstart.yaml lora.lora_rank=32 run.output_dir=runs/r32
    lora-rl validate examples/gsm8k_grpo_lora.yaml
    lora-rl merge runs/quickstart/adapter runs/quickstart/merged
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from lora_rl.config import ConfigError, load_config
from lora_rl.sweep import load_spec
from lora_rl.trainer import TrainingError
from lora_rl.rollout.base import RolloutError


def validate(config, data: bool = True) -> None:
    """Every check that runs before training starts, including those that need the model's shape;
    data: also that the task's problems load (`train` loads them itself, after its backend checks, and
    `estimate` needs none)."""
    from lora_rl.lora import check_config

    check_config(config, data=data)


def _estimate_table(config, devices: int, seq_len: int | None, gib_per_device: float | None = None) -> str:
    from lora_rl.estimate import estimate_for_config

    # The same run with every weight training beside it. The estimate is about the trainer only, so the
    # config is not rebuilt for it (its rollout engine may refuse full fine-tuning; that does not matter here).
    label = ("LoRA r=%d %s" % (config.lora.lora_rank, ",".join(config.lora.target_modules)) if config.lora.use_lora
             else "this config (full fine-tuning)")
    rows = [(label, estimate_for_config(config, seq_len=seq_len, devices=devices))]
    if config.lora.use_lora:  # a full fine-tuning config's own row is already that run
        # Megatron trains adapters only: full fine-tuning is the FSDP2 run
        rows.append(("full fine-tuning" + (" (fsdp2)" if config.backend.name != "fsdp2" else ""),
                     estimate_for_config(config, seq_len=seq_len, devices=devices, use_lora=False)))
    fit = f"{'fits ' + format(gib_per_device, 'g') + ' GiB':>22}" if gib_per_device else ""
    lines = [f"predicted peak memory per device: {config.model.path}, {config.model.dtype}, {devices} device(s), "
             f"backend {config.backend.name}",
             f"{'':<32}{'weights':>9}{'trainable':>11}{'activations':>13}{'logits':>9}{'total GiB':>11}{fit}"]
    for name, e in rows:
        verdict = ""
        if gib_per_device:
            over = e.total_gib - gib_per_device
            verdict = f"{'no: over by ' + format(over, '.1f') if over > 0 else 'yes: ' + format(-over, '.1f') + ' spare':>22}"
        lines.append(f"{name:<32}{e.weights_gib:>9.2f}{e.trainable_gib:>11.2f}{e.activations_gib:>13.2f}"
                     f"{e.logits_gib:>9.2f}{e.total_gib:>11.2f}{verdict}")
    return "\n".join(lines)


def _positive(kind):
    """An argparse type: a finite number above 0, or an error that shows the value given."""
    import math

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return value

    return parse


# Under `--nproc` each rank leaves its error here and the launching process prints each distinct one once
# (every rank raises the same ConfigError; torchrun's own report of the failure is a page of traceback).
_ERRORS_ENV = "LORA_RL_ERROR_DIR"


def _fail(err: BaseException, code: int) -> int:
    folder = os.environ.get(_ERRORS_ENV)
    if folder and "RANK" in os.environ and Path(folder).is_dir():
        Path(folder, f"rank{os.environ['RANK']}.txt").write_text(str(err))
    else:
        print(f"lora-rl: error: {err}", file=sys.stderr)
    return code


RANKS_STOP_WAIT_S = 24 * 3600  # how long `train --nproc` waits, after Ctrl-C, for the ranks' last step


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command on `nproc` ranks on this machine: torchrun --standalone, started in this process
    so that a failed rank ends in its own error and exit code (2 for a config error), not a launcher traceback."""
    import logging
    import tempfile
    import uuid

    import torch
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    rest = [a for a in argv if not a.startswith("--nproc")]
    if "--nproc" in argv:  # "--nproc N" form: drop the value too
        i = argv.index("--nproc")
        rest = argv[:i] + argv[i + 2:]
    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "lora_rl.cli", *rest])
    args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())  # --standalone
    args.master_port = args.master_port or 29500
    # The agent's warnings (OMP_NUM_THREADS set to 1 per rank, "sending closing signal") and its error log
    # repeat what the ranks and this function say.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    launch_config, command, command_args = torchrun.config_from_args(args)
    # Ctrl-C reaches the ranks through the agent (they run in sessions of their own), and they stop after the
    # step with a checkpoint; the agent SIGKILLed them 30 s later, so a longer step lost its checkpoint. It
    # waits for them now; a second Ctrl-C still stops them at once (the agent then sends SIGTERM).
    # torch before 2.12 has no such setting: its agent's 30 s are fixed (said at the interrupt).
    waits = "shutdown_timeout" in getattr(type(launch_config), "__dataclass_fields__", {})
    if waits:
        launch_config.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", RANKS_STOP_WAIT_S))
    with tempfile.TemporaryDirectory(prefix="lora-rl-errors-") as errors:
        os.environ[_ERRORS_ENV] = errors
        try:
            elastic_launch(launch_config, command)(*command_args)
            return 0
        except SignalException as err:  # Ctrl-C, SIGTERM: the agent has passed it on to the ranks and stopped them
            print("lora-rl: interrupted" if err.sigval == signal.SIGINT else f"lora-rl: stopped by {err.sigval.name}",
                  file=sys.stderr)
            if not waits and err.sigval == signal.SIGINT:
                print(f"lora-rl: torch {torch.__version__} gives the ranks 30 s to finish their step and save a "
                      "checkpoint, then kills them (torch 2.12 and later wait for them): if no checkpoint of this "
                      "step was written, --resume starts from the one before", file=sys.stderr)
            return 128 + int(err.sigval)
        except ChildFailedError as err:
            rank, failure = err.get_first_failure()
            messages = dict.fromkeys(f.read_text() for f in sorted(Path(errors).glob("rank*.txt")))
            for message in messages:
                print(f"lora-rl: error: {message}", file=sys.stderr)
            if failure.exitcode in (1, 2, 130) and (messages or failure.exitcode == 130):
                return failure.exitcode
            how = (f"exit code {failure.exitcode}" if failure.exitcode > 0 else
                   f"signal {-failure.exitcode}" if failure.exitcode < 0 else "an error")
            print(f"lora-rl: error: rank {rank} of {nproc} stopped with {how} (its output is above)", file=sys.stderr)
            return failure.exitcode if failure.exitcode > 0 else 1
        finally:
            os.environ.pop(_ERRORS_ENV, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-rl", description="RL fine-tuning of LLMs with LoRA adapters")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "run GRPO with LoRA"), ("validate", "check a config and exit"),
                            ("estimate", "predict peak memory per device, LoRA vs full fine-tuning")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML recipe, e.g. examples/quickstart.yaml")
        p.add_argument("overrides", nargs="*", help="section.key=value, e.g. lora.lora_rank=32")
        if name == "estimate":
            p.add_argument("--devices", type=_positive(int), default=1, help="GPUs the FSDP2 run shards over")
            p.add_argument("--seq-len", type=_positive(int), default=None,
                           help="tokens per sequence (default: twice rollout.max_new_tokens)")
            p.add_argument("--gib-per-device", type=_positive(float), default=None,
                           help="device memory in GiB: say whether each variant fits, and by how much not")
        if name in ("train", "validate"):
            p.add_argument("--nproc", type=_positive(int), default=1,
                           help="processes (FSDP2 ranks; one per GPU on a GPU machine); starts torchrun for you")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue the run in run.output_dir")
    p = sub.add_parser("merge", help="fold a PEFT adapter into its base model and save a plain HF model folder")
    p.add_argument("adapter", help="adapter folder (its adapter_config.json names the base model folder)")
    p.add_argument("out", help="folder for the merged model (must not exist)")
    p = sub.add_parser("sweep", help="run a grid/list of configs through notebooks/03_run.ipynb (papermill)")
    p.add_argument("spec", help="sweep YAML, e.g. examples/sweep_rank.yaml")
    p.add_argument("--retry-failed", action="store_true", help="re-run points that failed or timed out before")
    p.add_argument("--pack", action="store_true",
                   help="train points that differ only in LoRA settings (rank, alpha, target modules, lr, seed) "
                        "together: one multi-LoRA job over one copy of the base model")
    p = sub.add_parser("plot", help="comparison plots (PNG and SVG) of a sweep's results")
    p.add_argument("results", help="sweep folder, or its results.csv / results.parquet")
    p.add_argument("--out", default=None, help="folder for the plots (default: <sweep folder>/plots)")
    # Overrides may come before or after options (`train C --nproc 2 a.b=1`): collect the strays.
    args, extra = parser.parse_known_args(argv)
    if any(a.startswith("-") or "=" not in a for a in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra and not hasattr(args, "overrides"):  # sweep, plot and merge would silently drop them
        fix = "put them in the sweep spec's overrides: list or its grid" if args.command == "sweep" else "remove them"
        parser.error(f"{args.command} takes no section.key=value overrides ({' '.join(extra)}): {fix}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        if args.command == "merge":
            from lora_rl.lora import merge_to_folder

            print(f"merged model written to {merge_to_folder(args.adapter, args.out)}")
            return 0
        if args.command == "sweep":
            from lora_rl.sweep import run_sweep

            table = run_sweep(args.spec, retry_failed=args.retry_failed, pack=args.pack)
            failed = int((table["status"] != "ok").sum()) if len(table) else 0
            print(f"{len(table) - failed} points ok, {failed} failed; results in "
                  f"{Path(load_spec(args.spec).output_dir) / 'results.csv'} (and .parquet)")
            return 1 if failed else 0
        if args.command == "plot":
            from lora_rl.plots import plot_notes, plots_folder, write_plots
            from lora_rl.sweep import load_results

            results = load_results(args.results)
            written = write_plots(results, args.out or plots_folder(args.results))
            for note in plot_notes(results):
                print(f"lora-rl plot: {note}", file=sys.stderr)
            if not written:
                raise ConfigError(f"nothing to plot in {args.results!r}: {len(results)} points, none finished with "
                                  "results to draw (see the notes above and each point's status.json)")
            for files in written.values():
                print(" ".join(str(f) for f in files))
            return 0
        config = load_config(args.config, args.overrides)
        launching = args.command == "train" and args.nproc > 1 and "RANK" not in os.environ
        validate(config, data=args.command == "validate" or launching)
        if args.command in ("train", "validate"):
            from lora_rl.trainer import check_run_dir, check_world

            check_world(config, args.nproc)
            if launching:  # once here, before the ranks start, rather than once per rank
                check_run_dir(config, args.resume, args.nproc)
        if args.command == "validate":
            print(f"{args.config}: ok")
            return 0
        if args.command == "estimate":
            print(_estimate_table(config, args.devices, args.seq_len, args.gib_per_device))
            return 0
        if launching:
            return _torchrun(args.nproc, argv if argv is not None else sys.argv[1:])
        from lora_rl import distributed
        from lora_rl.trainer import train

        try:
            summary = train(config, resume=args.resume)
        except BaseException:
            distributed.shutdown(wait=False)
            raise
        distributed.shutdown()
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    except ConfigError as err:
        return _fail(err, 2)
    except (TrainingError, RolloutError) as err:
        return _fail(err, 1)
    except KeyboardInterrupt:
        print("lora-rl: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    if summary["stopped_early"]:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # a rank of --nproc N: its own argv lost the option
        again = ["lora-rl", "train", args.config, *args.overrides, *(["--nproc", str(world)] if world > 1 else []),
                 "--resume"]  # quoted: an override such as 'lora.target_modules=[q_proj, v_proj]' holds spaces
        print(f"\nstopped early after step {summary['steps_done']} with a checkpoint: continue with "
              f"{shlex.join(again)}", file=sys.stderr)
        return 130
    if summary["accuracy_before"] is None:  # eval.size=0
        return 0
    print(f"\nheld-out accuracy (greedy decoding, {summary['eval_problems']} problems): "
          f"{100 * summary['accuracy_before']:.1f}% -> {100 * summary['accuracy_after']:.1f}% "
          f"({summary['gain_points']:+.1f} points) in {summary['wall_seconds']:.0f} s\n"
          f"  answers in the required format: {100 * summary['format_rate_before']:.1f}% -> "
          f"{100 * summary['format_rate_after']:.1f}%; right number in any format: "
          f"{100 * summary['lenient_accuracy_before']:.1f}% -> {100 * summary['lenient_accuracy_after']:.1f}%\n"
          f"  run folder: {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
