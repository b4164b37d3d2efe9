"""Quotas: top-up rounds of new samples until every class has its kept samples.

A run with `output.kept_per_class` (or `output.kept`) makes its planned samples first. Then,
from what its whole shards kept, it plans a round of new samples after the planned range
(their own keys and seeds, as any sample's), each naming first the class it is for: a class
short by d samples that keeps a share r of its attempts gets about d / r of them, so a class
that drops more gets more. Rounds repeat until every class is met or `output.max_samples`
attempts are planned. Each round starts on a shard boundary and is written to DIR/rounds.json
before any of its shards run, so a killed round resumes as the same round.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field

from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import Record, ShardStats
from maskmint.stages.durable import atomic_write_bytes

ROUNDS_NAME = "rounds.json"


class TopUp(Record):
    start: int = Field(description="index of the round's first sample (a shard boundary)")
    first_classes: list[int] = Field(description="per sample, the class id it names first")


class Rounds(Record):
    rounds: list[TopUp] = Field(default_factory=list)


def read_rounds(root: Path | str) -> list[TopUp]:
    path = Path(root) / ROUNDS_NAME
    return Rounds.model_validate_json(path.read_bytes()).rounds if path.is_file() else []


def write_rounds(root: Path | str, rounds: list[TopUp]) -> None:
    atomic_write_bytes(Path(root) / ROUNDS_NAME, Rounds(rounds=rounds).model_dump_json(indent=1).encode())


def shards_of(samples: int, shard_size: int) -> int:
    return -(-samples // shard_size)


def planned_shards(samples: int, shard_size: int, rounds: list[TopUp]) -> int:
    return shards_of(samples, shard_size) + sum(shards_of(len(r.first_classes), shard_size) for r in rounds)


def planned_samples(samples: int, rounds: list[TopUp]) -> int:
    return samples + sum(len(r.first_classes) for r in rounds)


def shard_range(samples: int, shard_size: int, rounds: list[TopUp], shard: int) -> range:
    """The sample indices of `shard`: the planned range's, or a top-up round's."""
    start = shard * shard_size
    end = samples
    for r in rounds:
        if start >= r.start:
            end = r.start + len(r.first_classes)
    return range(start, min(start + shard_size, end))


def round_of(index: int, rounds: list[TopUp]) -> tuple[TopUp, int] | None:
    for r in rounds:
        if r.start <= index < r.start + len(r.first_classes):
            return r, index - r.start
    return None


def tally(stats: list[ShardStats]) -> tuple[dict[int, int], dict[int, int]]:
    """Attempts and kept samples per class id: a sample counts for every class it shows."""
    attempts: dict[int, int] = {}
    kept: dict[int, int] = {}
    for s in stats:
        written = set(s.written)
        for key, classes in s.classes.items():
            for class_id in classes:
                attempts[class_id] = attempts.get(class_id, 0) + 1
                if key in written:
                    kept[class_id] = kept.get(class_id, 0) + 1
    return attempts, kept


def shortfall(config: RunConfig, stats: list[ShardStats], kept: dict[int, int] | None = None) -> dict[int, int]:
    """class id -> kept samples still missing (with `output.kept`, key 0: the whole run);
    `kept` is `tally`'s, when the caller has it already."""
    if kept is None:
        kept = tally(stats)[1]
    if config.output.kept is not None:
        total = sum(len(s.written) for s in stats)
        return {0: config.output.kept - total} if total < config.output.kept else {}
    wanted = config.output.kept_per_class
    return {c: wanted - kept.get(c, 0) for c in config.class_names() if kept.get(c, 0) < wanted}


def next_round(config: RunConfig, stats: list[ShardStats], rounds: list[TopUp]) -> TopUp | None:
    """The next top-up round, or None when the quota is met or no attempts are left."""
    attempts, kept = tally(stats)
    short = shortfall(config, stats, kept)
    planned = planned_samples(config.output.samples, rounds)
    budget = config.output.max_samples - planned
    if not short or budget <= 0:
        return None
    classes = list(config.class_names())
    if 0 in short:  # the whole run: classes take turns, at the run's own keep rate
        rate = (sum(len(s.written) for s in stats) + 1) / (sum(s.planned for s in stats) + 2)
        first = [classes[i % len(classes)] for i in range(math.ceil(short[0] / rate))]
    else:
        # smoothed keep rate per class, so a class that kept nothing still gets a finite number
        need = {c: math.ceil(d / ((kept.get(c, 0) + 1) / (attempts.get(c, 0) + 2))) for c, d in short.items()}
        first = []
        while any(need.values()):  # interleaved, so a round cut by the budget stays balanced
            for c in sorted(need):
                if need[c]:
                    first.append(c)
                    need[c] -= 1
    start = planned_shards(config.output.samples, config.output.shard_size, rounds) * config.output.shard_size
    return TopUp(start=start, first_classes=first[:budget])


def describe_shortfall(config: RunConfig, stats: list[ShardStats], short: dict[int, int]) -> str:
    """Which classes are short, by how much, and why their samples were dropped."""
    if 0 in short:
        return f"{short[0]} kept samples missing"
    names = config.class_names()
    reasons: dict[int, dict[str, int]] = {}
    for s in stats:
        for key, reason in s.dropped.items():
            for class_id in s.classes.get(key, []):
                found = reasons.setdefault(class_id, {})
                found[reason] = found.get(reason, 0) + 1
    parts = []
    for class_id, missing in sorted(short.items()):
        why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.get(class_id, {}).items(), key=lambda x: -x[1]))
        parts.append(f"{names[class_id]} short by {missing}" + (f" (drops: {why})" if why else ""))
    return "; ".join(parts)
