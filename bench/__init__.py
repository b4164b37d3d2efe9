"""Benchmarks and the toy world: measurements of maskmint, not part of the installed package."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path | None, record: dict) -> None:
    """Write a benchmark's record where --json asked for it (nothing when it did not)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
