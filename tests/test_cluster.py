"""A real two-node Ray cluster on this machine: workers on both nodes, one node lost mid-run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from bench.chaos import audit
from maskmint.pipeline.run import run
from maskmint.pipeline.testing.faults import FAULT_ENV, held_marker, release_marker
from maskmint.schemas.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def cluster():
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 96 * 2**20})
    worker_node = cluster.add_node(num_cpus=1, object_store_memory=96 * 2**20)
    cluster.wait_for_nodes()
    yield cluster, worker_node
    cluster.shutdown()


def test_losing_a_node_mid_run_loses_nothing(cluster, config_dict, write_config, tmp_path, monkeypatch):
    cluster, worker_node = cluster
    # Shard 0 waits until the other worker has published a shard: however slowly one worker
    # starts under load, both nodes publish before the node is lost.
    monkeypatch.setenv(FAULT_ENV, "0:hold")
    config_dict["output"] = {"samples": 24, "shard_size": 2}
    config_dict["execution"].update({
        "executor": "ray", "address": cluster.address, "workers": 2, "cpus_per_worker": 1,
        "max_attempts": 3, "worker_start_timeout_s": 20,
    })
    config = load_config(write_config(config_dict))
    out = tmp_path / "run"
    shards = out / "shards"
    removed = {}

    def remove_node_after_first_shards():
        deadline = time.time() + 300
        while time.time() < deadline:
            written = list(shards.glob("[0-9]*.json")) if shards.exists() else []
            if held_marker(out, 0).exists() and written:
                release_marker(out, 0).touch()
            nodes = {json.loads(p.read_text())["worker"]["ray_node"] for p in written}
            if len(nodes) == 2:  # both nodes have published: the worker node is busy mid-run
                removed["at"] = len(written)
                cluster.remove_node(worker_node)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=remove_node_after_first_shards, daemon=True)
    killer.start()
    summary = run(config, out, show_progress=False)
    killer.join(timeout=5)

    assert "at" in removed and removed["at"] < 12, removed  # removed while shards were pending
    assert summary.whole and summary.failed_shards == {}
    assert audit(out) == []
    per_node = {}
    for path in sorted(shards.glob("[0-9]*.json")):
        node = json.loads(path.read_text())["worker"]["ray_node"]
        per_node[node] = per_node.get(node, 0) + 1
    assert len(per_node) == 2 and sum(per_node.values()) == 12
