"""Kept triples per second with and without early drops, side by side in one process.

    python -m bench.early_drops --config configs/multi.yaml --json bench/early-drops-multi.json
    python -m bench.early_drops --config configs/demo.yaml --json bench/early-drops-demo.json
    python -m bench.early_drops --config configs/multi.yaml --set filter.max_components=2   # a stricter filter

One worker holds the config's models; each round runs the same shards twice, once with
`execution.early_drops` off and once on (in alternating order, so drift hits both alike),
and checks that both wrote the same samples, byte for byte. It reports the kept triples per second of each
(medians over --repeats rounds after one warm-up round), their ratio, the share of samples
dropped before removal, and the share of the sample time removal took without early drops.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench import write_json
from maskmint.pipeline.worker import ShardWorker
from bench.quality import set_field
from maskmint.schemas.config import RunConfig, load_config
from maskmint.stages.loading import quiet_libraries


def members(tars: dict[int, bytes]) -> dict[str, bytes]:
    """Every member's bytes (a tar's own headers carry the time it was written)."""
    found = {}
    for data in tars.values():
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return found


def run_shards(worker: ShardWorker, shards: range) -> tuple[float, int, dict, dict[str, bytes]]:
    """Seconds, kept count, summed stage seconds and each shard's tar bytes."""
    start = time.perf_counter()
    kept, seconds, tars = 0, {}, {}
    for shard in shards:
        for event in worker.run_shard(shard):
            stats = getattr(event, "stats", None)
            if stats is not None:
                kept += len(stats.written)
                for stage, value in stats.seconds.items():
                    seconds[stage] = seconds.get(stage, 0.0) + value
        tars[shard] = worker.rundir.tar_path(shard).read_bytes()
    return time.perf_counter() - start, kept, seconds, tars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/multi.yaml"))
    parser.add_argument("--shards", type=int, default=None, help="how many of its shards each run makes (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set filter.max_components=2 (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quiet_libraries()
    data = load_config(args.config).model_dump(mode="json")
    for item in args.set:
        set_field(data, item)
    config = RunConfig.model_validate(data).with_execution(executor="local")
    modes = {flag: config.model_copy(update={"execution": config.execution.model_copy(update={"early_drops": flag})})
             for flag in (False, True)}
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "shards").mkdir()
        worker = ShardWorker(modes[False], scratch)
        shards = range(args.shards or config.num_shards)
        times: dict[bool, list[float]] = {False: [], True: []}
        kept: dict[bool, int] = {}
        stage_seconds: dict[bool, dict] = {}
        for round_ in range(args.repeats + 1):
            tars = {}
            for flag in ((False, True) if round_ % 2 == 0 else (True, False)):
                worker.config = modes[flag]
                elapsed, kept[flag], stage_seconds[flag], tars[flag] = run_shards(worker, shards)
                if round_:
                    times[flag].append(elapsed)
                print(f"round {round_} early_drops={flag}: {elapsed:.1f} s, {kept[flag]} kept", file=sys.stderr)
            if members(tars[False]) != members(tars[True]):
                raise SystemExit("early drops changed what was written")
        samples = sum(len(worker.plan.shard(s)) for s in shards)
        stats = [json.loads(worker.rundir.stats_path(s).read_text()) for s in shards]
        worker.close()
    before = sum(len(s["decided_before_removal"]) for s in stats)
    empty = sum(reason == "empty_weak_mask" for s in stats for reason in s["dropped"].values())
    rate = {flag: kept[flag] / statistics.median(times[flag]) for flag in (False, True)}
    off = stage_seconds[False]
    record = {
        "config": str(args.config), "overrides": args.set, "samples": samples, "kept": kept[True], "repeats": args.repeats,
        "dropped_before_removal_share": round(before / samples, 4),
        "dropped_before_removal_with_a_weak_region_share": round((before - empty) / samples, 4),
        "removal_share_of_time_without": round(off.get("remove", 0.0) / sum(off.values()), 4),
        "kept_per_s_without": round(rate[False], 4), "kept_per_s_with": round(rate[True], 4),
        "with_over_without": round(rate[True] / rate[False], 4),
        "seconds_without": [round(t, 2) for t in times[False]], "seconds_with": [round(t, 2) for t in times[True]],
        "identical_samples": True,
    }
    print(json.dumps(record, indent=1))
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
