"""The driver at scale, without models: dispatch overhead per shard, and resuming over many shards.

    python -m bench.driver_scale --shards 1000 3000 10000 --actors 64 --json bench/driver_scale.json

- dispatch: `pipeline.executors.dispatch` (the loop `run` uses on Ray) hands N shards to
  stand-in actors that yield a shard's mini-batch counts and its stats at once, so what is
  timed is the driver and Ray, not a model. Reported per shard: the driver's CPU time (its
  own overhead), wall time, and the driver's peak Python allocations (tracemalloc).
- resume: a run directory holding N whole shards (real tars and stats json), then the whole
  `run` call on it, which finds nothing to do: planning check, lock, scan of every shard,
  summary and dataset card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from bench import write_json
from maskmint.schemas.records import BatchDone, ShardStats, ShardWritten

BATCHES_PER_SHARD = 4


class StandInWorker:
    """What ShardActor yields, without a model."""

    def ready(self) -> bool:
        return True

    def run_shard(self, shard: int):
        for _ in range(BATCHES_PER_SHARD):
            yield BatchDone(4)
        yield ShardWritten(ShardStats(shard=shard, planned=16, written=[], dropped={}, seconds={}, mask={}, scores={}))


class CountingProgress:
    def __init__(self):
        self.samples_seen = 0
        self.failures = 0

    def samples(self, count: int) -> None:
        self.samples_seen += count

    def failure(self, shard: int, error: str, final: bool) -> None:
        self.failures += 1

    def note(self, text: str) -> None:
        print(text, file=sys.stderr)


def measure_dispatch(shard_counts: list[int], actor_count: int) -> list[dict]:
    import ray

    from maskmint.pipeline.executors import Limits, dispatch

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20)
    try:
        actor_class = ray.remote(StandInWorker).options(num_cpus=0, max_restarts=-1)
        actors = [actor_class.remote() for _ in range(actor_count)]
        ray.get([a.ready.remote() for a in actors])  # start-up is not the loop's cost
        dispatch(actors, list(range(actor_count)), Limits(1, 600, None), CountingProgress())  # warm-up
        rows = []
        for count in shard_counts:
            progress = CountingProgress()
            tracemalloc.start()
            cpu, wall = time.process_time(), time.perf_counter()
            failed = dispatch(actors, list(range(count)), Limits(1, 600, None), progress)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert not failed and progress.samples_seen == count * BATCHES_PER_SHARD * 4, (failed, progress.samples_seen)
            rows.append({
                "shards": count, "actors": actor_count,
                "driver_cpu_ms_per_shard": round(1000 * cpu / count, 3),
                "wall_ms_per_shard": round(1000 * wall / count, 3),
                "driver_peak_python_mb": round(peak / 2**20, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
        return rows
    finally:
        ray.shutdown()


def metadata(key: str) -> bytes:
    from maskmint.schemas.records import ConceptSpan, SampleMetadata

    dog = ConceptSpan(name="dog", class_id=1, word="dog", char_span=(2, 5), token_positions=[2])
    return SampleMetadata(
        key=key, prompt="a dog", background_prompt="a", negative_prompt="", background_negative_prompt="dog",
        concepts=[dog], seed=0, model="stand-in", width=8, height=8, parameters={}, quality={},
    ).model_dump_json().encode()


def measure_resume(shard_count: int, scratch: Path) -> dict:
    """A run over `shard_count` whole shards that finds nothing to do, timed as a user sees it."""
    from maskmint.pipeline.run import run
    from maskmint.pipeline.rundir import RunDir
    from maskmint.pipeline.testing.tiny_models import build_tiny_pipeline
    from maskmint.schemas.config import parse_config
    from maskmint.schemas.records import ShardStats
    from maskmint.stages.loading import model_fingerprint
    from maskmint.stages.write import encode_image, write_shard

    model = scratch / "tiny-sd"
    build_tiny_pipeline(seed=0, image_size=32).save_pretrained(model)
    config = parse_config({
        "model": {"path": str(model)},
        "prompts": {"concepts": [{"name": "dog", "class_id": 1}]},
        "output": {"samples": shard_count * 2, "shard_size": 2},
        "execution": {"executor": "local"},
    })
    rundir = RunDir(scratch / "run")
    manifest = rundir.prepare(config, config.config_hash(model_fingerprint(config.model)))
    pixel = encode_image(np.zeros((8, 8, 3), np.uint8), "jpg")
    gray = encode_image(np.zeros((8, 8), np.uint8), "png")
    fields = manifest.fields
    made = time.perf_counter()
    for shard in range(shard_count):
        keys = [f"{i:010d}" for i in range(2 * shard, 2 * shard + 2)]
        samples = [
            {"__key__": key, fields["image"]: pixel, fields["background"]: pixel, fields["mask"]: gray,
             fields["heatmap"]: gray, fields["metadata"]: metadata(key)}
            for key in keys
        ]
        stats = ShardStats(shard=shard, planned=2, written=keys, dropped={}, seconds={}, mask={})
        write_shard(rundir.tar_path(shard), rundir.stats_path(shard), samples, stats)
    made = time.perf_counter() - made
    start = time.perf_counter()
    scan = rundir.scan()
    scan_seconds = time.perf_counter() - start
    start = time.perf_counter()
    summary = run(config, rundir.root, show_progress=False)
    run_seconds = time.perf_counter() - start
    assert summary.whole and len(scan.complete) == shard_count
    return {"shards": shard_count, "scan_s": round(scan_seconds, 2), "run_s": round(run_seconds, 2),
            "making_them_s": round(made, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--actors", type=int, default=64)
    parser.add_argument("--resume-shards", type=int, default=10000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    record = {"dispatch": measure_dispatch(args.shards, args.actors)}
    with tempfile.TemporaryDirectory(prefix="maskmint-scale-") as scratch:
        record["resume"] = measure_resume(args.resume_shards, Path(scratch))
    print(json.dumps(record["resume"]))
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
