"""Promises of the failure-handling section, each tested where it can fail: strays left alone,
fencing in a real run, what the config hash covers, exit codes, every disk write failing."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from maskmint import launch
from bench.chaos import audit
from maskmint.pipeline.lock import HISTORY_NAME, LOCK_NAME, Holder, RunLock, process_start
from maskmint.pipeline.rundir import RunDir
from maskmint.pipeline.testing.faults import FAULT_ENV, held_marker, release_marker

REPO = Path(__file__).resolve().parents[1]


def run_cli(config_path, out, *extra) -> int:
    return launch.main(["run", "--config", str(config_path), "--out", str(out), "--quiet", *extra])


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "shards").iterdir())


# -- strays -----------------------------------------------------------------------------------


def test_files_that_are_not_planned_shards_survive_a_resume_byte_for_byte(small, write_config, tmp_path):
    config_path, out = write_config(small), tmp_path / "run"
    assert run_cli(config_path, out) == 0
    shards = out / "shards"
    strays = {
        "12.json": b"{}",
        "000001 copy.json": b'{"mine": true}',
        "000099.tar": (shards / "000000.tar").read_bytes(),  # out of plan, alone
        "000098.tar": (shards / "000001.tar").read_bytes(),  # out of plan, with its json
        "000098.json": (shards / "000001.json").read_bytes(),
        "notes.txt": b"my notes",
        ".hidden.tmp-of-mine": b"not maskmint's temp name",
    }
    for name, data in strays.items():
        (shards / name).write_bytes(data)
    (shards / "000002.tar").unlink()  # a planned shard to redo
    (shards / "000002.json").unlink()
    (shards / "000002.tar").write_bytes(b"a planned tar whose stats never landed")
    assert run_cli(config_path, out) == 0
    for name, data in strays.items():
        assert (shards / name).read_bytes() == data, name
    assert audit(out) == []


# -- fencing in a real run ----------------------------------------------------------------------


def take_over(out: Path) -> Holder:
    """What a second run does to a directory whose lock it judged stale: its own lock in
    place (atomically), and its line in the writer history."""
    newer = Holder("5ec0dd", "another-host", 4242, None, time.time())
    tmp = out / ".lock.json.takeover"
    tmp.write_text(json.dumps(asdict(newer)))
    os.replace(tmp, out / LOCK_NAME)
    with open(out / HISTORY_NAME, "a") as history:
        history.write(json.dumps(asdict(newer)) + "\n")
    return newer


def take_over_while_shard_1_is_mid_batch(out: Path, timeout: float = 120.0) -> threading.Thread:
    """Once shard 0 is published and shard 1 is held inside its first mini-batch (FAULT_ENV
    `1:hold`), take the directory over, then let shard 1 go on."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (out / "shards" / "000000.json").exists() and held_marker(out, 1).exists():
                take_over(out)
                release_marker(out, 1).touch()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def assert_taken_over_cleanly(out: Path, err: str) -> None:
    assert "taken over" in err and "another-host pid 4242" in err, err
    names = shard_files(out)
    assert "000001.tar" not in names and "000001.json" not in names, names
    assert not [n for n in names if n.startswith(".")], names  # no temp file of shard 1 (or any)
    assert {"000000.tar", "000000.json"} <= set(names)
    assert json.loads((out / LOCK_NAME).read_text())["token"] == "5ec0dd"  # the old run left the new lock
    assert not (out / "summary.json").exists() and not (out / "README.md").exists()
    history = [json.loads(line) for line in (out / HISTORY_NAME).read_text().splitlines()]
    published = json.loads((out / "shards" / "000000.json").read_text())
    assert published["worker"]["run"] == history[0]["token"] != "5ec0dd"


def run_taken_over(config_path: Path, out: Path, monkeypatch, capsys) -> None:
    """A real run whose directory is taken over while shard 1 is mid-batch: it must stop
    with exit 1, naming the takeover, and leave nothing of shard 1."""
    monkeypatch.setenv(FAULT_ENV, "1:hold")
    watcher = take_over_while_shard_1_is_mid_batch(out)
    assert run_cli(config_path, out) == 1
    watcher.join(5)
    assert_taken_over_cleanly(out, capsys.readouterr().err)


def test_a_takeover_mid_shard_stops_the_local_run_and_publishes_nothing(small, write_config, tmp_path, monkeypatch, capsys):
    run_taken_over(write_config(small), tmp_path / "run", monkeypatch, capsys)


def test_every_published_stats_json_names_a_writer_of_the_history(small, write_config, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1")
    config_path, out = write_config(small), tmp_path / "run"
    assert run_cli(config_path, out) == 1  # two runs write this directory
    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(config_path, out) == 0
    tokens = [json.loads(line)["token"] for line in (out / HISTORY_NAME).read_text().splitlines()]
    writers = [json.loads((out / "shards" / f"00000{s}.json").read_text())["worker"]["run"] for s in range(3)]
    assert len(tokens) == 2 and writers == [tokens[0], tokens[1], tokens[0]]
    # the audit sees a json without a token, or with one no run held
    path = out / "shards" / "000002.json"
    stats = json.loads(path.read_text())
    stats["worker"].pop("run")
    path.write_text(json.dumps(stats))
    assert any("carries no run token" in p for p in audit(out))
    stats["worker"]["run"] = "0ddba11"
    path.write_text(json.dumps(stats))
    assert any("not a holder" in p for p in audit(out))


# -- the config hash ---------------------------------------------------------------------------


@pytest.fixture
def with_files(small, tmp_path) -> dict:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "prompts.jsonl").write_text(
        '{"prompt": "a photo of a dog in a park", "concepts": ["dog"]}\n'
        '{"prompt": "a zebra in a kitchen", "concepts": ["zebra"]}\n'
    )
    (inputs / "classes.txt").write_text("1,dog\n7,zebra\n")
    data = copy.deepcopy(small)
    data["prompts"] = {"file": str(inputs / "prompts.jsonl"), "concepts_file": str(inputs / "classes.txt")}
    return data


@pytest.mark.parametrize(("name", "edit"), [
    ("prompts.jsonl", lambda text: text.replace("in a park", "in a kitchen")),
    ("classes.txt", lambda text: text.replace("1,dog", "1,dog,puppy")),
])
def test_an_edited_input_file_is_a_different_config(with_files, write_config, tmp_path, capsys, name, edit):
    config_path, out = write_config(with_files), tmp_path / "run"
    assert run_cli(config_path, out) == 0
    path = tmp_path / "inputs" / name
    path.write_text(edit(path.read_text()))
    capsys.readouterr()
    assert run_cli(config_path, out) == 2
    assert "different config" in capsys.readouterr().err


def test_the_same_input_files_moved_resume_with_their_shards_untouched(with_files, write_config, tmp_path):
    out = tmp_path / "run"
    assert run_cli(write_config(with_files), out) == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    shutil.move(tmp_path / "inputs", tmp_path / "moved")
    moved = copy.deepcopy(with_files)
    moved["prompts"] = {"file": "moved/prompts.jsonl", "concepts_file": "moved/classes.txt"}  # relative, too
    assert run_cli(write_config(moved, "moved.yaml"), out) == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()} == before


# -- exit codes ---------------------------------------------------------------------------------


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_user_path_mistakes_exit_2_in_one_line(small, write_config, tmp_path, capsys):
    config_path = write_config(small)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert run_cli(tmp_path / "absent.yaml", tmp_path / "run") == 2
    assert "not found" in one_error_line(capsys)
    assert run_cli(tmp_path, tmp_path / "run") == 2  # a folder given as the config
    one_error_line(capsys)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    assert run_cli(tmp_path / "binary.yaml", tmp_path / "run") == 2
    assert "UTF-8" in one_error_line(capsys)
    assert run_cli(config_path, a_file) == 2  # a file where the run directory must go
    one_error_line(capsys)
    assert run_cli(config_path, a_file / "below") == 2
    one_error_line(capsys)


def test_a_full_disk_outside_the_shards_exits_1_with_the_retry_hint(small, write_config, tmp_path, monkeypatch, capsys):
    from maskmint.pipeline import rundir

    original = rundir.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", full)
    config_path, out = write_config(small), tmp_path / "run"
    assert run_cli(config_path, out) == 1
    line = one_error_line(capsys)
    assert "No space left on device" in line and "summary.json" in line
    assert line.endswith(f"re-run to resume: maskmint run --config {config_path} --out {out}")
    monkeypatch.setattr(rundir, "atomic_write_bytes", original)
    assert run_cli(config_path, out) == 0 and audit(out) == []


@pytest.mark.parametrize("where", ["stats json", "tar fsync", "tar rename", "stats rename"])
def test_a_disk_failing_on_any_shard_write_leaves_nothing_of_it(where, small, write_config, tmp_path, monkeypatch, capsys):
    """ENOSPC or EIO on each durable step of shard 1 (the tar's own write is in test_hardening)."""
    fsync, replace = os.fsync, os.replace

    def failing_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        wanted = ".000001.json.tmp" if where == "stats json" else ".000001.tar.tmp"
        if where in ("stats json", "tar fsync") and wanted in target:
            raise OSError(errno.EIO if where == "tar fsync" else errno.ENOSPC, "injected")
        return fsync(fd)

    def failing_replace(src, dst, *args, **kwargs):
        name = {"tar rename": "000001.tar", "stats rename": "000001.json"}.get(where)
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, "injected")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "replace", failing_replace)
    config_path, out = write_config(small), tmp_path / "run"
    assert run_cli(config_path, out) == 1
    assert "shard 000001 failed: OSError" in capsys.readouterr().err
    assert shard_files(out) == [f"00000{s}.{e}" for s in (0, 2) for e in ("json", "tar")]
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert run_cli(config_path, out) == 0 and audit(out) == []


def test_ctrl_c_exits_130_and_the_run_resumes(config_dict, write_config, tmp_path):
    data = copy.deepcopy(config_dict)
    data["output"] = {"samples": 60, "shard_size": 3}
    config_path, out = write_config(data), tmp_path / "run"
    command = [sys.executable, "launch.py", "run", "--config", str(config_path), "--out", str(out), "--quiet"]
    # shard 1 waits after its first mini-batch, so the signal always lands mid-run
    # SIGINT back to its default in the child: a test run started in the background by a
    # shell without job control inherits it ignored, and Python then installs no handler.
    driver = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, **{FAULT_ENV: "1:hold"}),
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not held_marker(out, 1).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / LOCK_NAME).exists()  # released on the way out
    assert len(RunDir(out).scan().complete) < 20  # it did stop
    assert run_cli(config_path, out) == 0 and audit(out) == []


# -- the run lock --------------------------------------------------------------------------------


def test_a_lock_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = Holder("a11ve", socket.gethostname(), alive.pid, process_start(alive.pid), time.time())
        (tmp_path / LOCK_NAME).write_text(json.dumps(asdict(holder)))
        with pytest.raises(Exception, match=f"pid {alive.pid}"):
            RunLock(tmp_path).acquire()  # the holder's very process: alive
        reused = asdict(holder) | {"pid_start": "1"}  # that pid, but a process started at another time
        (tmp_path / LOCK_NAME).write_text(json.dumps(reused))
        lock = RunLock(tmp_path)
        assert lock.acquire().token != "a11ve"
        lock.release()
    finally:
        alive.kill()
        alive.wait()


def test_a_half_written_lock_is_held_until_stale_then_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"token": "abc", "ho')
    with pytest.raises(Exception, match="unreadable \\(half-written\\) lock"):
        RunLock(tmp_path, stale_after_s=30).acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(tmp_path, stale_after_s=30)
    holder = lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == holder.token
    lock.release()


def test_the_heartbeat_never_refreshes_a_lock_taken_over(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=1.2)
    lock.acquire()
    try:
        take_over(tmp_path)
        old = time.time() - 60
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.8)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime > 50
    finally:
        lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "5ec0dd"  # release leaves it too


# -- config errors before any work ------------------------------------------------------------


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": {"path": str(REPO / "assets" / "tiny-sd")}, "generation": {"height": 40}},
     "generation.height: 40 is not a multiple of 16 (the VAE's factor 4 x the unet's 4)"),
    ({"capture": {"steps": [3]}}, "capture.steps: step 3 does not exist with generation.steps 3"),
    ({"capture": {"skip_downscales": [1, 2]}}, "capture.skip_downscales: [1, 2] leaves out every cross-attention"),
    ({"capture": {"self_attention": True, "self_attention_downscale": 4}}, "capture.self_attention_downscale: this UNet"),
    ({"removal": {"steps": 3, "strength": 0.3}}, "removal.strength: 0.3 of removal.steps 3 leaves no denoising step"),
])
def test_what_the_models_config_files_refute_is_refused_by_plan_and_run(changes, message, small, write_config, tmp_path,
                                                                        capsys):
    data = copy.deepcopy(small)
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = write_config(data)
    assert launch.main(["plan", "--config", str(path)]) == 2
    assert message in one_error_line(capsys)
    assert run_cli(path, tmp_path / "run") == 2
    assert message in one_error_line(capsys) and not (tmp_path / "run").exists()


def test_a_first_shard_failing_the_same_way_every_try_is_exit_2_and_leaves_no_directory(small, write_config, tmp_path,
                                                                                       monkeypatch, capsys):
    monkeypatch.setenv(FAULT_ENV, "0")
    small["execution"]["max_attempts"] = 3
    out = tmp_path / "run"
    assert run_cli(write_config(small), out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: every try of the first shard fails the same way") and "injected fault" in err[-1]
    assert len([line for line in err if "will be retried" in line]) == 1  # stopped at the second identical failure
    assert not out.exists()
    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(write_config(small), out) == 0  # the same directory, the same config: not "a different config"


def test_a_disk_failing_on_every_try_of_the_first_shard_is_not_a_config_error(small, write_config, tmp_path, monkeypatch,
                                                                            capsys):
    import webdataset as wds

    def full_disk(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wds.TarWriter, "write", full_disk)
    assert run_cli(write_config(small), tmp_path / "run") == 1
    assert "re-run to retry them" in capsys.readouterr().err
