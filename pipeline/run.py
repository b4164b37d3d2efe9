"""A whole run: prepare the directory, plan, execute the pending shards, summarise."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.executors import run_local
from pipeline.plan import Plan, shard_range
from pipeline.rundir import RunDir
from schemas.config import RunConfig
from schemas.records import RunSummary
from stages.models import load_tokenizer


def run(config: RunConfig, out: Path | str, show_progress: bool = True) -> RunSummary:
    rundir = RunDir(out)
    rundir.prepare(config)
    rundir.clean_strays()
    pending = rundir.pending(config.num_shards)
    failed: dict[int, str] = {}
    try:
        if pending:
            Plan(config, load_tokenizer(config.model)).preflight()
            total = sum(len(shard_range(config, s)) for s in pending)
            with tqdm(
                total=total, unit="sample", desc="maskmint", disable=not show_progress, file=sys.stderr, mininterval=1.0
            ) as bar:
                failed = run_local(config, rundir.root, pending, bar.update)
    finally:
        summary = rundir.write_summary(failed)
    return summary
