"""The run directory: frozen config, which shards are whole, and the summary."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from pipeline import __version__
from schemas.config import RunConfig
from schemas.records import (
    HEATMAP_FIELD,
    IMAGE_FIELDS,
    MASK_FIELD,
    METADATA_FIELD,
    RunManifest,
    RunSummary,
    ShardStats,
    background_field,
)
from stages.write import TEMP_PREFIX, atomic_write_bytes


class RunDirError(RuntimeError):
    """The directory cannot take this run; the message says why and what to do."""


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.manifest_path = self.root / "run.json"
        self.summary_path = self.root / "summary.json"

    def tar_path(self, shard: int) -> Path:
        return self.shards / f"{shard_name(shard)}.tar"

    def stats_path(self, shard: int) -> Path:
        return self.shards / f"{shard_name(shard)}.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> RunManifest:
        if not self.exists():
            raise RunDirError(f"{self.root}: not a maskmint run directory (no run.json)")
        return RunManifest.model_validate_json(self.manifest_path.read_text())

    def prepare(self, config: RunConfig) -> RunManifest:
        """Freeze the config on first use; refuse a different config later."""
        digest = config.config_hash()
        if self.exists():
            manifest = self.manifest()
            if manifest.config_hash != digest:
                raise RunDirError(
                    f"{self.root} was started with a different config (hash {manifest.config_hash}, "
                    f"this one {digest}); resume with the original config or choose another --out"
                )
            return manifest
        fmt = config.output.image_format
        manifest = RunManifest(
            maskmint_version=__version__,
            config_hash=digest,
            planned_samples=config.output.samples,
            planned_shards=config.num_shards,
            classes=config.class_names(),
            fields={
                "image": IMAGE_FIELDS[fmt],
                "mask": MASK_FIELD,
                "background": background_field(fmt),
                "heatmap": HEATMAP_FIELD,
                "metadata": METADATA_FIELD,
            },
            config=config.to_json_dict(),
        )
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"{self.root}: cannot create the run directory ({error.strerror})") from None
        atomic_write_bytes(self.manifest_path, manifest.model_dump_json(indent=2).encode())
        return manifest

    def complete_shards(self) -> set[int]:
        """A shard is whole when its stats json exists (written after its tar)."""
        done = set()
        for stats in self.shards.glob("[0-9]*.json"):
            if stats.with_suffix(".tar").is_file():
                done.add(int(stats.stem))
        return done

    def clean_strays(self) -> list[Path]:
        """Temp files of killed writers, and tars whose stats never landed: they are redone."""
        stray = list(self.shards.glob(f"{TEMP_PREFIX}*.tmp-*"))
        stray += [t for t in self.shards.glob("[0-9]*.tar") if not t.with_suffix(".json").is_file()]
        for path in stray:
            path.unlink(missing_ok=True)
        return stray

    def pending(self, num_shards: int) -> list[int]:
        done = self.complete_shards()
        return [s for s in range(num_shards) if s not in done]

    def shard_stats(self) -> list[ShardStats]:
        return [ShardStats.model_validate_json(self.stats_path(s).read_text()) for s in sorted(self.complete_shards())]

    def summarise(self, failed: dict[int, str] | None = None) -> RunSummary:
        manifest = self.manifest()
        stats = self.shard_stats()
        reasons = Counter(reason for s in stats for reason in s.dropped.values())
        seconds: dict[str, float] = defaultdict(float)
        for s in stats:
            for stage, value in s.seconds.items():
                seconds[stage] += value
        done = {s.shard for s in stats}
        pending = [s for s in range(manifest.planned_shards) if s not in done]
        return RunSummary(
            planned_samples=manifest.planned_samples,
            planned_shards=manifest.planned_shards,
            complete_shards=len(done),
            pending_shards=pending,
            failed_shards=failed or {},
            written=sum(len(s.written) for s in stats),
            dropped=sum(len(s.dropped) for s in stats),
            dropped_by_reason=dict(sorted(reasons.items())),
            seconds_by_stage={k: round(v, 3) for k, v in sorted(seconds.items())},
            whole=not pending,
        )

    def write_summary(self, failed: dict[int, str] | None = None) -> RunSummary:
        summary = self.summarise(failed)
        atomic_write_bytes(self.summary_path, json.dumps(summary.model_dump(mode="json"), indent=2).encode())
        return summary
