"""Ray execution under failure: same output as in-process, retries, driver kills, failed shards.

These start real local Ray instances, so they are marked `ray` (deselect with -m "not ray").
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from maskmint import launch
from maskmint.pipeline.plan import planned_keys
from maskmint.pipeline.rundir import RunDir
from maskmint.pipeline.testing.faults import FAULT_ENV, release_marker
from maskmint.schemas.config import load_config
from maskmint.schemas.records import BatchDone, ShardStats, ShardWritten
from tests.conftest import tar_fields

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray for the in-process runs of this module (a run joins it instead of starting one)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_config(config_dict) -> dict:
    config_dict["execution"].update({"executor": "ray", "workers": 2, "cpus_per_worker": 1, "max_attempts": 2})
    return config_dict


def run_cli(config_path, out, *extra) -> int:
    return launch.main(["run", "--config", str(config_path), "--out", str(out), "--quiet", *extra])


def assert_exactly_planned(config_path, out: Path) -> None:
    """Every planned key is written or dropped exactly once and every tar is whole and readable."""
    stats = RunDir(out).shard_stats()
    written = [k for s in stats for k in s.written]
    dropped = [k for s in stats for k in s.dropped]
    assert sorted(written + dropped) == planned_keys(load_config(config_path))
    assert Counter(written + dropped).most_common(1)[0][1] == 1
    assert sorted(tar_fields(out)) == sorted(written)
    assert not [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")]


def release_when_written(out: Path, held: int, shard: int) -> threading.Thread:
    """Frees the held shard once another shard is published, so a second actor must have taken it."""

    def watch() -> None:
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline and not (out / "shards" / f"{shard:06d}.json").exists():
            time.sleep(0.05)
        release_marker(out, held).touch()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_two_ray_workers_match_the_local_executor(ray_instance, ray_config, write_config, tmp_path, monkeypatch):
    config_path = write_config(ray_config)
    monkeypatch.setenv(FAULT_ENV, "0:hold")  # shard 0 waits on its actor until shard 2 is out
    watcher = release_when_written(tmp_path / "ray", held=0, shard=2)
    assert run_cli(config_path, tmp_path / "ray") == 0
    watcher.join()
    monkeypatch.delenv(FAULT_ENV)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the one-CPU actors: same kernels, same floats
    try:
        assert run_cli(config_path, tmp_path / "local", "--executor", "local") == 0
    finally:
        torch.set_num_threads(threads)
    on_ray, local = tar_fields(tmp_path / "ray"), tar_fields(tmp_path / "local")
    assert sorted(on_ray) == sorted(local) and on_ray
    assert all(on_ray[k]["mask.png"] == local[k]["mask.png"] for k in local)
    workers = {json.loads((tmp_path / "ray" / "shards" / f"{s:06d}.json").read_text())["worker"]["pid"] for s in range(3)}
    assert len(workers) == 2, "both actors took shards"

    # Ray Data reads the shards as they are
    from maskmint.pipeline.dataset import shard_urls

    rows = ray_instance.data.read_webdataset(shard_urls(tmp_path / "ray")).take_all()
    assert sorted(row["__key__"] for row in rows) == sorted(local)
    assert {"jpg", "mask.png", "background.jpg", "json"} <= set(rows[0])


def test_worker_process_exit_is_retried(ray_instance, ray_config, write_config, tmp_path, monkeypatch, capsys):
    config_path = write_config(ray_config)
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "1:exit:once")
    assert run_cli(config_path, out) == 0
    assert "shard 000001 will be retried" in capsys.readouterr().err
    assert (out / ".fault-1").exists(), "the fault fired"
    assert_exactly_planned(config_path, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["whole"] and summary["failed_shards"] == {}


def test_permanent_failure_is_named_and_a_fixed_rerun_completes(
    ray_instance, ray_config, write_config, tmp_path, monkeypatch, capsys
):
    config_path = write_config(ray_config)
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "2:raise")
    assert run_cli(config_path, out) == 1
    err = capsys.readouterr().err
    assert "shard 000002 failed: RuntimeError: injected fault on shard 2" in err and "re-run to retry" in err
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["failed_shards"]) == ["2"] and summary["pending_shards"] == [2]
    assert RunDir(out).complete_shards() == {0, 1}

    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(config_path, out) == 0
    assert_exactly_planned(config_path, out)
    assert json.loads((out / "summary.json").read_text())["whole"]


def test_a_takeover_mid_shard_stops_a_ray_run_and_publishes_nothing(
    ray_instance, ray_config, write_config, tmp_path, monkeypatch, capsys
):
    from tests.test_guarantees import run_taken_over

    run_taken_over(write_config(ray_config), tmp_path / "run", monkeypatch, capsys)


def test_a_local_run_resumed_on_two_ray_workers_keeps_its_shards_byte_for_byte(
    ray_instance, ray_config, write_config, tmp_path, monkeypatch
):
    config_path, out = write_config(ray_config), tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "1")
    assert run_cli(config_path, out, "--executor", "local") == 1
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    assert sorted(kept) == ["000000.json", "000000.tar", "000002.json", "000002.tar"]
    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(config_path, out, "--executor", "ray", "--workers", "2") == 0
    assert {n: (p.stat().st_mtime_ns, p.read_bytes()) for n, p in ((n, out / "shards" / n) for n in kept)} == kept
    assert_exactly_planned(config_path, out)


def test_a_plain_ray_run_prints_only_maskmints_progress_and_summary(ray_config, write_config, tmp_path):
    """Its own private Ray, as a user's first run starts one: no notice of Ray's in the output."""
    config_path, out = write_config(ray_config), tmp_path / "run"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    env.pop("RAY_AUTH_MODE", None)
    done = subprocess.run([sys.executable, "launch.py", "run", "--config", str(config_path), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [f"{out}: 10 samples written, 0 dropped, 3/3 shards whole"]
    bar = re.compile(r"maskmint: +\d+%\|[^|]*\| *\d+/\d+ \[[^\]]*\]")
    assert bar.search(done.stderr), done.stderr
    assert bar.sub("", done.stderr).strip() == "", done.stderr  # nothing but the bar's frames


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_driver_sigkill_then_rerun_resumes_exactly(ray_instance, ray_config, write_config, tmp_path):
    ray_config["output"] = {"samples": 48, "shard_size": 2}
    config_path = write_config(ray_config)
    out = tmp_path / "run"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    command = [sys.executable, str(REPO / "launch.py"), "run", "--config", str(config_path), "--out", str(out), "--quiet"]
    driver = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill at a random moment once work is under way: some shards whole, others being written
    deadline = time.time() + 240
    while not list((out / "shards").glob("*.json")) if (out / "shards").exists() else True:
        assert driver.poll() is None and time.time() < deadline, "the driver never produced a shard"
        time.sleep(0.2)
    time.sleep(random.uniform(0.0, 1.5))
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(2.0)  # Ray's processes fate-share with the driver that started them
    if _group_alive(driver.pid):  # leftovers must not write beside the re-run
        print("processes outlived the driver", subprocess.run(["ps", "-g", str(driver.pid), "-o", "pid,cmd"], capture_output=True, text=True).stdout)
        os.killpg(driver.pid, signal.SIGKILL)
    before = RunDir(out).complete_shards()
    assert driver.returncode == -signal.SIGKILL and 0 < len(before) < 24, before

    assert run_cli(config_path, out) == 0
    assert_exactly_planned(config_path, out)
    assert RunDir(out).complete_shards() == set(range(24))


def test_a_model_that_fails_to_load_in_the_workers_exits_2(ray_instance, ray_config, write_config, tiny_model_dir, tmp_path, capsys):
    """The tokenizer loads (planning passes), the weights do not: a user error, not 'no worker left'."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    ray_config["model"]["path"] = str(broken)
    assert run_cli(write_config(ray_config), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.path: cannot load") and "Traceback" not in "\n".join(err)


class StandIn:
    """A worker without a model: hangs where told to, to test the bounded waits."""

    def __init__(self, hang_ready: bool = False, slow_shard: int | None = None, marker: str = "", seconds: float = 0.0,
                 die_once: str = ""):
        self.hang_ready, self.slow_shard, self.marker, self.seconds = hang_ready, slow_shard, marker, seconds
        self.die_once = die_once  # exit on the first shard; once restarted, never get ready

    def ready(self) -> bool:
        if self.hang_ready or (self.die_once and os.path.exists(self.die_once)):
            time.sleep(3600)
        return True

    def run_shard(self, shard: int):
        if self.die_once and not os.path.exists(self.die_once):
            open(self.die_once, "w").close()
            os._exit(1)
        if shard == self.slow_shard and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)  # a hung device, on the first try only
        time.sleep(self.seconds)
        yield BatchDone(1)
        yield ShardWritten(ShardStats(shard=shard, planned=1, written=[f"{shard:06d}"], dropped={}, seconds={},
                                      mask={}, scores={}))


class Notes:
    def __init__(self):
        self.failures, self.notes, self.samples_seen = [], [], 0

    def samples(self, count):
        self.samples_seen += count

    def failure(self, shard, error, final):
        self.failures.append((shard, error, final))

    def note(self, text):
        self.notes.append(text)


@pytest.fixture
def stand_in(ray_instance):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return ray_instance.remote(StandIn).options(num_cpus=0, max_restarts=-1)


def test_a_worker_that_never_gets_ready_is_given_up(stand_in):
    from maskmint.pipeline.executors import Limits, dispatch

    progress = Notes()
    start = time.monotonic()
    failed = dispatch(
        [stand_in.remote(hang_ready=True), stand_in.remote(seconds=1.5)], list(range(10)), Limits(2, 8.0, None), progress
    )
    assert failed == {} and progress.samples_seen == 10
    assert any("not ready within worker_start_timeout_s=8" in n for n in progress.notes)

    progress = Notes()
    failed = dispatch([stand_in.remote(hang_ready=True)], [0, 1], Limits(2, 2.0, None), progress)
    assert time.monotonic() - start < 60
    assert set(failed) == {0, 1} and all("no worker left" in e and "not ready within" in e for e in failed.values())


def test_a_hung_shard_is_timed_out_and_retried(stand_in, tmp_path):
    from maskmint.pipeline.executors import Limits, dispatch

    progress = Notes()
    actor = stand_in.remote(slow_shard=1, marker=str(tmp_path / "hung-once"))
    failed = dispatch([actor], [0, 1, 2], Limits(2, 60.0, 2.0), progress)
    assert failed == {} and progress.samples_seen == 3
    assert progress.failures == [(1, "no result within shard_timeout_s", False)]


def test_a_worker_not_ready_after_its_restart_is_given_up(stand_in, tmp_path):
    from maskmint.pipeline.executors import Limits, dispatch

    progress = Notes()
    flaky = stand_in.remote(die_once=str(tmp_path / "died"))
    failed = dispatch([flaky, stand_in.remote(seconds=1.5)], list(range(6)), Limits(3, 4.0, None), progress)
    assert (tmp_path / "died").exists(), "the worker died"
    assert failed == {} and progress.samples_seen == 6
    assert [(shard, final) for shard, _, final in progress.failures] == [(progress.failures[0][0], False)]
    assert any("not ready within worker_start_timeout_s=4" in n for n in progress.notes), progress.notes
