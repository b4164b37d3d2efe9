"""Bad input and bad disks: clear errors, nothing written before a config is known good,
one writer per directory, damaged shards found and redone."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import webdataset as wds

from maskmint import launch
from bench.chaos import audit
from maskmint.pipeline.lock import LOCK_NAME, Fence, Fenced, Holder, RunLock
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.config import load_config, parse_config
from maskmint.stages.loading import model_fingerprint


def run_cli(config_path, out, *extra) -> int:
    return launch.main(["run", "--config", str(config_path), "--out", str(out), "--quiet", *extra])


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_minimal_config_runs_on_every_default(tiny_model_dir, write_config, tmp_path):
    """Only model.path and one concept: every other field is its documented default."""
    data = {"model": {"path": str(tiny_model_dir)}, "prompts": {"concepts": [{"name": "dog", "class_id": 1}]}}
    config = load_config(write_config(data))
    assert [t.prompt for t in config.prompts.templates] == ["a photo of a {concept}"]
    assert config.output.samples == 64 and config.execution.executor == "ray"
    plan_out = subprocess.run(
        [sys.executable, "launch.py", "plan", "--config", str(write_config(data)), "--json"],
        capture_output=True, text=True, cwd=os.path.dirname(launch.__file__), check=True,
    ).stdout
    report = json.loads(plan_out)
    assert report["samples"] == 64 and report["shards"] == 4 and report["classes"] == {"dog": 64}
    assert report["examples"][0]["prompt"] == "a photo of a dog"
    # the run itself, with the defaults' 30+30 steps, on the in-process executor
    assert run_cli(write_config(data), tmp_path / "run", "--executor", "local") == 0
    assert audit(tmp_path / "run") == []


def test_plan_errors_write_nothing_and_the_fixed_config_is_accepted(small, write_config, tmp_path, capsys):
    out = tmp_path / "run"
    long_one = copy.deepcopy(small)
    long_one["prompts"]["templates"] = ["a photo " * 40 + "of a {concept}"]
    assert run_cli(write_config(long_one), out) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "prompts.templates.0" in err[0] and "outside the first" in err[0]
    assert not out.exists()
    assert run_cli(write_config(small), out) == 0  # not refused as "a different config"


def test_concept_past_the_limit_only_with_the_longest_filler_is_found(small, write_config, tmp_path, capsys):
    """The first samples may never draw the long filler; the plan check still does."""
    small["prompts"]["fillers"]["place"] = ["park", "very " * 80 + "long place"]
    small["prompts"]["templates"] = ["in a {place} a {concept}"]
    assert launch.main(["plan", "--config", str(write_config(small))]) == 2
    assert "prompts.templates.0" in error_lines(capsys)[0]


def test_relative_out_is_resolved_before_workers_see_it(small, write_config, tmp_path, monkeypatch):
    from maskmint.pipeline import run as run_module

    seen = []
    original = run_module.EXECUTORS["local"]
    monkeypatch.setitem(run_module.EXECUTORS, "local", lambda c, root, *a: seen.append(root) or original(c, root, *a))
    monkeypatch.chdir(tmp_path)
    assert run_cli(write_config(small), "relative/run") == 0
    assert seen == [tmp_path / "relative" / "run"] and seen[0].is_absolute()
    assert audit(tmp_path / "relative" / "run") == []


def test_a_writer_killed_mid_write_leaves_no_temp_file(small, write_config, tmp_path, monkeypatch):
    """A worker killed between writing its temp file and renaming it, in a run that then
    finishes on other workers: the run's directory holds no temp file at the end."""
    from maskmint.pipeline import run as run_module
    from maskmint.stages.durable import temp_path

    original = run_module.EXECUTORS["local"]

    def killed_writer_then_the_rest(config, root, *rest):
        temp_path(RunDir(root).tar_path(0)).write_bytes(b"half a tar")
        return original(config, root, *rest)

    monkeypatch.setitem(run_module.EXECUTORS, "local", killed_writer_then_the_rest)
    out = tmp_path / "run"
    assert run_cli(write_config(small), out) == 0
    assert RunDir(out).temp_files() == [] and audit(out) == []


def test_a_moved_run_and_a_renamed_run_resume(small, write_config, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(write_config(small), out) == 0
    # model and run moved to another mount; the run renamed
    moved_model = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model_dir, moved_model)
    shutil.move(out, tmp_path / "elsewhere" / "run")
    moved = copy.deepcopy(small) | {"name": "renamed"}
    moved["model"]["path"] = str(moved_model)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "elsewhere" / "run" / "shards").iterdir()}
    assert run_cli(write_config(moved, "moved.yaml"), tmp_path / "elsewhere" / "run") == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "elsewhere" / "run" / "shards").iterdir()} == before
    # other weights at the same place are another run
    weights = moved_model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli(write_config(moved, "moved.yaml"), tmp_path / "elsewhere" / "run") == 2
    assert "different config" in capsys.readouterr().err


def test_fingerprint_follows_content_not_location(config_dict, tiny_model_dir, tmp_path):
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy_dir)
    first = parse_config(config_dict)
    other = copy.deepcopy(config_dict)
    other["model"]["path"] = str(copy_dir)
    assert model_fingerprint(first.model) == model_fingerprint(parse_config(other).model)
    (copy_dir / "unet" / "config.json").write_text((copy_dir / "unet" / "config.json").read_text() + " ")
    assert model_fingerprint(first.model) != model_fingerprint(parse_config(other).model)
    hub = copy.deepcopy(config_dict)
    hub["model"]["path"] = "org/model"
    assert model_fingerprint(parse_config(hub).model) != model_fingerprint(first.model)


# -- the run lock ---------------------------------------------------------------------------


def test_a_live_holder_refuses_a_second_run(small, write_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(write_config(small), out) == 0
    holder = RunLock(out)
    holder.acquire()
    try:
        assert run_cli(write_config(small), out) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0] and socket.gethostname() in err[0]
        assert launch.main(["inspect", str(out), "--json"]) == 0
        assert f"pid {os.getpid()}" in json.loads(capsys.readouterr().out)["being_written_by"]
    finally:
        holder.release()
    assert launch.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["being_written_by"] is None
    assert not (out / LOCK_NAME).exists()
    assert run_cli(write_config(small), out) == 0


def test_a_dead_holders_lock_is_taken_over_and_its_workers_are_fenced(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Holder("feedface", socket.gethostname(), dead.pid, None, time.time())
    (tmp_path / LOCK_NAME).write_text(json.dumps(stale.__dict__))
    orphan = Fence(tmp_path, stale.token)
    orphan.check()  # still the holder, as far as the files say
    lock = RunLock(tmp_path)
    holder = lock.acquire()
    try:
        assert holder.token != stale.token
        with pytest.raises(Fenced, match=f"pid {os.getpid()}"):
            orphan.check()
        Fence(tmp_path, holder.token).check()
    finally:
        lock.release()
    history = [json.loads(line) for line in (tmp_path / "writers.jsonl").read_text().splitlines()]
    assert [h["token"] for h in history] == [holder.token]


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
    remote = Holder("abad1dea", "some-other-host", 4242, None, time.time())
    (tmp_path / LOCK_NAME).write_text(json.dumps(remote.__dict__))
    with pytest.raises(Exception, match="some-other-host pid 4242"):
        RunLock(tmp_path, stale_after_s=30).acquire()
    old = time.time() - 60
    os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(tmp_path, stale_after_s=30)
    assert lock.acquire().token != remote.token
    lock.release()


def test_heartbeat_keeps_a_long_run_fresh(tmp_path):
    lock = RunLock(tmp_path, stale_after_s=1.2)
    lock.acquire()
    try:
        old = time.time() - 60
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.8)
        assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1.0
    finally:
        lock.release()


def test_a_fenced_worker_publishes_nothing(small, write_config, tmp_path):
    from maskmint.pipeline.worker import ShardWorker

    out = tmp_path / "run"
    config = load_config(write_config(small))
    RunDir(out).create()
    (out / LOCK_NAME).write_text(json.dumps(Holder("newer", "h", 1, None, time.time()).__dict__))
    worker = ShardWorker(config, out, run_token="older")
    with pytest.raises(Fenced):
        list(worker.run_shard(0))
    worker.close()
    assert sorted(p.name for p in (out / "shards").iterdir()) == []


# -- what is on disk ------------------------------------------------------------------------


@pytest.fixture
def whole_run(small, write_config, tmp_path):
    config_path = write_config(small)
    out = tmp_path / "run"
    assert run_cli(config_path, out) == 0
    return config_path, out


def test_damaged_shards_are_found_reported_and_redone(whole_run, capsys):
    config_path, out = whole_run
    shards = out / "shards"
    data = (shards / "000000.tar").read_bytes()
    (shards / "000000.tar").write_bytes(data[: len(data) // 2])  # truncated
    (shards / "000001.json").write_text("{garbage")  # garbage json
    # shard 2: a tar with members other than its json lists, at the size the json records
    stats = json.loads((shards / "000002.json").read_text())
    shutil.copy(shards / "000001.tar", shards / "000002.tar")
    stats["tar_bytes"] = (shards / "000002.tar").stat().st_size
    (shards / "000002.json").write_text(json.dumps(stats))
    (shards / "12.json").write_text("{}")  # strays a user left: ignored
    (shards / "000001 copy.json").write_text("{}")

    capsys.readouterr()
    assert launch.main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["shards_damaged"]) == ["0", "1", "2"] and not report["whole"]
    assert "bytes" in report["shards_damaged"]["0"] and "unreadable" in report["shards_damaged"]["1"]
    assert "disagree" in report["shards_damaged"]["2"]

    assert run_cli(config_path, out) == 0
    assert "is damaged" in capsys.readouterr().err
    assert audit(out) == []


def test_verify_reads_every_byte(whole_run, capsys):
    _, out = whole_run
    tar_path = out / "shards" / "000001.tar"
    with tarfile.open(tar_path) as tar:
        member = max(tar.getmembers(), key=lambda m: m.size)
    data = bytearray(tar_path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF  # inside a member's data: same size, same names
    tar_path.write_bytes(bytes(data))
    capsys.readouterr()
    assert launch.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["whole"]  # the quick check cannot see it
    assert launch.main(["inspect", str(out), "--verify"]) == 0
    assert "000001 damaged: tar digest differs" in capsys.readouterr().out


def test_disk_full_while_writing_leaves_nothing_and_resumes(small, write_config, tmp_path, monkeypatch, capsys):
    config_path = write_config(small)
    out = tmp_path / "run"
    original = wds.TarWriter.write
    calls = {"n": 0}

    def full_disk(self, sample):
        calls["n"] += 1
        if sample["__key__"] == "0000000002":  # shard 1's first sample
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", full_disk)
    assert run_cli(config_path, out) == 1
    err = capsys.readouterr().err
    assert "shard 000001 failed: OSError: [Errno 28] No space left on device" in err
    assert sorted(p.name for p in (out / "shards").iterdir()) == [f"00000{s}.{e}" for s in (0, 2) for e in ("json", "tar")]
    monkeypatch.setattr(wds.TarWriter, "write", original)
    assert run_cli(config_path, out) == 0
    assert audit(out) == []


# -- user errors of the other commands ----------------------------------------------------


def test_export_out_a_file_is_one_line(whole_run, tmp_path, capsys):
    _, out = whole_run
    target = tmp_path / "a-file"
    target.write_text("x")
    capsys.readouterr()
    assert launch.main(["export", str(out), "--out", str(target)]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "is a file" in err[0]


def test_retry_hint_keeps_the_executor_flags(small, write_config, tmp_path, monkeypatch, capsys):
    from maskmint.pipeline.testing.faults import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1")
    small["execution"]["executor"] = "ray"
    out = tmp_path / "run"
    assert run_cli(write_config(small), out, "--executor", "local", "--workers", "3") == 1
    hint = [line for line in error_lines(capsys) if line.startswith("re-run")]
    assert hint and hint[0].endswith(f"--out {out} --executor local --workers 3")


def test_card_of_a_partial_run_names_only_whole_shards(small, write_config, tmp_path, monkeypatch):
    from maskmint.pipeline.testing.faults import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "1")
    out = tmp_path / "run"
    assert run_cli(write_config(small), out) == 1
    card = (out / "README.md").read_text()
    assert '["shards/000000.tar", "shards/000002.tar"]' in card and "{000000.." not in card
    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(write_config(small), out) == 0
    assert '"shards/{000000..000002}.tar"' in (out / "README.md").read_text()


def test_garbage_run_json_is_a_clear_error(whole_run, capsys):
    config_path, out = whole_run
    (out / "run.json").write_text("not json")
    capsys.readouterr()
    assert run_cli(config_path, out) == 2
    assert launch.main(["inspect", str(out)]) == 2
    err = error_lines(capsys)
    assert len(err) == 2 and all("run.json: unreadable" in line for line in err)


def test_tar_members_are_what_the_json_says(whole_run):
    _, out = whole_run
    for stats in RunDir(out).shard_stats():
        with tarfile.open(RunDir(out).tar_path(stats.shard)) as tar:
            assert {n.partition(".")[0] for n in tar.getnames()} == set(stats.written)
        assert stats.tar_bytes == RunDir(out).tar_path(stats.shard).stat().st_size


# -- progress ---------------------------------------------------------------------------------


class CountedProgress:
    def __init__(self):
        self.counts, self.failures = [], []

    def samples(self, count):
        self.counts.append(count)

    def failure(self, shard, error, final):
        self.failures.append((shard, final))

    def note(self, text):
        pass


def test_a_retried_shard_takes_back_its_counted_samples(small, tmp_path, monkeypatch):
    """The bar counts each planned sample once however often its shard is tried: a failed
    attempt's mini-batches are taken back before the retry counts them again."""
    from maskmint.pipeline import worker as worker_module
    from maskmint.pipeline.executors import run_local
    from maskmint.schemas.config import parse_config

    data = copy.deepcopy(small)
    data["generation"]["batch_size"] = 1  # two mini-batches per shard, both counted before the write
    data["execution"] = {**data["execution"], "max_attempts": 2}
    RunDir(tmp_path).create()
    write, failed_once = worker_module.write_shard, []

    def write_failing_shard_1_once(tar_path, *args, **kwargs):
        if tar_path.name == "000001.tar" and not failed_once:
            failed_once.append(1)
            raise RuntimeError("the disk hiccuped")
        return write(tar_path, *args, **kwargs)

    monkeypatch.setattr(worker_module, "write_shard", write_failing_shard_1_once)
    progress = CountedProgress()
    assert run_local(parse_config(data), tmp_path, [0, 1, 2], progress) == {}
    assert progress.failures == [(1, False)]
    assert -2 in progress.counts  # the failed attempt's two mini-batches, taken back
    assert sum(progress.counts) == 6
