"""Ray vs the in-process executor on the same config, side by side in one process.

    python -m bench.executors --config configs/demo.yaml --rounds 2

Each round runs the config once with `local` and once with `ray` (order alternating) into
fresh directories and times the whole `run` call, Ray's start-up and model loading
included, as a user sees it. Reports samples/s per executor and the ratio ray/local.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import write_json
from maskmint.pipeline.run import run
from maskmint.schemas.config import load_config


def timed_run(config, executor: str, workers: int | None) -> tuple[float, int]:
    config = config.with_execution(executor=executor, workers=workers if executor == "ray" else None)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        summary = run(config, Path(scratch) / "run", show_progress=False)
        seconds = time.perf_counter() - start
    return seconds, summary.written + summary.dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="Ray workers (default: the config's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config)

    rates: dict[str, list[float]] = {"local": [], "ray": []}
    for round_ in range(args.rounds):
        for executor in ("local", "ray") if round_ % 2 == 0 else ("ray", "local"):
            seconds, samples = timed_run(config, executor, args.workers)
            rates[executor].append(samples / seconds)
            print(f"round {round_ + 1} {executor}: {samples} samples in {seconds:.1f} s", file=sys.stderr)
    result = {
        "config": str(args.config), "rounds": args.rounds, "workers": args.workers,
        "samples_per_s": {k: statistics.median(v) for k, v in rates.items()},
        "all_rates": rates,
    }
    result["ray_over_local"] = result["samples_per_s"]["ray"] / result["samples_per_s"]["local"]
    print(f"local {result['samples_per_s']['local']:.3f} samples/s, ray {result['samples_per_s']['ray']:.3f} samples/s, "
          f"ray/local = {result['ray_over_local']:.3f} (median of {args.rounds} rounds)")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
