"""Quotas: top-up rounds until every class has its kept samples, planned deterministically,
balanced by how much each class drops, resumable, and reported."""

from __future__ import annotations

import copy
import json

import pytest

from maskmint import launch
from maskmint.pipeline.quota import TopUp, next_round, read_rounds, shard_range
from maskmint.pipeline.testing.faults import FAULT_ENV
from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import ShardStats
from tests.conftest import tar_fields


def _quota_config(config_dict) -> dict:
    data = copy.deepcopy(config_dict)
    data["mask"] = {"tau": 0.6, "min_area": 0.05}  # the tiny model drops some of each class
    data["filter"].update({"max_weak_fraction": 0.35})
    data["output"] = {"kept_per_class": 4, "shard_size": 3}
    return data


def _kept_per_class(out) -> dict[int, int]:
    kept: dict[int, int] = {}
    for path in (out / "shards").glob("*.json"):
        stats = ShardStats.model_validate_json(path.read_text())
        for key in stats.written:
            for class_id in stats.classes[key]:
                kept[class_id] = kept.get(class_id, 0) + 1
    return kept


def test_a_quota_tops_up_until_every_class_is_met(config_dict, write_config, tmp_path, capsys):
    data = _quota_config(config_dict)
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(out), "--quiet"]) == 0
    kept = _kept_per_class(out)
    assert kept[1] >= 4 and kept[7] >= 4, kept
    rounds = read_rounds(out)
    assert rounds, "the planned 8 samples (a perfect filter's need) cannot meet it: some are dropped"
    assert "top-up round 1" in capsys.readouterr().err
    keys = [k for f in tar_fields(out) for k in [f]]
    assert len(keys) == len(set(keys))
    planned_classes = {}
    for path in (out / "shards").glob("*.json"):
        planned_classes.update(ShardStats.model_validate_json(path.read_text()).classes)
    for r in rounds:
        assert r.start % 3 == 0 and r.start >= 8  # after the planned range, on a shard boundary
        for offset, class_id in enumerate(r.first_classes):  # each top-up sample shows the class it is for
            assert planned_classes[f"{r.start + offset:010d}"][0] == class_id
    summary = json.loads((out / "summary.json").read_text())
    assert summary["whole"] and summary["top_up_rounds"] == len(rounds)
    assert summary["kept_per_class"] == {"dog": kept[1], "zebra": kept[7]}
    assert summary["planned_samples"] == 8 + sum(len(r.first_classes) for r in rounds)
    assert sum(summary["attempts_per_class"].values()) == summary["planned_samples"]  # one class per sample
    assert "kept per class" in (out / "README.md").read_text()
    capsys.readouterr()
    assert launch.main(["inspect", str(out), "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert inspected["kept_per_class"] == summary["kept_per_class"]
    assert inspected["attempts_per_class"] == summary["attempts_per_class"]

    # the same config elsewhere plans the same rounds and writes the same samples
    again = tmp_path / "again"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(again), "--quiet"]) == 0
    assert read_rounds(again) == rounds and tar_fields(again) == tar_fields(out)


def test_a_killed_top_up_round_resumes_exactly(config_dict, write_config, tmp_path, monkeypatch):
    data = _quota_config(config_dict)
    whole = tmp_path / "whole"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(whole), "--quiet"]) == 0
    rounds = read_rounds(whole)
    top_up_shard = rounds[0].start // 3
    killed = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"{top_up_shard}:raise")
    data["execution"]["max_attempts"] = 1
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(killed), "--quiet"]) != 0
    assert read_rounds(killed) == rounds[:1]  # the round was recorded before its shards ran
    monkeypatch.delenv(FAULT_ENV)
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(killed), "--quiet"]) == 0
    assert read_rounds(killed) == rounds and tar_fields(killed) == tar_fields(whole)


def _stats(shard, classes, written):
    keys = {f"{shard:03d}{i}": [c] for i, c in enumerate(classes)}
    return ShardStats(shard=shard, planned=len(keys), written=[k for k, w in zip(keys, written) if w],
                      dropped={k: "empty_mask" for k, w in zip(keys, written) if not w}, seconds={}, mask={},
                      classes=keys)


def test_a_class_that_drops_more_gets_more_attempts():
    config = RunConfig.model_validate({
        "model": {"path": "x"}, "output": {"kept_per_class": 10, "samples": 20, "shard_size": 4},
        "prompts": {"concepts": [{"name": "a", "class_id": 1}, {"name": "b", "class_id": 2}], "templates": ["a {concept}"]},
    })
    # class 1 kept 9 of 10, class 2 kept 4 of 10
    stats = [_stats(0, [1] * 10, [True] * 9 + [False]), _stats(1, [2] * 10, [True] * 4 + [False] * 6)]
    top_up = next_round(config, stats, [])
    need = {c: top_up.first_classes.count(c) for c in (1, 2)}
    assert need[1] == 2 and need[2] == 15  # 1 / (10/12) = 1.2 and 6 / (5/12) = 14.4, rounded up
    assert top_up.start == 20 and top_up.first_classes[:4] == [1, 2, 1, 2]  # interleaved
    assert list(shard_range(20, 4, [top_up], 5)) == [20, 21, 22, 23]
    assert list(shard_range(20, 4, [top_up], 8)) == [32, 33, 34, 35]
    assert next_round(config, [_stats(0, [1, 2] * 10, [True] * 20)], []) is None  # met
    capped = config.model_copy(update={"output": config.output.model_copy(update={"max_samples": 25})})
    assert len(next_round(capped, stats, []).first_classes) == 5  # the attempts left


@pytest.mark.parametrize("change, words", [
    ({"output": {"kept_per_class": 5, "kept": 9}}, ["kept_per_class or kept"]),
    ({"output": {"kept_per_class": 5, "samples": 20, "max_samples": 10}}, ["max_samples", "below"]),
])
def test_quota_config_errors_are_one_line(config_dict, write_config, capsys, change, words):
    data = copy.deepcopy(config_dict)
    data.update(change)
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(write_config(data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_a_quota_needs_templates(config_dict, write_config, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a dog", "concepts": ["dog"]}) + "\n")
    data = copy.deepcopy(config_dict)
    data["prompts"]["file"] = str(tmp_path / "p.jsonl")
    data["output"] = {"kept_per_class": 3}
    assert launch.main(["plan", "--config", str(write_config(data))]) == 2
    assert "templates" in capsys.readouterr().err


def test_the_quota_is_in_the_config_hash(config_dict):
    data = copy.deepcopy(config_dict)
    data["output"] = {"kept_per_class": 3}
    one = RunConfig.model_validate(data).config_hash()
    data["output"] = {"kept_per_class": 4, "samples": 6}  # the same first round, another quota
    assert RunConfig.model_validate(data).config_hash() != one
    assert isinstance(TopUp(start=0, first_classes=[1]).first_classes, list)
