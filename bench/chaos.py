"""Chaos: kill the driver and the workers of real runs at random moments, then audit.

    python -m bench.chaos --driver-kills 50 --worker-kills 50 --both 10 --seed 0 --json bench/chaos.json

On a tiny random model (32 px, 3 steps, shards of 2 samples, two Ray workers):
- driver kills: `launch.py run` is SIGKILLed at a random moment and started again at
  once, as a job scheduler would, while the killed driver's Ray workers may still be
  alive; after `--kills-per-dir` kills a directory is run to the end;
- worker kills: during a run, Ray worker processes holding the model are SIGKILLed at
  random moments; the run must finish (or name failed shards, which a re-run completes);
- both: worker kills, then the driver killed too.

Every directory is then audited from the files alone: each planned key written or dropped
exactly once, every tar read through and agreeing with its stats json, no temp files, and
no shard published by a run after a later run had taken the directory (shard file change
time vs the later holder's start in `writers.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from bench import write_json

REPO = Path(__file__).resolve().parents[1]
ACTOR_PATTERN = "ray::ShardActor"
# A fenced writer checks the lock a few milliseconds before its rename.
PUBLISH_SLACK_S = 0.05


def audit(out: Path) -> list[str]:
    """Problems with a finished run directory, found from its files alone (no maskmint code)."""
    problems = []
    manifest = json.loads((out / "run.json").read_text())
    planned = [f"{i:010d}" for i in range(manifest["planned_samples"])]
    fields = set(manifest["fields"].values())
    shards = out / "shards"
    accounted: Counter = Counter()
    for index in range(manifest["planned_shards"]):
        stats_path, tar_path = shards / f"{index:06d}.json", shards / f"{index:06d}.tar"
        if not stats_path.is_file() or not tar_path.is_file():
            problems.append(f"shard {index}: missing")
            continue
        stats = json.loads(stats_path.read_text())
        accounted.update([*stats["written"], *stats["dropped"]])
        try:
            with tarfile.open(tar_path) as tar:
                names = []
                for member in tar.getmembers():
                    tar.extractfile(member).read()
                    names.append(member.name)
        except (tarfile.TarError, OSError) as error:
            problems.append(f"shard {index}: unreadable tar ({error})")
            continue
        expected = {f"{key}.{field}" for key in stats["written"] for field in fields}
        if sorted(names) != sorted(expected):
            problems.append(f"shard {index}: tar members disagree with its stats json")
    duplicated = [key for key, count in accounted.items() if count > 1]
    if duplicated:
        problems.append(f"{len(duplicated)} keys accounted more than once, e.g. {duplicated[:3]}")
    missing = sorted(set(planned) - set(accounted))
    if missing:
        problems.append(f"{len(missing)} planned keys neither written nor dropped, e.g. {missing[:3]}")
    unplanned = sorted(set(accounted) - set(planned))
    if unplanned:
        problems.append(f"{len(unplanned)} keys not in the plan")
    temps = [p.name for p in shards.iterdir() if re.match(r"^\.\d{6}\.(tar|json)\.tmp-", p.name)]
    if temps:
        problems.append(f"temp files left: {temps[:3]}")
    problems += late_publications(out, manifest["planned_shards"])
    return problems


def late_publications(out: Path, planned_shards: int) -> list[str]:
    """Stats jsons that name no writer of `writers.jsonl`, and shards published by a run after
    a later run had taken the directory."""
    history_path = out / "writers.jsonl"
    lines = history_path.read_text().splitlines() if history_path.is_file() else []
    started = [json.loads(line) for line in lines if line.strip()]
    order = {holder["token"]: i for i, holder in enumerate(started)}
    problems = []
    for stats_path in (out / "shards" / f"{index:06d}.json" for index in range(planned_shards)):
        if not stats_path.is_file():
            continue
        token = json.loads(stats_path.read_text()).get("worker", {}).get("run")
        if token is None:
            problems.append(f"{stats_path.name} carries no run token")
            continue
        if token not in order:
            problems.append(f"{stats_path.name}: its run token is not a holder in writers.jsonl")
            continue
        if order[token] + 1 >= len(started):
            continue
        successor = started[order[token] + 1]["started"]
        if stats_path.stat().st_ctime > successor + PUBLISH_SLACK_S:
            problems.append(f"{stats_path.name} published by an earlier run after the next run took the directory")
    return problems


def tiny_setup(scratch: Path, samples: int, max_attempts: int) -> Path:
    from maskmint.pipeline.testing.tiny_models import build_tiny_pipeline

    model = scratch / "tiny-sd"
    build_tiny_pipeline(seed=0, image_size=32).save_pretrained(model)
    config = {
        "name": "chaos",
        "model": {"path": str(model)},
        "prompts": {
            "concepts": [{"name": "dog", "class_id": 1}, {"name": "cat", "class_id": 2}],
            "templates": ["a photo of a {concept} in a {place}"],
            "fillers": {"place": ["park", "kitchen"]},
        },
        "generation": {"steps": 3, "guidance_scale": 5.0, "batch_size": 2},
        "removal": {"steps": 3},
        "filter": {"max_mask_fraction": 1.0, "max_components": 1000, "min_removal_delta": 0.0, "min_image_std": 0.0},
        "output": {"samples": samples, "shard_size": 2},
        "execution": {
            "executor": "ray", "workers": 2, "cpus_per_worker": 1, "cpu_threads": 1,
            "max_attempts": max_attempts, "object_store_memory_mb": 128,
        },
    }
    path = scratch / "chaos.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Driver:
    """`launch.py run` in its own session, so that what it leaves behind can be found."""

    def __init__(self, config: Path, out: Path):
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
        command = [sys.executable, str(REPO / "launch.py"), "run", "--config", str(config), "--out", str(out), "--quiet"]
        with open(out.with_name(f"{out.name}.log"), "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=log
            )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"a run did not finish within {timeout:.0f} s") from None


def session_pids(session: int, pattern: str = "") -> list[int]:
    """Processes of a driver's session (its private Ray included), optionally matching `pattern`."""
    command = ["pgrep", "-s", str(session), *(["-f", pattern] if pattern else [])]
    return [int(pid) for pid in subprocess.run(command, capture_output=True, text=True).stdout.split()]


def kill_workers(driver: Driver, rng: random.Random, kills: int, max_delay: float) -> int:
    """SIGKILL a random model-holding Ray worker at random moments while the run lasts."""
    done = 0
    while done < kills and driver.process.poll() is None:
        time.sleep(rng.uniform(0.2, max_delay))
        pids = session_pids(driver.process.pid, ACTOR_PATTERN)
        if not pids:
            continue
        try:
            os.kill(rng.choice(pids), signal.SIGKILL)
            done += 1
        except ProcessLookupError:
            pass
    return done


def complete(config: Path, out: Path, timeout: float) -> int:
    """Run to the end (re-running while shards fail every attempt); returns the runs it took."""
    for runs in range(1, 6):
        code = Driver(config, out).finish(timeout)
        if code == 0:
            return runs
        if code != 1:
            raise RuntimeError(f"a plain run exited {code}")
    raise RuntimeError("the run did not complete in 5 tries")


def reap(sessions: list[int]) -> int:
    """Between directories: wait for killed drivers' leftovers (their private Ray) to go, so
    runs do not pile up; returns how many were still there after 30 s (then killed)."""
    deadline = time.time() + 30
    while any(session_pids(s) for s in sessions) and time.time() < deadline:
        time.sleep(0.5)
    left = [pid for s in sessions for pid in session_pids(s)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sessions.clear()
    return len(left)


def chaos(args: argparse.Namespace, scratch: Path) -> dict:
    rng = random.Random(args.seed)
    config = tiny_setup(scratch, args.samples, args.max_attempts)
    record = {"driver_kills": 0, "worker_kills": 0, "both_rounds": 0, "directories": 0, "runs": 0,
              "problems": [], "refused_while_held": 0, "leftovers_after_30s": 0}
    directory = 0
    killed: list[int] = []  # sessions of killed drivers

    def audit_dir(out: Path) -> None:
        record["directories"] += 1
        record["problems"] += [f"{out.name}: {p}" for p in audit(out)]

    # driver kills, several per directory, each next run started at once
    while record["driver_kills"] < args.driver_kills:
        directory += 1
        out = scratch / f"driver-{directory}"
        for _ in range(min(args.kills_per_dir, args.driver_kills - record["driver_kills"])):
            driver = Driver(config, out)
            time.sleep(rng.uniform(0.0, args.max_delay))
            if driver.process.poll() is not None:
                record["runs"] += 1
                record["refused_while_held"] += driver.process.returncode == 2
                continue  # finished (or refused) before the kill: a kill is only counted when it lands
            driver.kill()
            killed.append(driver.process.pid)
            record["driver_kills"] += 1
            record["runs"] += 1
        record["runs"] += complete(config, out, args.timeout)
        audit_dir(out)
        record["leftovers_after_30s"] += reap(killed)
        print(f"driver kills {record['driver_kills']}/{args.driver_kills}, problems {len(record['problems'])}", flush=True)

    # worker kills during runs that go on
    while record["worker_kills"] < args.worker_kills:
        directory += 1
        out = scratch / f"worker-{directory}"
        driver = Driver(config, out)
        record["worker_kills"] += kill_workers(driver, rng, args.kills_per_dir, args.max_delay / 4)
        code = driver.finish(args.timeout)
        record["runs"] += 1
        if code != 0:
            record["runs"] += complete(config, out, args.timeout)
        audit_dir(out)
        print(f"worker kills {record['worker_kills']}/{args.worker_kills}, problems {len(record['problems'])}", flush=True)

    # both: workers killed, then the driver
    for _ in range(args.both):
        directory += 1
        out = scratch / f"both-{directory}"
        driver = Driver(config, out)
        record["worker_kills"] += kill_workers(driver, rng, 2, args.max_delay / 3)
        if driver.process.poll() is None:
            driver.kill()
            killed.append(driver.process.pid)
            record["driver_kills"] += 1
        record["both_rounds"] += 1
        record["runs"] += 1 + complete(config, out, args.timeout)
        audit_dir(out)
        record["leftovers_after_30s"] += reap(killed)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver-kills", type=int, default=50)
    parser.add_argument("--worker-kills", type=int, default=50)
    parser.add_argument("--both", type=int, default=10, help="rounds with worker kills and then a driver kill")
    parser.add_argument("--kills-per-dir", type=int, default=5)
    parser.add_argument("--samples", type=int, default=48, help="planned samples per directory (shards of 2)")
    parser.add_argument("--max-delay", type=float, default=12.0, help="kills fall uniformly in [0, this] seconds")
    parser.add_argument("--max-attempts", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a plain run may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskmint-chaos-") as scratch:
        record = chaos(args, Path(scratch))
    record.update(seconds=round(time.perf_counter() - start, 1), args=vars(args) | {"json": str(args.json)})
    print(json.dumps({k: v for k, v in record.items() if k != "args"}, indent=1))
    write_json(args.json, record)
    return 1 if record["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
