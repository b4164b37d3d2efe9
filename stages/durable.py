"""Files that appear whole or not at all: hidden temp names of one pattern, fsync, atomic
replace, digests. The shard writer, the run directory, its lock and its card all write
through these."""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from pathlib import Path

TEMP_PREFIX = "."  # temp files are hidden, so `*.tar` globs never see a half-written shard
# What `temp_path` makes, and nothing else: `.NAME.tmp-HOST-PID-RANDOM`.
TEMP_NAME = re.compile(r"^\.(?P<name>[^/]+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def temp_path(path: Path) -> Path:
    # Host, pid and a random part: pids repeat across the hosts of a shared filesystem.
    return path.with_name(f"{TEMP_PREFIX}{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename or create in `folder` durable."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself still happened
    finally:
        os.close(handle)


def write_temp(path: Path, write) -> Path:
    """Write through `write(handle)` to a temp name beside `path`, fsynced; removed on failure."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = write_temp(path, lambda handle: handle.write(data))
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
