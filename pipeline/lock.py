"""One live writer per run directory, across hosts sharing the filesystem.

`DIR/lock.json` is created exclusively by the run that writes the directory. It names the
holder (host, pid, process start, start time) and a random token. The holder touches it
every few seconds; a lock is stale when its holder is known dead (same host: the pid is
gone or is another process now) or its heartbeat is older than `stale_after_s` (another
host). A stale lock is moved aside and replaced, and the token changes with it.

Workers carry the token they were started under and check it just before they publish a
shard (`Fence`): orphaned workers of a killed driver find another token and stop without
writing. Every holder is appended to `DIR/writers.jsonl`, so who wrote a directory, and
when, can be read back.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from maskmint.stages.durable import fsync_dir

LOCK_NAME = "lock.json"
HISTORY_NAME = "writers.jsonl"


class LockHeld(RuntimeError):
    """Another live run holds the directory."""


class Fenced(RuntimeError):
    """This writer's run no longer holds the directory: it must not publish anything, and the
    run stops (no retry, no other shard, no summary: the directory is the new holder's)."""


def process_start(pid: int) -> str | None:
    """Start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return start is None or process_start(pid) in (None, start)


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    pid_start: str | None
    started: float

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(secrets.token_hex(8), socket.gethostname(), pid, process_start(pid), time.time())

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        if self.pid < 0:
            return f"an unreadable (half-written) lock last changed {when}"
        return f"host {self.host} pid {self.pid} (since {when})"


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # half-written by a holder that died creating it
        try:
            return Holder("", "?", -1, None, path.stat().st_mtime)
        except FileNotFoundError:
            return None


class RunLock:
    def __init__(self, root: Path, stale_after_s: float = 120.0):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.stale_after_s = stale_after_s
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def is_stale(self, holder: Holder) -> bool:
        if holder.host == socket.gethostname() and holder.pid > 0:
            return not pid_alive(holder.pid, holder.pid_start)
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > self.stale_after_s

    def live_holder(self) -> Holder | None:
        """The run writing the directory now, if any (for reports; takes nothing)."""
        current = read_holder(self.path)
        return current if current is not None and not self.is_stale(current) else None

    def acquire(self) -> Holder:
        me = Holder.me()
        for _ in range(20):
            try:
                handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = read_holder(self.path)
                if current is None:
                    continue  # released meanwhile
                if not self.is_stale(current):
                    raise LockHeld(
                        f"{self.root} is being written by another run: {current.describe()}; "
                        f"wait for it to finish or stop it (its lock: {self.path})"
                    )
                self._take_over(current)
                continue
            with os.fdopen(handle, "w") as stream:
                stream.write(json.dumps(asdict(me)))
                stream.flush()
                os.fsync(stream.fileno())
            fsync_dir(self.root)
            with open(self.root / HISTORY_NAME, "a") as history:
                history.write(json.dumps(asdict(me)) + "\n")
            self.holder = me
            self._beat = threading.Thread(target=self._heartbeat, name="maskmint-lock", daemon=True)
            self._beat.start()
            return me
        raise LockHeld(f"{self.root}: could not take the run lock {self.path} (it keeps changing hands)")

    def _take_over(self, stale: Holder) -> None:
        """Move the stale lock aside; if what moved is not the lock judged stale (someone took
        over in between), put theirs back."""
        aside = self.path.with_name(f".{LOCK_NAME}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = read_holder(aside)
        if moved is not None and moved.token != stale.token:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        interval = max(0.5, self.stale_after_s / 6)
        while not self._stop.wait(interval):
            current = read_holder(self.path)
            if current is None or self.holder is None or current.token != self.holder.token:
                return  # taken over or removed: never keep another run's lock fresh; the fence stops our writers
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        current = read_holder(self.path)
        if self.holder is not None and current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)
        self.holder = None

    def __enter__(self) -> Holder:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Fence:
    """Checked by a worker just before it publishes: still the directory's writer?"""

    def __init__(self, root: Path | str, token: str | None):
        self.path = Path(root) / LOCK_NAME
        self.token = token

    def check(self) -> None:
        if self.token is None:
            return  # a worker outside any run (benchmarks)
        current = read_holder(self.path)
        if current is None or current.token != self.token:
            holder = current.describe() if current else "no run (its lock was removed)"
            raise Fenced(f"the run directory was taken over: it is now held by {holder}; "
                         "this run stopped and published nothing more")
