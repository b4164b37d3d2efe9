"""maskmint command line: plan, run, inspect, preview, export, evaluate, distill."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin

USER_ERROR = 2
RUN_INCOMPLETE = 1
INTERRUPTED = 130
# An OSError with one of these is about a path the user gave (missing, not allowed, a file where
# a folder must be, ...); any other (ENOSPC, EIO, ESTALE, ...) is the machine failing under us.
USER_PATH_ERRORS = {
    errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY,
    errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL,
}
EXECUTION_FLAGS = ("executor", "address", "workers")  # `run` flags that override config.execution


def _user_errors() -> tuple[type[Exception], ...]:
    from maskmint.pipeline.distill import DistillError
    from maskmint.pipeline.evaluate import EvaluateError
    from maskmint.pipeline.executors import RunCannotStart
    from maskmint.pipeline.rundir import RunDirError
    from maskmint.schemas.config import ConfigError
    from maskmint.stages.loading import ModelLoadError
    from maskmint.stages.tokens import PromptError

    return ConfigError, RunDirError, ModelLoadError, PromptError, RunCannotStart, EvaluateError, DistillError


def _taken_over() -> type[Exception]:
    from maskmint.pipeline.lock import Fenced

    return Fenced


def command_run(args: argparse.Namespace) -> int:
    from maskmint.pipeline.run import run
    from maskmint.schemas.config import load_config

    config = load_config(args.config)
    overrides = {k: getattr(args, k) for k in EXECUTION_FLAGS if getattr(args, k) is not None}
    if overrides:
        config = config.with_execution(**overrides)
    summary = run(config, args.out, show_progress=not args.quiet)
    print(
        f"{args.out}: {summary.written} samples written, {summary.dropped} dropped, "
        f"{summary.complete_shards}/{summary.planned_shards} shards whole"
    )
    if summary.failed_shards:
        for shard, error in sorted(summary.failed_shards.items()):
            print(f"  shard {shard:06d} failed: {error}", file=sys.stderr)
        print(f"re-run to retry them: {retry_command(args)}", file=sys.stderr)
        return 1
    return 0


def retry_command(args: argparse.Namespace) -> str:
    """The same command, with the execution flags it was given."""
    words = ["maskmint", "run", "--config", str(args.config), "--out", str(args.out)]
    for flag in EXECUTION_FLAGS:
        if getattr(args, flag) is not None:
            words += [f"--{flag}", str(getattr(args, flag))]
    return shlex.join(words)


def command_plan(args: argparse.Namespace) -> int:
    from maskmint.pipeline.cost import drop_rates, estimate
    from maskmint.pipeline.plan import Plan, plan_report
    from maskmint.schemas.config import load_config
    from maskmint.stages.models import check_before_loading, load_text_layout

    config = load_config(args.config)
    check_before_loading(config)
    plan = Plan(config, load_text_layout(config.model))
    report = plan_report(config, plan, plan.preflight(), args.examples)
    drops = drop_rates(args.drops_from) if args.drops_from else None
    report["cost"] = estimate(config, args.peak_tflops, args.utilisation, drops)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.config}: {report['samples']} samples in {report['shards']} shards of {report['shard_size']}")
    print("  classes: " + ", ".join(f"{name} {count}" for name, count in report["classes"].items()))
    print(f"  prompt tokens: at most {report['max_prompt_tokens']} of {report['token_limit']} "
          f"(first {report['prompts_checked']} prompts)")
    for prompt in report["truncated_prompts"][:5]:
        print(f"  warning: truncated past {report['token_limit']} tokens: {prompt}")
    for example in report["examples"]:
        print(f"  {example['key']}: {example['prompt']!r} -> background {example['background_prompt']!r}")
    cost = report["cost"]
    parts = ", ".join(f"{k} {v:.4g}" for k, v in cost["by_part_tflop"].items())
    print(f"  compute: {cost['tflop_per_triple']:.4g} TFLOP per triple at {cost['size'][0]}x{cost['size'][1]} ({parts}), "
          f"{cost['run_pflop']:.4g} PFLOP for the run")
    weights = cost["weight_gb"]
    print(f"  weights: {weights['none']['total']:.4g} GB as loaded, {weights['int8']['total']:.4g} GB with "
          f"model.quantize: int8 ({', '.join(f'{k} {v:.4g}' for k, v in weights['int8'].items() if k != 'total')})")
    held = cost["device_weight_gb"]
    print("  weights on the device at once, model.offload none / model / sequential: " + ", ".join(
        f"{' / '.join(format(held[q][mode], '.4g') for mode in ('none', 'model', 'sequential'))} GB{label}"
        for q, label in (("none", ""), ("int8", " with int8"))))
    if drops is not None:
        rates = cost["drop_rates"]
        per_kept = cost["tflop_per_kept_triple"]
        print(f"  drops as in {args.drops_from} ({rates['from_samples']:g} samples): {rates['before_removal']:.1%} before "
              f"removal{'' if cost['early_drops'] else ' (early_drops off: removal still runs)'}, "
              f"{rates['after_removal']:.1%} after; about {cost['expected_kept']:.4g} kept, "
              + (f"{per_kept:.4g} TFLOP per kept triple" if per_kept is not None else "none kept"))
    if "device_hours" in cost:
        print(f"  at {cost['peak_tflops']:g} TFLOP/s peak and {cost['utilisation']:.0%} utilisation (an assumption): "
              f"{cost['device_hours']:.4g} device-hours ({cost['device_seconds']:.4g} s)")
    else:
        print("  give --peak-tflops (the device's dense peak) for device-hours")
    return 0


def command_inspect(args: argparse.Namespace) -> int:
    from maskmint.pipeline.lock import RunLock
    from maskmint.pipeline.rundir import RunDir

    rundir = RunDir(args.dir)
    manifest = rundir.manifest()
    summary = rundir.summarise(verify=args.verify)
    writer = RunLock(rundir.root).live_holder()
    report = {
        "dir": str(args.dir),
        "config_hash": manifest.config_hash,
        "classes": manifest.classes,
        "planned": summary.planned_samples,
        "written": summary.written,
        "dropped": summary.dropped,
        "dropped_by_reason": summary.dropped_by_reason,
        "shards_complete": summary.complete_shards,
        "shards_pending": summary.pending_shards,
        "shards_damaged": summary.damaged_shards,
        "verified": args.verify,
        "whole": summary.whole,
        "being_written_by": writer.describe() if writer else None,
        "top_up_rounds": summary.top_up_rounds,
        "attempts_per_class": summary.attempts_per_class,
        "kept_per_class": summary.kept_per_class,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    state = "whole" if summary.whole else f"partial, {len(summary.pending_shards)} shard(s) pending"
    print(f"{args.dir}: {state}" + (f"; being written by {writer.describe()}" if writer else ""))
    print(f"  planned {summary.planned_samples} samples in {summary.planned_shards} shards")
    print(f"  written {summary.written}, dropped {summary.dropped}")
    for reason, count in summary.dropped_by_reason.items():
        print(f"    {reason}: {count}")
    print(f"  classes: {', '.join(f'{k}={v}' for k, v in manifest.classes.items())}")
    print("  kept / attempts per class: " + ", ".join(
        f"{name} {summary.kept_per_class[name]}/{n}" for name, n in summary.attempts_per_class.items())
        + (f" ({summary.top_up_rounds} top-up round(s))" if summary.top_up_rounds else ""))
    for shard, reason in sorted(summary.damaged_shards.items()):
        print(f"  shard {shard:06d} damaged: {reason} (the next run redoes it)")
    if args.verify:
        print(f"  verified: every whole shard's tar read through, digests {'match' if not summary.damaged_shards else 'checked'}")
    return 0


def command_preview(args: argparse.Namespace) -> int:
    from maskmint.pipeline.preview import rank, score_names, write_preview
    from maskmint.pipeline.rundir import RunDir, RunDirError

    columns = "(image | heat map | weak mask | background | mask overlay)"
    if args.by is None:
        if args.worst or args.per_class or args.highest:
            raise RunDirError("--worst, --per-class and --highest rank samples: give the score with --by")
        out = write_preview(args.dir, args.out, count=args.samples, seed=args.seed)
        print(f"{out}: {args.samples} random samples {columns}")
        return 0
    stats = RunDir(args.dir).shard_stats()
    names = score_names(stats)
    if args.by not in names:
        raise RunDirError(f"--by: '{args.by}' is not a score of this run (its scores: {', '.join(names) or 'none yet'})")
    count = args.worst or args.samples
    ranked = rank(stats, args.by, count, highest=args.highest, per_class=args.per_class)
    out = write_preview(args.dir, args.out, ranked=ranked)
    order = "highest" if args.highest else "lowest"
    print(f"{out}: the {count} {order} on {args.by}{' per class' if args.per_class else ''} {columns}")
    for item in ranked:
        label = f"class {item.class_id}  " if item.class_id is not None else ""
        print(f"  {label}{item.key}  {args.by}={item.score:.5g}")
    return 0


def command_export(args: argparse.Namespace) -> int:
    from maskmint.pipeline.export import export

    count = export(args.dir, args.out, args.format)
    print(f"{args.out}: {count} samples exported as {args.format}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    from maskmint.pipeline.evaluate import describe, evaluate

    report = evaluate(args.dir, args.truth, band=args.band)
    print(json.dumps(report, indent=2) if args.json else "\n".join(describe(report)))
    return 0


def distill_flag_error(error, options) -> str:
    """The options' problems, each naming the flag the user typed (`--rect-min-side`)."""
    from maskmint.schemas.base import format_error

    text = format_error(error).removeprefix("config: ")
    for name in sorted(options.model_fields, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){name}\b", "--" + name.replace("_", "-"), text)
    return f"distill {text}"


def command_distill(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from maskmint.pipeline.distill import distill
    from maskmint.schemas.config import ConfigError
    from maskmint.schemas.distill import DistillConfig

    given = {name: getattr(args, name) for name in DistillConfig.model_fields if getattr(args, name) is not None}
    try:
        options = DistillConfig.model_validate(given)
    except ValidationError as error:
        raise ConfigError(distill_flag_error(error, DistillConfig)) from None
    report = distill(args.dir, args.out, options, progress=not args.quiet, device=args.device)
    print(f"{args.out}: adapter after {report['steps_done']} steps on {report['samples']} samples "
          f"({report['train_seconds']:.0f} s, final loss {report['final_loss']:.4f}); use it with removal.adapter")
    return 0


def distill_flags(command: argparse.ArgumentParser) -> None:
    """One flag per DistillConfig option, its help and default from the schema."""
    from maskmint.schemas.distill import DistillConfig

    for name, field in DistillConfig.model_fields.items():
        flag, default = "--" + name.replace("_", "-"), field.default
        shown = "none" if default is None else ("on" if default is True else "off" if default is False else f"{default:g}" if isinstance(default, (int, float)) else default)
        help_text = f"{field.description or name} (default {shown})"
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        if field.annotation in (bool, "bool"):
            command.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif choices:
            command.add_argument(flag, dest=name, choices=choices, default=None, help=help_text)
        else:
            kind = int if field.annotation in (int, "int") else float
            command.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def whole_number(minimum: int):
    """argparse type: an integer >= minimum, refused in argparse's own one-line way."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def user_error(message: str) -> int:
    """One line on stderr, whatever the message holds (a key may contain a line break)."""
    print("error: " + " ".join(message.splitlines()), file=sys.stderr)
    return USER_ERROR


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """argparse's usage and error lines, the error kept on one line whatever was typed."""
        self.print_usage(sys.stderr)
        self.exit(USER_ERROR, f"{self.prog}: error: {' '.join(message.splitlines())}\n")


def build_parser() -> argparse.ArgumentParser:
    from maskmint.schemas.config import EvaluateBand, ExecutorName, ExportFormat  # the one list of each (pydantic only)

    parser = Parser(prog="maskmint", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="generate (or resume) a dataset")
    run.add_argument("--config", required=True, type=Path, help="run config YAML")
    run.add_argument("--out", required=True, type=Path, help="run directory; re-running resumes it")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--executor", choices=get_args(ExecutorName), help="override execution.executor")
    run.add_argument("--address", help="join this Ray cluster ('auto' finds a local `ray start` head)")
    run.add_argument("--workers", type=whole_number(1), help="override execution.workers")
    run.set_defaults(handler=command_run)
    plan = commands.add_parser("plan", help="check a config and show what it will make, without loading weights")
    plan.add_argument("--config", required=True, type=Path, help="run config YAML")
    plan.add_argument("--examples", type=whole_number(1), default=5, help="example prompts to show (default 5)")
    plan.add_argument("--peak-tflops", type=positive_float, help="device's dense peak TFLOP/s (H100 bf16: 989)")
    plan.add_argument("--utilisation", type=positive_float, default=0.35,
                      help="share of the peak a run achieves, assumed (default 0.35)")
    plan.add_argument("--drops-from", type=Path, metavar="RUN",
                      help="a finished or partial run of this kind: its drop rates give the cost per kept triple")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(handler=command_plan)
    inspect = commands.add_parser("inspect", help="summarise a run directory")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--verify", action="store_true", help="read every tar through and check its digest")
    inspect.set_defaults(handler=command_inspect)
    preview = commands.add_parser("preview", help="contact sheet of random samples of a run, or its worst by a score")
    preview.add_argument("dir", type=Path)
    preview.add_argument("--out", required=True, type=Path, help="PNG (or JPG) to write")
    preview.add_argument("--samples", type=whole_number(1), default=8, help="rows (default 8)")
    preview.add_argument("--seed", type=whole_number(0), default=0, help="which random samples (>= 0)")
    preview.add_argument("--by", help="rank by this quality score (e.g. weak_refined_iou, mask_fraction) instead of at random")
    preview.add_argument("--worst", type=whole_number(1), help="how many ranked samples (default: --samples)")
    preview.add_argument("--highest", action="store_true", help="rank the highest first (for scores where high is bad)")
    preview.add_argument("--per-class", action="store_true", help="rank within each class, a group of rows per class")
    preview.set_defaults(handler=command_preview)
    exporter = commands.add_parser("export", help="write a run's samples in another format")
    exporter.add_argument("dir", type=Path)
    exporter.add_argument("--out", required=True, type=Path, help="new or empty folder")
    exporter.add_argument("--format", choices=get_args(ExportFormat), default="folders",
                          help="folders: images/ masks/ backgrounds/ metadata/; coco: COCO instances JSON with RLE masks; "
                               "hf: Hugging Face datasets Arrow shards (load_from_disk)")
    exporter.set_defaults(handler=command_export)
    evaluator = commands.add_parser("evaluate", help="score an annotated run's masks against labelled truth")
    evaluator.add_argument("dir", type=Path)
    evaluator.add_argument("--truth", required=True, type=Path,
                           help="folder of class-index PNGs named like the source images (VOC), or a COCO instances json")
    evaluator.add_argument("--band", choices=get_args(EvaluateBand), default="background",
                           help="the masks' 255 pixels: background (default) or ignore (left out of the scores)")
    evaluator.add_argument("--json", action="store_true", help="machine-readable output")
    evaluator.set_defaults(handler=command_evaluate)
    distiller = commands.add_parser("distill", help="teach the removal model a finished run's backgrounds (a LoRA adapter)")
    distiller.add_argument("dir", type=Path, help="the finished run to learn from")
    distiller.add_argument("--out", required=True, type=Path, help="adapter folder; re-running continues it")
    distiller.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: the run's model.device)")
    distiller.add_argument("--quiet", action="store_true", help="no progress bar")
    distill_flags(distiller)
    distiller.set_defaults(handler=command_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before diffusers/transformers load (and inherited by Ray workers): their import-time
    # notices (e.g. torchvision-less image processors maskmint never uses) are noise here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _user_errors() as error:
        return user_error(str(error))
    except _taken_over() as error:
        print(f"error: {error}", file=sys.stderr)
        return RUN_INCOMPLETE
    except OSError as error:
        text = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        if error.errno in USER_PATH_ERRORS:
            return user_error(text)  # a path the user gave that cannot be read or written
        hint = f"; whole shards are kept, re-run to resume: {retry_command(args)}" if args.command == "run" else ""
        print(f"error: {text}{hint}", file=sys.stderr)
        return RUN_INCOMPLETE
    except KeyboardInterrupt:
        print("interrupted: whole shards are kept; re-run the same command to resume", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
