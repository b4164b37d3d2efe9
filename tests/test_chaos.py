"""A short chaos run (bench/chaos.py): real drivers and Ray workers SIGKILLed at random
moments, every directory then audited from its files alone."""

from __future__ import annotations

import json

import pytest

from bench import chaos

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_short_chaos_loses_and_duplicates_nothing(tmp_path):
    record_path = tmp_path / "chaos.json"
    code = chaos.main([
        "--driver-kills", "3", "--worker-kills", "2", "--both", "1", "--kills-per-dir", "3",
        "--samples", "16", "--max-delay", "8", "--seed", "1", "--json", str(record_path),
    ])
    record = json.loads(record_path.read_text())
    assert code == 0 and record["problems"] == [], record["problems"]
    assert record["driver_kills"] >= 3 and record["worker_kills"] >= 2 and record["directories"] >= 3


def test_audit_finds_what_it_should(tmp_path):
    """The auditor itself: a duplicated key, a lost key, a temp file and a torn tar are all named."""
    shards = tmp_path / "shards"
    shards.mkdir()
    fields = {"image": "jpg", "metadata": "json"}
    (tmp_path / "run.json").write_text(json.dumps({"planned_samples": 4, "planned_shards": 2, "fields": fields}))
    import io
    import tarfile

    def tar_of(keys):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for key in keys:
                for field in fields.values():
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))
        return buffer.getvalue()

    (shards / "000000.tar").write_bytes(tar_of(["0000000000", "0000000001"]))
    (shards / "000000.json").write_text(json.dumps({"written": ["0000000000", "0000000001"], "dropped": {}}))
    (shards / "000001.tar").write_bytes(tar_of(["0000000001"])[:700])
    (shards / "000001.json").write_text(json.dumps({"written": ["0000000001"], "dropped": {}}))
    (shards / ".000001.tar.tmp-x").write_bytes(b"")
    problems = "\n".join(chaos.audit(tmp_path))
    assert "more than once" in problems and "neither written nor dropped" in problems
    assert "temp files" in problems and "shard 1:" in problems
