"""What the toy-model trainers share: a log, resumable checkpoints, the run arguments every
trainer takes, and the provenance record written into the trained folder."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def log(message: str, handle) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    handle.write(line + "\n")
    handle.flush()


def optimise(optimizer, loss: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


STAGES = ("vae", "unet", "decoder", "done")


class Checkpoint:
    """Everything a stage needs to continue where an interrupted run stopped.

    Written to a temporary name and renamed, so a kill leaves the previous one whole. A
    checkpoint made with other arguments is refused rather than mixed in.
    """

    def __init__(self, path: Path, arguments: dict, every: int, models: dict, rng: np.random.Generator):
        self.path, self.arguments, self.every, self.models, self.rng = path, arguments, every, models, rng
        self.state: dict | None = None
        self.started, self.minutes_before = time.time(), 0.0
        if path.exists():
            state = torch.load(path, weights_only=False)
            if state["arguments"] != arguments:
                raise SystemExit(f"{path} was made with other arguments; delete it to start over")
            self.state = state
            for name, model in models.items():
                model.load_state_dict(state["models"][name])
            models["vae"].register_to_config(scaling_factor=state["scaling_factor"])
            rng.bit_generator.state = state["rng"]
            self.minutes_before = state["minutes"]

    def minutes(self) -> float:
        """Training time over every attempt, interruptions left out."""
        return self.minutes_before + (time.time() - self.started) / 60

    def reached(self, stage: str) -> bool:
        """Whether the checkpoint is past `stage` (it is done and must not run again)."""
        return self.state is not None and STAGES.index(self.state["stage"]) > STAGES.index(stage)

    def resume(self, stage: str, generator: torch.Generator | None = None, **stateful) -> int:
        """The step to start `stage` from, restoring its optimiser/EMA/generator state."""
        if self.state is None or self.state["stage"] != stage or self.state["step"] == 0:
            return 0
        for name, thing in stateful.items():
            thing.load_state_dict(self.state["extra"][name])
        self.rng.bit_generator.state = self.state["rng"]  # as it was after the saved step's batch
        if generator is not None:
            generator.set_state(self.state["generator"])
        return self.state["step"]

    def save(self, stage: str, step: int, generator: torch.Generator | None = None, force: bool = False, **stateful):
        if not force and (not self.every or step % self.every):
            return
        state = {
            "arguments": self.arguments, "stage": stage, "step": step,
            "models": {name: model.state_dict() for name, model in self.models.items()},
            "scaling_factor": self.models["vae"].config.scaling_factor,
            "rng": self.rng.bit_generator.state,
            "generator": generator.get_state() if generator is not None else None,
            "extra": {name: thing.state_dict() for name, thing in stateful.items()},
            "minutes": self.minutes(),
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, temporary)
        temporary.replace(self.path)
        self.state = state


def parse_with_run_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments every toy trainer takes (seed, threads, log, checkpoints), parsed and applied."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--log", type=Path, default=None, help="log file (default: OUT.train.log beside OUT)")
    parser.add_argument("--checkpoint-every", type=int, default=200,
                        help="save OUT.ckpt.pt every this many steps (0: never); a rerun continues from it")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from maskmint.stages.loading import quiet_libraries

    quiet_libraries()
    return args


def open_checkpoint(args: argparse.Namespace, models: dict, rng: np.random.Generator) -> tuple[Checkpoint, Path]:
    """OUT.ckpt.pt for these arguments (how the run is watched and paced left out) and the log's path.

    `--steps`, where a single-stage run stops, is left out too: its learning rate is constant
    after the warm-up, so an interrupted run may be continued further, or stopped at its
    checkpoint, and end as a run given that many steps from the start would."""
    log_path = args.log or args.out.with_name(args.out.name + ".train.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    recipe = {k: str(v) for k, v in vars(args).items() if k not in ("log", "threads", "checkpoint_every", "steps")}
    return Checkpoint(args.out.with_name(args.out.name + ".ckpt.pt"), recipe, args.checkpoint_every, models, rng), log_path


def read_provenance(folder: Path | None) -> dict | None:
    """A trained folder's training.json, to chain into the record of what is made from it."""
    record = folder / "training.json" if folder else None
    return json.loads(record.read_text()) if record and record.exists() else None


def write_provenance(out: Path, arguments: dict, minutes: float, log_path: Path, resumed_from: dict | None = None,
                     trained_by: str = "bench/train_toy_model.py", **parts) -> None:
    """OUT/training.json: how the shipped weights were made, so they can be made again.

    `parts` records where reused parts came from (their own training.json)."""
    import platform

    record = {
        "trained_by": trained_by,
        "arguments": {k: str(v) for k, v in arguments.items()},
        "wall_minutes": round(minutes, 1),
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "log_tail": log_path.read_text().splitlines()[-6:] if log_path.exists() else [],
        "resumed_from": resumed_from,
        **parts,
    }
    (Path(out) / "training.json").write_text(json.dumps(record, indent=1))
