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

from maskmint.pipeline.lock import Fenced
from maskmint.pipeline.testing import faults
from maskmint.pipeline.worker import ShardWorker
from maskmint.schemas.config import ExecutionConfig, RunConfig
from maskmint.stages.loading import ModelLoadError


class Progress(Protocol):
    def samples(self, count: int) -> None: ...

    def failure(self, shard: int, error: str, final: bool) -> None: ...

    def note(self, text: str) -> None: ...


def worker_error(error: BaseException) -> BaseException:
    """The worker's own exception inside Ray's task error (itself for any other error)."""
    return getattr(error, "cause", None) or error


def first_line(error: BaseException) -> str:
    """`Type: last line of the message`, unwrapping Ray's task error to the worker's own."""
    error = worker_error(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"


class RunCannotStart(RuntimeError):
    """The first shard fails the same way on every try before any shard is whole: the config
    asks for something this model cannot do. A user error, not a reason to retry the rest."""


def stage_error(error: BaseException) -> BaseException | None:
    """The worker's own exception when an attempt raised in maskmint's stages; None for a lost
    worker, an I/O failure or a takeover, which say nothing about the config."""
    cause = worker_error(error)
    if type(cause).__module__.startswith("ray"):
        return None
    return None if isinstance(cause, (OSError, MemoryError, Fenced)) else cause


class FailureWatch:
    """Stops a run whose first shard fails identically twice (or, with one attempt per shard,
    whose first two shards do) before any shard is whole."""

    def __init__(self, first_shard: int | None):
        self.first_shard = first_shard
        self.any_whole = False
        self.seen: list[tuple[int, str]] = []

    def whole(self) -> None:
        self.any_whole = True

    def failed(self, shard: int, error: BaseException) -> None:
        cause = stage_error(error)
        if self.any_whole or cause is None:
            return
        line = first_line(cause)
        same = [s for s, seen in self.seen if seen == line]
        self.seen.append((shard, line))
        if same and self.first_shard in (shard, *same):
            raise RunCannotStart(f"every try of the first shard fails the same way, before any shard is whole: {line}")

    def finish(self) -> None:
        """At the end: nothing whole and one stage error throughout (a one-shard, one-try run)."""
        lines = {line for _, line in self.seen}
        if not self.any_whole and len(lines) == 1:
            raise RunCannotStart(f"every shard failed the same way and none is whole: {lines.pop()}")


def run_local(config: RunConfig, root: Path, shards: list[int], progress: Progress, run_token: str | None = None) -> dict[int, str]:
    """Shards one after another in this process, each tried up to max_attempts times."""
    worker = ShardWorker(config, root, run_token=run_token)
    failed: dict[int, str] = {}
    watch = FailureWatch(shards[0] if shards else None)
    try:
        for shard in shards:
            for attempt in range(1, config.execution.max_attempts + 1):
                counted = 0
                try:
                    for event in worker.run_shard(shard):
                        counted += event.samples
                        progress.samples(event.samples)
                    failed.pop(shard, None)
                    watch.whole()
                    break
                except Fenced:
                    raise  # another run holds the directory: nothing more is ours to write
                except Exception as error:  # noqa: BLE001 - recorded, then retried or reported
                    progress.samples(-counted)
                    failed[shard] = first_line(error)
                    watch.failed(shard, error)
                    progress.failure(shard, failed[shard], final=attempt == config.execution.max_attempts)
    finally:
        worker.close()
    watch.finish()
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
        yield from self.worker.run_shard(shard)


RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


class TokenAuthNotice(logging.Filter):
    """Drops Ray's notice that it turned token authentication on for a new local cluster (it
    stays on; that is its default); every other record, its warning that authentication is
    off included, passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def start_ray(execution: ExecutionConfig) -> bool:
    """Join the configured cluster or start a private local one; True when this run started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    token_notice = logging.getLogger(RAY_TOKEN_LOGGER)
    if not any(isinstance(f, TokenAuthNotice) for f in token_notice.filters):
        token_notice.addFilter(TokenAuthNotice())
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
            runtime_env=faults.ray_env(),
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
    """Hand shards to actors as they become free; every wait is bounded (see `Dispatch`)."""
    return Dispatch(actors, shards, limits, progress).run()


# A taken-over run waits this long at most for its running shards to reach their fence.
FENCE_DRAIN_S = 60.0


class Dispatch:
    """The driver loop over Ray actors.

    An actor is used only once its `ready` ping returns: at start, and after a failure (the
    ping waits through Ray's restart). One that is not ready within `worker_start_timeout_s`
    is given up and its shard goes to the others. A model that cannot load is a user error
    and stops the run at once; so does a first shard that fails the same way every try. A
    takeover of the directory stops handing out shards, lets the running ones reach their
    fence (each stops within a mini-batch, publishing nothing), then stops the run.
    """

    def __init__(self, actors: list, shards: list[int], limits: Limits, progress: Progress):
        self.limits, self.progress = limits, progress
        self.queue = deque(shards)
        self.attempts = dict.fromkeys(shards, 0)
        self.counted = dict.fromkeys(shards, 0)
        self.failed: dict[int, str] = {}
        self.idle: list = []
        self.running: dict = {}  # ObjectRefGenerator -> (actor, shard, started)
        self.waiting: dict = {}  # ready-ping ObjectRef -> (actor, deadline)
        self.timed_out: set = set()
        self.last_loss = ""
        self.watch = FailureWatch(shards[0] if shards else None)
        self.fenced: Fenced | None = None
        self.drain_until = 0.0
        for actor in actors:
            self.await_ready(actor)

    def run(self) -> dict[int, str]:
        while self.queue or self.running:
            if not self.idle and not self.running and not self.waiting:
                break  # no actor left: the queued shards stay pending
            if self.fenced is not None and time.monotonic() > self.drain_until:
                break
            self.hand_out()
            for ref in self.next_ready():
                if ref in self.waiting:
                    self.on_ready(ref)
                else:
                    self.on_item(ref)
            self.enforce_deadlines()
        if self.fenced is not None:
            raise self.fenced
        self.watch.finish()
        for shard in self.queue:
            reason = f" ({self.last_loss})" if self.last_loss else ""
            self.failed.setdefault(shard, f"no worker left to run it{reason}")
        return self.failed

    def await_ready(self, actor) -> None:
        ping = actor.ready.options(max_task_retries=-1).remote()
        self.waiting[ping] = (actor, time.monotonic() + self.limits.worker_start_timeout_s)

    def hand_out(self) -> None:
        while self.queue and self.idle:
            shard, actor = self.queue.popleft(), self.idle.pop()
            self.attempts[shard] += 1
            self.running[actor.run_shard.remote(shard)] = (actor, shard, time.monotonic())

    def next_ready(self) -> list:
        import ray

        refs = [*self.running, *self.waiting]
        ready, rest = ray.wait(refs, num_returns=1, timeout=1.0)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        return ready

    def on_ready(self, ref) -> None:
        import ray

        actor, _ = self.waiting.pop(ref)
        try:
            ray.get(ref)
            self.idle.append(actor)
        except Exception as error:  # noqa: BLE001 - this actor cannot come back; the others go on
            reason = _init_error(error)
            load_error = f"{ModelLoadError.__name__}: "
            if reason and load_error in reason:
                raise ModelLoadError(reason.partition(load_error)[2]) from None
            self.last_loss = reason or first_line(error)
            self.progress.note(f"a worker was lost: {self.last_loss}")

    def on_item(self, ref) -> None:
        import ray

        actor, shard, _ = self.running[ref]
        try:
            event = ray.get(next(ref))
        except StopIteration:
            del self.running[ref]
            self.idle.append(actor)
            self.failed.pop(shard, None)
            self.watch.whole()
            return
        except Exception as error:  # noqa: BLE001 - the actor died or the shard raised
            del self.running[ref]
            self.on_failure(actor, shard, ref, error)
            return
        self.counted[shard] += event.samples
        self.progress.samples(event.samples)

    def on_failure(self, actor, shard: int, ref, error: BaseException) -> None:
        self.progress.samples(-self.counted[shard])
        self.counted[shard] = 0
        cause = worker_error(error)
        if isinstance(cause, Fenced):
            if self.fenced is None:
                self.fenced = cause
                self.queue.clear()
                self.drain_until = time.monotonic() + FENCE_DRAIN_S
            return
        self.await_ready(actor)
        timed_out = ref in self.timed_out
        self.timed_out.discard(ref)
        self.failed[shard] = "no result within shard_timeout_s" if timed_out else first_line(error)
        if not timed_out:
            self.watch.failed(shard, error)
        retry = self.attempts[shard] < self.limits.max_attempts and self.fenced is None
        self.progress.failure(shard, self.failed[shard], final=not retry)
        if retry:
            self.queue.append(shard)

    def enforce_deadlines(self) -> None:
        import ray

        now = time.monotonic()
        for ref, (actor, deadline) in list(self.waiting.items()):
            if now > deadline:
                del self.waiting[ref]
                ray.kill(actor, no_restart=True)
                self.last_loss = f"not ready within worker_start_timeout_s={self.limits.worker_start_timeout_s:g}"
                self.progress.note(f"a worker was given up: {self.last_loss}")
        if self.limits.shard_timeout_s is not None:
            for ref, (actor, shard, started) in self.running.items():
                if ref not in self.timed_out and now - started > self.limits.shard_timeout_s:
                    self.timed_out.add(ref)
                    ray.kill(actor, no_restart=False)  # its generator fails; Ray restarts the actor


EXECUTORS = {"local": run_local, "ray": run_ray}
