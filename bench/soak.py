"""Soak: one long run on a tiny model with two Ray workers, memory watched from outside.

    python -m bench.soak --samples 5000 --json bench/soak.json

The driver (`launch.py run`, a private Ray) and its two model-holding workers are sampled
every `--every` seconds from /proc (resident set size). The figures compared are the RSS
once `--after` samples are whole on disk and the last sample taken while the workers were
still alive: a driver or a worker that keeps something per shard or per sample grows
between the two. The directory is audited at the end (every key once, no temp file).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from bench import write_json
from bench.chaos import ACTOR_PATTERN, Driver, audit, session_pids, tiny_setup


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def whole_samples(out: Path) -> int:
    """Samples of shards whose stats json has landed (read from the files alone)."""
    total = 0
    for path in (out / "shards").glob("[0-9]*.json") if (out / "shards").is_dir() else ():
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being renamed into place
        total += len(stats["written"]) + len(stats["dropped"])
    return total


def memory(driver: Driver) -> dict:
    workers = [rss_mb(pid) for pid in session_pids(driver.process.pid, ACTOR_PATTERN)]
    return {"driver_mb": rss_mb(driver.process.pid), "workers_mb": sorted(w for w in workers if w is not None)}


def soak(samples: int, shard_size: int, after: int, every: float, scratch: Path) -> dict:
    config_path = tiny_setup(scratch, samples, max_attempts=3)
    config = yaml.safe_load(config_path.read_text())
    config["output"]["shard_size"] = shard_size
    config_path.write_text(yaml.safe_dump(config))
    out = scratch / "run"
    start = time.monotonic()
    driver = Driver(config_path, out)
    series, early, last = [], None, None
    while driver.process.poll() is None:
        time.sleep(every)
        done, seen = whole_samples(out), memory(driver)
        if seen["driver_mb"] is None or len(seen["workers_mb"]) < 2:
            continue  # starting, or finishing
        point = {"seconds": round(time.monotonic() - start, 1), "samples": done, **seen}
        series.append(point)
        if early is None and done >= after:
            early = point
        last = point
        print(f"{point['seconds']:>7.0f} s  {done:>6} samples  driver {seen['driver_mb']:.0f} MB  "
              f"workers {', '.join(f'{w:.0f}' for w in seen['workers_mb'])} MB", flush=True)
    seconds = time.monotonic() - start
    problems = audit(out)
    growth = {
        "driver": last["driver_mb"] / early["driver_mb"] - 1,
        "workers": [b / a - 1 for a, b in zip(early["workers_mb"], last["workers_mb"])],
    }
    return {
        "samples": samples, "shard_size": shard_size, "workers": 2, "exit_code": driver.process.returncode,
        "seconds": round(seconds, 1), "samples_per_second": round(samples / seconds, 2),
        "at_after": early, "at_end": last, "growth": growth,
        "within_10_percent": abs(growth["driver"]) < 0.1 and all(abs(g) < 0.1 for g in growth["workers"]),
        "audit_problems": problems, "series": series[:: max(1, len(series) // 200)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--after", type=int, default=500, help="the early memory figure: once this many samples are whole")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="maskmint-soak-") as scratch:
        record = soak(args.samples, args.shard_size, args.after, args.every, Path(scratch))
    record["command"] = f"python -m bench.soak --samples {args.samples} --shard-size {args.shard_size} --after {args.after}"
    write_json(args.json, record)
    print(json.dumps({k: v for k, v in record.items() if k != "series"}, indent=1))
    return 0 if record["within_10_percent"] and not record["audit_problems"] and record["exit_code"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
