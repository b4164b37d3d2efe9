"""Executors: who runs the shard worker. In this process, or on Ray actors across a cluster.

Both take the pending shard ids and report to a `Progress`: `samples(n)` as mini-batches
leave the model (n < 0 takes back a failed attempt's samples) and `failure(shard, error,
final)` per failed attempt. Both return {shard: error} for shards that failed every
attempt. Only this module imports Ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pipeline.worker import FAULT_ENV, ShardWorker
from schemas.config import ExecutionConfig, RunConfig
from stages.models import ModelLoadError


class Progress(Protocol):
    def samples(self, count: int) -> None: ...

    def failure(self, shard: int, error: str, final: bool) -> None: ...

    def note(self, text: str) -> None: ...


def first_line(error: BaseException) -> str:
    """`Type: last line of the message`, unwrapping Ray's task error to the worker's own."""
    error = getattr(error, "cause", None) or error
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


def run_local(config: RunConfig, root: Path, shards: list[int], progress: Progress, run_token: str | None = None) -> dict[int, str]:
    """Shards one after another in this process, each tried up to max_attempts times."""
    worker = ShardWorker(config, root, run_token=run_token)
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

    def __init__(self, config: RunConfig, root: str, run_token: str | None = None):
        import ray

        self.worker = ShardWorker(config, root, run_token=run_token)
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


def run_ray(config: RunConfig, root: Path, shards: list[int], progress: Progress, run_token: str | None = None) -> dict[int, str]:
    """Shards spread over Ray actors that hold the models.

    Ray restarts a dead actor process (max_restarts); the dispatch loop resubmits the shard
    it was on, up to max_attempts, and records it as failed after that. Ray's ActorPool
    neither survives actor deaths nor counts attempts, nor bounds the wait for an actor
    that never comes back, hence the loop.
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
        actors = [actor_class.remote(config, str(root), run_token) for _ in range(count)]
        limits = Limits(execution.max_attempts, execution.worker_start_timeout_s, execution.shard_timeout_s)
        return dispatch(actors, shards, limits, progress)
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class Limits:
    max_attempts: int
    worker_start_timeout_s: float  # a (re)starting actor not ready by then is given up
    shard_timeout_s: float | None  # a shard running longer has its actor restarted


def _init_error(error: BaseException) -> str | None:
    """The worker's own error when an actor died in its constructor (e.g. the model failed to load)."""
    if not getattr(error, "actor_init_failed", False):
        return None
    lines = [line for line in str(getattr(error, "error_msg", "")).strip().splitlines() if line.strip()]
    return lines[-1] if lines else None


def dispatch(actors: list, shards: list[int], limits: Limits, progress: Progress) -> dict[int, str]:
    """Hand shards to actors as they become free; every wait is bounded.

    An actor is used only once its `ready` ping returns: at start, and after a failure
    (the ping waits through Ray's restart). One that is not ready within
    `worker_start_timeout_s` is given up and its shard goes to the others. A model that
    cannot load is a user error and stops the run at once.
    """
    import ray

    queue = deque(shards)
    attempts = dict.fromkeys(shards, 0)
    counted = dict.fromkeys(shards, 0)
    failed: dict[int, str] = {}
    idle: list = []
    running: dict = {}  # ObjectRefGenerator -> (actor, shard, started)
    waiting: dict = {}  # ready-ping ObjectRef -> (actor, deadline)
    timed_out: set = set()
    last_loss = ""

    def await_ready(actor) -> None:
        waiting[actor.ready.options(max_task_retries=-1).remote()] = (actor, time.monotonic() + limits.worker_start_timeout_s)

    for actor in actors:
        await_ready(actor)
    while queue or running:
        if not idle and not running and not waiting:
            break  # no actor left: the queued shards stay pending
        while queue and idle:
            shard, actor = queue.popleft(), idle.pop()
            attempts[shard] += 1
            running[actor.run_shard.remote(shard)] = (actor, shard, time.monotonic())
        refs = [*running, *waiting]
        ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in ready:
            if ref in waiting:
                actor, _ = waiting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except Exception as error:  # noqa: BLE001 - this actor cannot come back; the others go on
                    reason = _init_error(error)
                    load_error = f"{ModelLoadError.__name__}: "
                    if reason and load_error in reason:
                        raise ModelLoadError(reason.partition(load_error)[2]) from None
                    last_loss = reason or first_line(error)
                    progress.note(f"a worker was lost: {last_loss}")
                continue
            actor, shard, _ = running[ref]
            try:
                item = ray.get(next(ref))
            except StopIteration:
                del running[ref]
                idle.append(actor)
                failed.pop(shard, None)
                continue
            except Exception as error:  # noqa: BLE001 - the actor died or the shard raised
                del running[ref]
                await_ready(actor)
                progress.samples(-counted[shard])
                counted[shard] = 0
                failed[shard] = "no result within shard_timeout_s" if ref in timed_out else first_line(error)
                timed_out.discard(ref)
                retry = attempts[shard] < limits.max_attempts
                progress.failure(shard, failed[shard], final=not retry)
                if retry:
                    queue.append(shard)
                continue
            if isinstance(item, int):
                counted[shard] += item
                progress.samples(item)
        now = time.monotonic()
        for ref, (actor, deadline) in list(waiting.items()):
            if now > deadline:
                del waiting[ref]
                ray.kill(actor, no_restart=True)
                last_loss = f"not ready within worker_start_timeout_s={limits.worker_start_timeout_s:g}"
                progress.note(f"a worker was given up: {last_loss}")
        if limits.shard_timeout_s is not None:
            for ref, (actor, shard, started) in running.items():
                if ref not in timed_out and now - started > limits.shard_timeout_s:
                    timed_out.add(ref)
                    ray.kill(actor, no_restart=False)  # its generator fails; Ray restarts the actor
    for shard in queue:
        failed.setdefault(shard, f"no worker left to run it ({last_loss})" if last_loss else "no worker left to run it")
    return failed


EXECUTORS = {"local": run_local, "ray": run_ray}
