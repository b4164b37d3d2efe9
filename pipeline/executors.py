"""Executors: who runs the shard worker. In this process, or on Ray actors across a cluster.

Both take the pending shard ids and report to a `Progress`: `samples(n)` as mini-batches
leave the model (n < 0 takes back a failed attempt's samples) and `failure(shard, error,
final)` per failed attempt. Both return {shard: error} for shards that failed every
attempt. Only this module imports Ray.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Protocol

from pipeline.worker import FAULT_ENV, ShardWorker
from schemas.config import ExecutionConfig, RunConfig


class Progress(Protocol):
    def samples(self, count: int) -> None: ...

    def failure(self, shard: int, error: str, final: bool) -> None: ...


def first_line(error: BaseException) -> str:
    """`Type: last line of the message`, unwrapping Ray's task error to the worker's own."""
    error = getattr(error, "cause", None) or error
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def run_local(config: RunConfig, root: Path, shards: list[int], progress: Progress) -> dict[int, str]:
    """Shards one after another in this process, each tried up to max_attempts times."""
    worker = ShardWorker(config, root)
    failed: dict[int, str] = {}
    try:
        for shard in shards:
            for attempt in range(1, config.execution.max_attempts + 1):
                counted = 0
                try:
                    for item in worker.run_shard(shard):
                        if isinstance(item, int):
                            counted += item
                            progress.samples(item)
                    failed.pop(shard, None)
                    break
                except Exception as error:  # noqa: BLE001 - recorded, then retried or reported
                    progress.samples(-counted)
                    failed[shard] = first_line(error)
                    progress.failure(shard, failed[shard], final=attempt == config.execution.max_attempts)
    finally:
        worker.close()
    return failed


class ShardActor:
    """A Ray actor around one ShardWorker: models load once per process, restarts reload them."""

    def __init__(self, config: RunConfig, root: str):
        import ray

        self.worker = ShardWorker(config, root)
        self.worker.identity["ray_node"] = ray.get_runtime_context().get_node_id()

    def ready(self) -> bool:
        return True

    def run_shard(self, shard: int):
        for item in self.worker.run_shard(shard):
            yield item if isinstance(item, int) else item.model_dump(include={"shard", "written", "dropped"})


def start_ray(execution: ExecutionConfig) -> bool:
    """Join the configured cluster or start a private local one; True when this run started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    if execution.address:
        ray.init(address=execution.address, **common)
    else:
        memory = execution.object_store_memory_mb
        ray.init(
            address="local",  # a private instance, even where a `ray start` cluster runs on this host
            object_store_memory=memory * 2**20 if memory else None,
            dashboard_host="127.0.0.1",
            **common,
        )
    return True


def worker_count(execution: ExecutionConfig, gpus: float) -> int:
    if execution.workers:
        return execution.workers
    return max(1, int(gpus // execution.gpus_per_worker)) if gpus else 1


def run_ray(config: RunConfig, root: Path, shards: list[int], progress: Progress) -> dict[int, str]:
    """Shards spread over Ray actors that hold the models.

    Ray restarts a dead actor process (max_restarts); this loop resubmits the shard it was
    on, up to max_attempts, and records it as failed after that. Ray's ActorPool neither
    survives actor deaths nor counts attempts, hence the small loop.
    """
    import ray

    execution = config.execution
    started = start_ray(execution)
    try:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        count = min(worker_count(execution, gpus), len(shards))
        actor_class = ray.remote(ShardActor).options(
            num_cpus=execution.cpus_per_worker,
            num_gpus=execution.gpus_per_worker if gpus else 0,
            max_restarts=-1,
            max_task_retries=0,
            runtime_env={"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if FAULT_ENV in os.environ else None,
        )
        actors = [actor_class.remote(config, str(root)) for _ in range(count)]
        return _dispatch(actors, shards, execution.max_attempts, progress)
    finally:
        if started:
            ray.shutdown()


def _dispatch(actors: list, shards: list[int], max_attempts: int, progress: Progress) -> dict[int, str]:
    import ray

    queue = deque(shards)
    attempts = {shard: 0 for shard in shards}
    counted = {shard: 0 for shard in shards}
    failed: dict[int, str] = {}
    idle = list(actors)
    running: dict = {}  # ObjectRefGenerator -> (actor, shard)
    recovering: dict = {}  # ping ObjectRef -> actor, after its shard failed
    while queue or running:
        if not idle and not running and not recovering:
            break  # no actor left: the queued shards stay pending
        while queue and idle:
            shard, actor = queue.popleft(), idle.pop()
            attempts[shard] += 1
            running[actor.run_shard.remote(shard)] = (actor, shard)
        ready, _ = ray.wait([*running, *recovering], num_returns=1, timeout=1.0)
        for ref in ready:
            if ref in recovering:
                actor = recovering.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except Exception:  # noqa: BLE001 - the actor cannot come back; the others go on
                    pass
                continue
            actor, shard = running[ref]
            try:
                item = ray.get(next(ref))
            except StopIteration:
                del running[ref]
                idle.append(actor)
                failed.pop(shard, None)
                continue
            except Exception as error:  # noqa: BLE001 - the actor died or the shard raised
                del running[ref]
                # A dead actor is restarted by Ray; the ping waits through the restart so no
                # attempt is spent on an actor that is not back yet.
                recovering[actor.ready.options(max_task_retries=-1).remote()] = actor
                progress.samples(-counted[shard])
                counted[shard] = 0
                failed[shard] = first_line(error)
                retry = attempts[shard] < max_attempts
                progress.failure(shard, failed[shard], final=not retry)
                if retry:
                    queue.append(shard)
                continue
            if isinstance(item, int):
                counted[shard] += item
                progress.samples(item)
    for shard in queue:
        failed.setdefault(shard, "no worker left to run it")
    return failed


EXECUTORS = {"local": run_local, "ray": run_ray}
