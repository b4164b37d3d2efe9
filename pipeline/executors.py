"""Executors: who runs the shard worker. In-process here; the same worker serves any scheduler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pipeline.worker import ShardWorker
from schemas.config import RunConfig


def run_local(
    config: RunConfig, root: Path, shards: list[int], on_samples: Callable[[int], None]
) -> dict[int, str]:
    """Run shards one after another in this process; a failing shard is recorded, the rest go on."""
    worker = ShardWorker(config, root)
    failed: dict[int, str] = {}
    try:
        for shard in shards:
            try:
                worker.run_shard(shard, on_samples)
            except Exception as error:  # noqa: BLE001 - recorded in the summary with its message
                failed[shard] = f"{type(error).__name__}: {error}"
    finally:
        worker.close()
    return failed
