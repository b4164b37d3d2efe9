"""A whole run: prepare the directory, plan, execute the pending shards, summarise."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from maskmint.pipeline import quota
from maskmint.pipeline.card import write_card
from maskmint.pipeline.executors import EXECUTORS, RunCannotStart
from maskmint.pipeline.lock import Fenced, LockHeld, RunLock
from maskmint.pipeline.plan import Plan, shard_range
from maskmint.pipeline.rundir import RunDir, RunDirError, ShardScan
from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import RunSummary, ShardStats
from maskmint.stages.loading import model_fingerprint
from maskmint.stages.models import check_before_loading, load_text_layout


class Progress:
    """One bar over the run's samples, with failed attempts and shards in its postfix."""

    def __init__(self, total: int, enabled: bool):
        self.bar = tqdm(total=total, unit="sample", desc="maskmint", disable=not enabled, file=sys.stderr, mininterval=1.0)
        self.retried = 0
        self.failed: set[int] = set()

    def samples(self, count: int) -> None:
        self.bar.update(count)

    def failure(self, shard: int, error: str, final: bool) -> None:
        if final:
            self.failed.add(shard)
        else:
            self.retried += 1
        self.bar.set_postfix(retried=self.retried, failed=len(self.failed), refresh=False)
        self.bar.write(f"shard {shard:06d} {'failed' if final else 'will be retried'}: {error}", file=sys.stderr)

    def note(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def run(config: RunConfig, out: Path | str, show_progress: bool = True) -> RunSummary:
    """Everything that can be refused is checked before the directory is touched; then the
    directory is locked for this run alone, whole shards are kept, the rest are made."""
    rundir = RunDir(Path(out).expanduser().resolve())  # cluster workers do not share our cwd
    check_before_loading(config)
    Plan(config, load_text_layout(config.model)).preflight()
    digest = config.config_hash(model_fingerprint(config.model))
    rundir.check_config(digest)
    made_root = not rundir.root.exists()
    rundir.create()
    lock = RunLock(rundir.root, config.execution.lock_stale_s)
    try:
        holder = lock.acquire()
    except LockHeld as error:
        raise RunDirError(str(error)) from None
    try:
        return _run_locked(config, rundir, digest, holder.token, show_progress)
    finally:
        lock.release()
        if made_root and not rundir.exists():
            rundir.remove_if_empty()  # a run rolled back (or never prepared) leaves no folder behind


def _run_locked(config: RunConfig, rundir: RunDir, digest: str, token: str, show_progress: bool) -> RunSummary:
    fresh = not rundir.exists()
    rundir.prepare(config, digest)
    scan = rundir.scan()
    for shard, reason in sorted(scan.damaged.items()):
        print(f"shard {shard:06d} is damaged ({reason}): it is redone", file=sys.stderr)
    rundir.clean_strays(scan)
    pending = rundir.pending(scan)
    failed: dict[int, str] = {}
    ran = bool(pending)
    try:
        while True:
            if pending:
                rounds = rundir.rounds()
                progress = Progress(sum(len(shard_range(config, s, rounds)) for s in pending), show_progress)
                try:
                    failed = EXECUTORS[config.execution.executor](config, rundir.root, pending, progress, token)
                finally:
                    progress.close()
            if failed or not (config.output.kept_per_class or config.output.kept):
                break
            pending = _plan_top_up(config, rundir)
            if not pending:
                break
            ran = True
    except Fenced:
        raise  # the directory is the new holder's now: no sweep, no summary, no card from us
    except BaseException as error:
        if isinstance(error, RunCannotStart) and fresh and not rundir.scan().complete:
            rundir.remove_temp_files()
            rundir.forget()  # as if never started: the corrected config is not "a different config"
        else:
            _finish(rundir, failed, ran, scan)
        raise
    return _finish(rundir, failed, ran, scan)


def _plan_top_up(config: RunConfig, rundir: RunDir) -> list[int]:
    """With a quota and every shard whole: the next top-up round's shards, planned and recorded
    before any of them runs (none when the quota is met or its attempts are spent)."""
    rounds = rundir.rounds()
    stats = rundir.shard_stats()
    top_up = quota.next_round(config, stats, rounds)
    short = quota.shortfall(config, stats)
    if top_up is None:
        if short:
            print(f"warning: output.max_samples ({config.output.max_samples}) reached with "
                  f"{quota.describe_shortfall(config, stats, short)}", file=sys.stderr)
        return []
    first = rundir.planned_shards()
    quota.write_rounds(rundir.root, [*rounds, top_up])
    print(f"top-up round {len(rounds) + 1}: {len(top_up.first_classes)} samples for "
          f"{quota.describe_shortfall(config, stats, short)}", file=sys.stderr)
    return list(range(first, rundir.planned_shards()))


def _finish(rundir: RunDir, failed: dict[int, str], ran: bool, scan: ShardScan) -> RunSummary:
    if ran:  # what is on disk changed
        # a worker killed mid-write during this run left its temp file; the executor has
        # returned (this run's writers are done or dead) and the lock keeps other runs out
        rundir.remove_temp_files()
        scan = rundir.scan()
    summary = rundir.write_summary(failed, scan)
    write_card_safely(rundir.root, summary, list(scan.complete.values()))
    return summary


def write_card_safely(root: Path, summary: RunSummary, stats: list[ShardStats]) -> None:
    """The dataset card is a courtesy: failing to write it must not fail the run."""
    try:
        write_card(root, summary, stats)
    except Exception as error:  # noqa: BLE001
        print(f"warning: could not write the dataset card {root / 'README.md'}: {error}", file=sys.stderr)
