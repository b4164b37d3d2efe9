"""The run directory: frozen config, which shards are whole, and the summary."""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from maskmint import __version__
from maskmint.pipeline import quota
from maskmint.pipeline.lock import HISTORY_NAME
from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import (
    HEATMAP_FIELD,
    IMAGE_FIELDS,
    MASK_FIELD,
    METADATA_FIELD,
    RunManifest,
    RunSummary,
    ShardStats,
    background_field,
)
from maskmint.stages.durable import TEMP_NAME, atomic_write_bytes, file_sha256

SHARD_FILE = re.compile(r"^(\d{6})\.(tar|json)$")


class RunDirError(RuntimeError):
    """The directory cannot take this run; the message says why and what to do."""


class DamagedShard(ValueError):
    """A shard on disk that is not whole; the message says what is wrong."""


@dataclass
class ShardScan:
    complete: dict[int, ShardStats] = field(default_factory=dict)
    damaged: dict[int, str] = field(default_factory=dict)


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
        try:
            return RunManifest.model_validate_json(self.manifest_path.read_bytes())
        except (ValueError, OSError) as error:
            raise RunDirError(f"{self.manifest_path}: unreadable ({type(error).__name__}); it is not a run maskmint can resume") from None

    def rounds(self) -> list[quota.TopUp]:
        return quota.read_rounds(self.root)

    def planned_shards(self, manifest: RunManifest | None = None) -> int:
        """The planned shards and those of the top-up rounds planned so far (quotas)."""
        manifest = manifest or self.manifest()
        return quota.planned_shards(manifest.planned_samples, manifest.config["output"]["shard_size"], self.rounds())

    def check_config(self, digest: str) -> None:
        """Refuse a config other than the one the directory was started with."""
        if self.exists():
            manifest = self.manifest()
            if manifest.config_hash != digest:
                raise RunDirError(
                    f"{self.root} was started with a different config (hash {manifest.config_hash}, "
                    f"this one {digest}); resume with the original config or choose another --out"
                )

    def create(self) -> None:
        try:
            self.shards.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"{self.root}: cannot create the run directory ({error.strerror})") from None

    def prepare(self, config: RunConfig, digest: str) -> RunManifest:
        """Freeze the config on first use; refuse a different config later."""
        self.check_config(digest)
        if self.exists():
            return self.manifest()
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
        self.create()
        atomic_write_bytes(self.manifest_path, manifest.model_dump_json(indent=2).encode())
        return manifest

    def scan(self, verify: bool = False) -> ShardScan:
        """Which planned shards are whole on disk, and which are there but damaged (redone on
        resume). Whole: the stats json parses, names its shard, and the tar has the recorded
        size and exactly the members the json lists. `verify` also reads every tar through
        and checks its digest."""
        manifest = self.manifest()
        planned = self.planned_shards(manifest)
        fields = list(manifest.fields.values())
        found: dict[int, set[str]] = defaultdict(set)
        for entry in os.scandir(self.shards) if self.shards.is_dir() else ():
            match = SHARD_FILE.match(entry.name)
            if match and int(match[1]) < planned:
                found[int(match[1])].add(match[2])
        scan = ShardScan()
        for shard in sorted(found):
            if found[shard] == {"tar"}:
                continue  # its stats never landed: pending
            try:
                scan.complete[shard] = self._check(shard, found[shard], fields, verify)
            except DamagedShard as error:
                scan.damaged[shard] = str(error)
        return scan

    def _check(self, shard: int, present: set[str], fields: list[str], verify: bool) -> ShardStats:
        try:
            stats = ShardStats.model_validate_json(self.stats_path(shard).read_bytes())
        except (ValueError, OSError) as error:
            raise DamagedShard(f"stats json unreadable ({type(error).__name__})") from None
        if stats.shard != shard:
            raise DamagedShard(f"stats json names shard {stats.shard}")
        if "tar" not in present:
            raise DamagedShard("tar missing")
        tar_path = self.tar_path(shard)
        if stats.tar_bytes is not None and tar_path.stat().st_size != stats.tar_bytes:
            raise DamagedShard(f"tar is {tar_path.stat().st_size} bytes, its stats say {stats.tar_bytes}")
        expected = {f"{key}.{field}" for key in stats.written for field in fields}
        try:
            with tarfile.open(tar_path) as tar:
                members = tar.getmembers()
                if verify:
                    for member in members:
                        tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            raise DamagedShard(f"tar unreadable ({error})") from None
        names = [m.name for m in members]
        if len(names) != len(set(names)) or set(names) != expected:
            raise DamagedShard(f"tar members ({len(names)}) disagree with its stats json ({len(expected)} expected)")
        if verify and stats.tar_sha256 is not None and file_sha256(tar_path) != stats.tar_sha256:
            raise DamagedShard("tar digest differs from its stats json")
        return stats

    def complete_shards(self) -> set[int]:
        return set(self.scan().complete)

    def temp_files(self) -> list[Path]:
        """Half-written files of writers killed before their rename: only names maskmint's own
        temp scheme makes, so a user's hidden file is never taken for one."""
        if not self.shards.is_dir():
            return []
        return [Path(e.path) for e in os.scandir(self.shards) if TEMP_NAME.match(e.name)]

    def clean_strays(self, scan: ShardScan) -> list[Path]:
        """What a resume redoes: temp files of killed writers, planned tars whose stats never
        landed, and damaged planned shards. Anything else in shards/ is the user's and stays."""
        stray = self.temp_files()
        planned = self.planned_shards()
        stray += [self.tar_path(s) for s in range(planned) if s not in scan.complete and s not in scan.damaged
                  and self.tar_path(s).is_file() and not self.stats_path(s).exists()]
        for shard in scan.damaged:
            stray += [self.tar_path(shard), self.stats_path(shard)]
        for path in stray:
            path.unlink(missing_ok=True)
        return stray

    def remove_temp_files(self) -> None:
        for path in self.temp_files():
            path.unlink(missing_ok=True)

    def forget(self) -> None:
        """Undo a run that never made a whole shard: its manifest and writer history go, an empty
        shards/ folder too, so the directory is as before (the lock is its holder's to release)."""
        for path in (self.manifest_path, self.summary_path, self.root / HISTORY_NAME, self.root / quota.ROUNDS_NAME):
            path.unlink(missing_ok=True)
        try:
            self.shards.rmdir()
        except OSError:
            pass  # not empty: files of the user's stay

    def remove_if_empty(self) -> None:
        try:
            self.root.rmdir()
        except OSError:
            pass

    def pending(self, scan: ShardScan) -> list[int]:
        return [s for s in range(self.planned_shards()) if s not in scan.complete]

    def shard_stats(self) -> list[ShardStats]:
        return list(self.scan().complete.values())

    def summarise(
        self, failed: dict[int, str] | None = None, verify: bool = False, scan: ShardScan | None = None
    ) -> RunSummary:
        manifest = self.manifest()
        scan = scan or self.scan(verify)
        stats = list(scan.complete.values())
        reasons = Counter(reason for s in stats for reason in s.dropped.values())
        seconds: dict[str, float] = defaultdict(float)
        for s in stats:
            for stage, value in s.seconds.items():
                seconds[stage] += value
        done = {s.shard for s in stats}
        rounds = self.rounds()
        planned = self.planned_shards(manifest)
        pending = [s for s in range(planned) if s not in done]
        attempts, kept = quota.tally(stats)
        names = manifest.classes
        return RunSummary(
            planned_samples=quota.planned_samples(manifest.planned_samples, rounds),
            planned_shards=planned,
            top_up_rounds=len(rounds),
            attempts_per_class={names[c]: n for c, n in sorted(attempts.items()) if c in names},
            kept_per_class={names[c]: kept.get(c, 0) for c in sorted(attempts) if c in names},
            complete_shards=len(done),
            pending_shards=pending,
            failed_shards=failed or {},
            damaged_shards=scan.damaged,
            written=sum(len(s.written) for s in stats),
            dropped=sum(len(s.dropped) for s in stats),
            dropped_by_reason=dict(sorted(reasons.items())),
            seconds_by_stage={k: round(v, 3) for k, v in sorted(seconds.items())},
            whole=not pending,
        )

    def write_summary(self, failed: dict[int, str] | None, scan: ShardScan) -> RunSummary:
        summary = self.summarise(failed, scan=scan)
        atomic_write_bytes(self.summary_path, json.dumps(summary.model_dump(mode="json"), indent=2).encode())
        return summary
