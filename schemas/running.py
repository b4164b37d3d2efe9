"""How much a run makes and how it is executed: the output and execution sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from maskmint.schemas.base import Section

ExecutorName = Literal["ray", "local"]  # one of the values a user picks from (see schemas/config.py)

TEMPLATE_SAMPLES = 64  # output.samples when the prompts come from templates


class OutputConfig(Section):
    samples: int | None = Field(
        default=None, ge=1,
        description=f"default: one per line of prompts.file or image of input.images; {TEMPLATE_SAMPLES} from templates",
    )
    shard_size: int = Field(default=16, ge=1)
    kept_per_class: int | None = Field(
        default=None, ge=1,
        description="keep planning top-up rounds until every class has this many kept samples (templates only)",
    )
    kept: int | None = Field(default=None, ge=1, description="the same for kept samples over all classes")
    max_samples: int | None = Field(
        default=None, ge=1,
        description="with a quota: attempts over all rounds at most (default: 4x what a perfect filter would need)",
    )
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(default=95, ge=1, le=100)


class ExecutionConfig(Section):
    executor: ExecutorName = Field(
        default="ray", description="ray: shards spread over Ray actors; local: one worker in this process"
    )
    address: str | None = Field(
        default=None, description="Ray cluster to join (e.g. 'auto' or 'HEAD:6379'); None starts Ray inside the run"
    )
    workers: int | None = Field(
        default=None, ge=1, description="model-holding workers; None: one per gpus_per_worker of GPU, else 1"
    )
    gpus_per_worker: float = Field(default=1.0, gt=0.0, description="0.5 puts two workers on each GPU")
    cpus_per_worker: float = Field(default=2.0, gt=0.0, description="CPUs a worker reserves (torch and CPU stages)")
    max_attempts: int = Field(default=3, ge=1, description="tries per shard before it is recorded as failed")
    object_store_memory_mb: int | None = Field(
        default=512, ge=64, description="object store of a Ray started by the run (only small messages pass it)"
    )
    seed: int = Field(default=0, ge=0)
    cpu_threads: int = Field(default=2, ge=1, description="threads for the CPU stages beside the model")
    worker_start_timeout_s: float = Field(
        default=900.0, gt=0.0,
        description="a Ray worker not ready (models loaded) this long after its start or restart is given up",
    )
    shard_timeout_s: float | None = Field(
        default=None, gt=0.0, description="a shard running longer has its worker restarted and counts as failed"
    )
    lock_stale_s: float = Field(
        default=120.0, gt=0.0,
        description="a run lock held from another host whose heartbeat is older than this is taken over",
    )
    early_drops: bool = Field(
        default=True,
        description="drop the samples the weak mask already rules out before removal, which runs on the rest; "
        "what is written is the same either way",
    )


# How a run is executed does not change what it writes, so these may differ on resume.
EXECUTION_ONLY = {
    "executor", "address", "workers", "gpus_per_worker", "cpus_per_worker",
    "max_attempts", "object_store_memory_mb", "cpu_threads",
    "worker_start_timeout_s", "shard_timeout_s", "lock_stale_s", "early_drops",
}
