"""The shard worker: holds the models for its life and turns a shard id into a whole shard."""

from __future__ import annotations

import functools
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from maskmint.pipeline.lock import Fence
from maskmint.pipeline.plan import Plan
from maskmint.pipeline.rundir import RunDir
from maskmint.pipeline.testing.faults import injected_fault
from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import BatchDone, PlannedSample, SampleMetadata, ShardStats, ShardWritten
from maskmint.stages.annotate import Annotate, at_source_size
from maskmint.stages.filter import EarlyFilter, Filter
from maskmint.stages.generate import Generate
from maskmint.stages.loading import execution_device, offload, offload_like, pick_device, pick_dtype
from maskmint.stages.models import load_inpainting, load_text_to_image
from maskmint.stages.refine import Refine
from maskmint.stages.remove import Remove
from maskmint.stages.weak_mask import WeakMask
from maskmint.stages.write import encode_sample, write_shard

@contextmanager
def timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def as_columns(samples: list[PlannedSample]) -> dict:
    return {
        "key": [s.key for s in samples],
        "seed": [s.seed for s in samples],
        "prompt": [s.prompt for s in samples],
        "negative_prompt": [s.negative_prompt for s in samples],
        "background_prompt": [s.background_prompt for s in samples],
        "background_negative_prompt": [s.background_negative_prompt for s in samples],
        "concepts": [s.concepts for s in samples],
        "image_path": [s.image for s in samples],
    }


def mini_batches(samples: list[PlannedSample], size: int) -> Iterator[list[PlannedSample]]:
    """Consecutive runs of at most `size` samples of one source (generated, or real images)."""
    batch: list[PlannedSample] = []
    for sample in samples:
        if batch and (len(batch) == size or (batch[0].image is None) != (sample.image is None)):
            yield batch
            batch = []
        batch.append(sample)
    if batch:
        yield batch


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([q[k] for q in scores])) for k in scores[0]} if scores else {}


class ShardWorker:
    def __init__(self, config: RunConfig, root: Path | str, pipe=None, run_token: str | None = None):
        """`pipe` (a loaded StableDiffusionPipeline) skips loading config.model: for benchmarks.
        `run_token` is the run lock this worker writes under; it publishes nothing once the
        directory belongs to another run."""
        self.config = config
        self.rundir = RunDir(root)
        self.fence = Fence(root, run_token)
        device = pick_device(config.model.device) if pipe is None else execution_device(pipe)
        if pipe is None:
            pipe = load_text_to_image(config.model, device, pick_dtype(config.model.dtype, device))
        self.generate = Generate(pipe, config.generation, config.capture)
        self.plan = Plan(config, self.generate.layout, root)
        family, inpaint = self.generate.family, load_inpainting(pipe, config.model)
        cell_px = (pipe.vae_scale_factor * family.map_cell(config.capture, family.denoiser(pipe).config)
                   if config.mask.guide_px == "auto" else None)
        self.weak_mask = WeakMask(config.mask, model_cell_px=cell_px)
        self.remove = Remove(inpaint, config.removal, family.removal_prompts(self.generate.layout),
                             reuse_latents=family.reuses_generation_latents(family.denoiser(inpaint).config),
                             denoiser=family.denoiser(inpaint))
        # offload last: the hooks must wrap the networks as they run (processors, adapter in)
        offload(pipe, config.model.offload, device)
        offload_like(inpaint, pipe)
        self.refine = Refine(config.refine)
        self.early_filter = EarlyFilter(config.filter, config.refine.dilate_px)
        self.filter = Filter(config.filter)
        self.cpu = ThreadPoolExecutor(config.execution.cpu_threads, thread_name_prefix="maskmint-cpu")
        self.parameters = config.model_dump(
            mode="json", include={"generation", "capture", "mask", "removal", "refine", "filter"}
        )
        self.annotated_parameters = {**self.parameters, "annotate": config.annotate.model_dump(mode="json")}
        self.identity = {"host": socket.gethostname(), "pid": str(os.getpid()), "device": str(device)}
        if run_token is not None:
            self.identity["run"] = run_token

    def run_shard(self, shard: int) -> Iterator[BatchDone | ShardWritten]:
        """A `BatchDone` as each mini-batch leaves the model, then `ShardWritten`."""
        samples = self.plan.shard(shard)
        seconds: dict[str, float] = defaultdict(float)
        finishing = []
        for number, planned in enumerate(mini_batches(samples, self.config.generation.batch_size)):
            self.fence.check()  # a taken-over run stops within one mini-batch
            batch = self.model_stages(as_columns(planned), seconds)
            # CPU stages run beside the next batch's generation.
            finishing.append(self.cpu.submit(self._finish, planned, batch))
            if number == 0:
                injected_fault(shard, self.rundir.root)
            yield BatchDone(len(planned))

        encoded, dropped, qualities, early = [], {}, {}, []
        for future in finishing:
            batch_encoded, batch_dropped, batch_quality, batch_seconds, batch_early = future.result()
            encoded += batch_encoded
            dropped.update(batch_dropped)
            early += batch_early
            qualities.update(batch_quality)
            for stage, value in batch_seconds.items():
                seconds[stage] += value
        stats = ShardStats(
            shard=shard,
            planned=len(samples),
            written=[s["__key__"] for s in encoded],
            dropped=dropped,
            seconds={},
            mask=mean_scores(list(qualities.values())),
            scores=qualities,
            classes={s.key: [c.class_id for c in s.concepts] for s in samples},
            sources={s.key: s.image for s in samples if s.image is not None},
            decided_before_removal=early,
            worker=self.identity,
        )
        with timed(seconds, "write"):
            stats.seconds = {k: round(v, 4) for k, v in seconds.items()}
            stats = write_shard(
                self.rundir.tar_path(shard), self.rundir.stats_path(shard), encoded, stats, self.fence.check
            )
        yield ShardWritten(stats)

    @functools.cached_property
    def annotate(self) -> Annotate:
        """Built on the first real image: it shares the generator's components and capture."""
        generate = self.generate
        return Annotate(generate.pipe, generate.family, generate.layout, generate.store,
                        (generate.height, generate.width), self.config.annotate, self.config.capture)

    def model_stages(self, batch: dict, seconds: dict[str, float]) -> dict:
        """generate (with capture), or annotate for real images -> weak mask -> early drops -> remove:
        the stages that use the model. With `execution.early_drops`, removal skips the samples the
        weak mask already rules out."""
        first = ("annotate", self.annotate) if batch["image_path"][0] is not None else ("generate", self.generate)
        self._apply(batch, seconds, first, ("weak_mask", self.weak_mask), ("early_drop", self.early_filter))
        ruled_out = [reason is not None for reason in batch["early_drop"]]
        survivors = [i for i, out in enumerate(ruled_out) if not out]
        # without early drops the ruled-out samples are still removed, in a call of their own,
        # so that the survivors' removal batch (and so their bytes) is the same either way
        batch["removal_groups"] = [survivors] if self.config.execution.early_drops else \
            [survivors, [i for i, out in enumerate(ruled_out) if out]]
        self._apply(batch, seconds, ("remove", self.remove))
        batch.pop("latents", None)  # device memory; the CPU stages do not need it
        return batch

    def mask_stages(self, batch: dict, seconds: dict[str, float]) -> dict:
        """refine -> filter: CPU only."""
        return self._apply(batch, seconds, ("refine", self.refine), ("filter", self.filter))

    @staticmethod
    def _apply(batch: dict, seconds: dict[str, float], *stages) -> dict:
        for name, stage in stages:
            with timed(seconds, name):
                batch.update(stage(batch))
        return batch

    def _finish(self, planned: list[PlannedSample], batch: dict) -> tuple[list[dict], dict, dict, dict, list[str]]:
        seconds: dict[str, float] = defaultdict(float)
        self.mask_stages(batch, seconds)
        encoded, dropped, qualities = [], {}, {}
        output = self.config.output
        at_source = self.config.annotate.store_size == "source"
        with timed(seconds, "encode"):
            for i, sample in enumerate(planned):
                if batch["drop"][i] is not None:
                    dropped[sample.key] = batch["drop"][i]
                    continue
                columns = batch["image"][i], batch["mask"][i], batch["background"][i], batch["heat"][i]
                if at_source and sample.image is not None:
                    columns = at_source_size(sample.image, *columns[1:], self.config.annotate.fit)
                height, width = columns[1].shape
                quality = {k: round(v, 5) for k, v in batch["quality"][i].items()}
                metadata = SampleMetadata(
                    key=sample.key,
                    prompt=sample.prompt,
                    background_prompt=sample.background_prompt,
                    negative_prompt=sample.negative_prompt,
                    background_negative_prompt=sample.background_negative_prompt,
                    concepts=sample.concepts,
                    seed=sample.seed,
                    model=self.config.model.path,
                    width=width,
                    height=height,
                    parameters=self.parameters if sample.image is None else self.annotated_parameters,
                    quality=quality,
                    source=batch["source"][i] if "source" in batch else None,
                )
                encoded.append(
                    encode_sample(
                        sample.key,
                        *columns,
                        metadata,
                        output.image_format,
                        output.jpeg_quality,
                    )
                )
                qualities[sample.key] = quality
        early = [s.key for s, reason in zip(planned, batch["early_drop"]) if reason is not None]
        return encoded, dropped, qualities, seconds, early

    def close(self) -> None:
        self.cpu.shutdown(wait=True)
