"""Fault injection for tests and chaos benchmarks of failure handling (off unless the
environment variable is set): "SHARD[:raise|exit|hold][:once]" makes that shard raise, its
worker process exit hard, or wait (marker `.fault-held-SHARD` in the run directory, until
`.fault-release-SHARD` appears), after its first mini-batch; with "once" only on the run's
first try."""

from __future__ import annotations

import os
import time
from pathlib import Path

FAULT_ENV = "MASKMINT_INJECT_FAULT"
HOLD_LIMIT_S = 120.0


def ray_env() -> dict | None:
    """The runtime_env that carries the setting to Ray workers (None when it is not set)."""
    return {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if FAULT_ENV in os.environ else None


def held_marker(root: Path, shard: int) -> Path:
    """Appears in the run directory while a held shard waits."""
    return Path(root) / f".fault-held-{shard}"


def release_marker(root: Path, shard: int) -> Path:
    """Touch it to let a held shard go on."""
    return Path(root) / f".fault-release-{shard}"


def injected_fault(shard: int, root: Path) -> None:
    target, *options = os.environ.get(FAULT_ENV, "").split(":")
    if target.strip() != str(shard):
        return
    if "once" in options:
        marker = root / f".fault-{shard}"
        if marker.exists():
            return
        marker.touch()
    if "exit" in options:
        os._exit(13)
    if "hold" in options:
        held_marker(root, shard).touch()
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not release_marker(root, shard).exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    raise RuntimeError(f"injected fault on shard {shard}")
