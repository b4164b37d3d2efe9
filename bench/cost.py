"""`plan`'s cost estimate against a measured run, on this machine.

    python -m bench.cost --config configs/demo.yaml --json bench/cost.json

Measures the device's dense matmul peak (fp32 on CPU, the run's dtype on CUDA) with large
square matmuls, asks `plan`'s estimator for the run's FLOPs, times the whole run with the
in-process executor, and reports: the achieved share of the peak (FLOPs / (seconds x peak)),
the estimate at `plan`'s default utilisation next to the measured seconds, and their ratio;
then, with the run's own drop rates, the FLOPs and measured seconds per kept triple.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import write_json
from maskmint.pipeline.cost import drop_rates, estimate
from maskmint.pipeline.run import run
from maskmint.schemas.config import load_config

DEFAULT_UTILISATION = 0.35  # launch.py plan's default


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config).with_execution(executor="local")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_tflops(device, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        summary = run(config, Path(scratch) / "run", show_progress=False)
        measured = time.perf_counter() - start
        # the run's own drop rates: removal is counted only for the samples that reached it
        planned = estimate(config, peak, DEFAULT_UTILISATION, drop_rates(Path(scratch) / "run"))
    achieved = planned["run_pflop"] * 1e15 / (measured * peak * 1e12)
    record = {
        "config": str(args.config), "device": str(device), "threads": torch.get_num_threads(),
        "samples": summary.written + summary.dropped, "matmul_peak_tflops": round(peak, 4),
        "tflop_per_triple": planned["tflop_per_triple"], "run_pflop": planned["run_pflop"],
        "estimated_seconds_at_default": planned["device_seconds"], "measured_seconds": round(measured, 2),
        "estimate_over_measured": round(planned["device_seconds"] / measured, 3),
        "achieved_utilisation": round(achieved, 4),
        "early_drops": config.execution.early_drops, "drop_rates": planned["drop_rates"],
        "kept": summary.written, "tflop_per_kept_triple": planned["tflop_per_kept_triple"],
        "measured_seconds_per_kept": round(measured / max(summary.written, 1), 3),
    }
    print(json.dumps(record, indent=1))
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
