"""The whole pipeline on a tiny model: shards readable without maskmint, resume, determinism."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from collections import Counter

import numpy as np
import webdataset as wds
from PIL import Image

from maskmint import launch
from maskmint.pipeline.plan import planned_keys
from maskmint.pipeline.rundir import RunDir
from maskmint.pipeline.testing.faults import FAULT_ENV
from maskmint.schemas.config import load_config
from maskmint.stages.durable import temp_path
from tests.conftest import tar_fields


def run_cli(config_path, out) -> int:
    return launch.main(["run", "--config", str(config_path), "--out", str(out), "--quiet"])


def test_run_writes_shards_readable_by_plain_webdataset(config_dict, write_config, tmp_path, capsys):
    config_path = write_config(config_dict)
    out = tmp_path / "run"
    assert run_cli(config_path, out) == 0
    config = load_config(config_path)
    class_ids = {c.class_id for c in config.prompts.concepts}

    tars = sorted((out / "shards").glob("*.tar"))
    assert [t.name for t in tars] == ["000000.tar", "000001.tar", "000002.tar"]
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("rgb8"))
    stats = [json.loads((out / "shards" / f"{i:06d}.json").read_text()) for i in range(3)]
    written = [k for s in stats for k in s["written"]]
    dropped = [k for s in stats for k in s["dropped"]]
    assert len(samples) == len(written) > 0
    assert sorted(written + dropped) == planned_keys(config)
    assert sum(s["planned"] for s in stats) == config.output.samples

    for sample in samples:
        assert {"jpg", "mask.png", "background.jpg", "heatmap.png", "json"} <= set(sample)
        image, mask, background = sample["jpg"], sample["mask.png"], sample["background.jpg"]
        assert image.shape == background.shape == (32, 32, 3) and image.dtype == np.uint8
        assert mask.shape[:2] == image.shape[:2]
        meta = sample["json"]
        sample_class = meta["concepts"][0]["class_id"]
        assert sample_class in class_ids
        assert set(np.unique(mask)) <= {0, sample_class, 255}
        assert meta["key"] == sample["__key__"] and meta["concepts"][0]["name"] in meta["prompt"]
        assert meta["quality"]["mask_fraction"] >= 0

    # the raw tar: the mask is a single-channel PNG of class indices
    members = tar_fields(out)
    assert set(members) == set(written)
    for fields in members.values():
        assert set(fields) == {"jpg", "mask.png", "background.jpg", "heatmap.png", "json"}
        mask = np.array(Image.open(io.BytesIO(fields["mask.png"])))
        assert mask.ndim == 2 and mask.dtype == np.uint8

    manifest = json.loads((out / "run.json").read_text())
    assert manifest["classes"] == {"1": "dog", "7": "zebra"}
    assert manifest["planned_samples"] == 10 and manifest["planned_shards"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["whole"] and summary["written"] + summary["dropped"] == 10

    capsys.readouterr()
    assert launch.main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["whole"] and report["shards_pending"] == [] and report["written"] == len(written)

    # the contact sheet: a header, then per sample a caption strip and a 5-panel row of 128 px tiles
    assert launch.main(["preview", str(out), "--out", str(tmp_path / "sheet.png"), "--samples", "3"]) == 0
    sheet = np.array(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (18 + 3 * (18 + 128), 5 * 128, 3)

    # re-running a whole run does nothing and changes nothing
    before = {t.name: t.read_bytes() for t in tars}
    assert run_cli(config_path, out) == 0
    assert {t.name: t.read_bytes() for t in sorted((out / "shards").glob("*.tar"))} == before


def test_interrupted_run_resumes_exactly(config_dict, write_config, tmp_path, monkeypatch, capsys):
    config_path = write_config(config_dict)
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "1")
    assert run_cli(config_path, out) == 1
    assert "shard 000001 failed" in capsys.readouterr().err
    rundir = RunDir(out)
    assert rundir.complete_shards() == {0, 2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pending_shards"] == [1] and "1" in summary["failed_shards"] and not summary["whole"]

    # a killed writer's leftovers: a temp file and a tar whose stats never landed
    temp_path(out / "shards" / "000001.tar").write_bytes(b"partial")  # maskmint's own temp naming
    (out / "shards" / "000001.tar").write_bytes(b"not whole")
    first_shards = {p.name: p.read_bytes() for p in (out / "shards").glob("00000[02].*")}

    monkeypatch.delenv(FAULT_ENV)
    assert run_cli(config_path, out) == 0
    config = load_config(config_path)
    stats = rundir.shard_stats()
    written = [k for s in stats for k in s.written]
    dropped = [k for s in stats for k in s.dropped]
    assert sorted(written + dropped) == planned_keys(config)
    keys_in_tars = [key for key in tar_fields(out)]
    counts = Counter(
        name.partition(".")[0]
        for t in (out / "shards").glob("*.tar")
        for name in tarfile.open(t).getnames()
        if name.endswith(".json")
    )
    assert sorted(keys_in_tars) == sorted(written) and max(counts.values()) == 1
    assert not list((out / "shards").glob(".*"))
    # shards made before the interruption were not redone
    assert {p.name: p.read_bytes() for p in (out / "shards").glob("00000[02].*")} == first_shards


def test_other_config_on_same_dir_is_refused(config_dict, write_config, tmp_path, capsys):
    out = tmp_path / "run"
    small = copy.deepcopy(config_dict)
    small["output"] = {"samples": 2, "shard_size": 2}
    assert run_cli(write_config(small, "a.yaml"), out) == 0
    small["generation"]["steps"] = 4
    capsys.readouterr()
    assert run_cli(write_config(small, "b.yaml"), out) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "Traceback" not in err


def test_same_key_gives_same_sample(config_dict, write_config, tmp_path):
    """Determinism across runs and across batch composition: seeds come from the key alone."""
    data = copy.deepcopy(config_dict)
    data["output"] = {"samples": 3, "shard_size": 3}
    assert run_cli(write_config(data, "a.yaml"), tmp_path / "a") == 0
    assert run_cli(write_config(data, "a.yaml"), tmp_path / "b") == 0
    a, b = tar_fields(tmp_path / "a"), tar_fields(tmp_path / "b")
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key]["jpg"] == b[key]["jpg"] and a[key]["mask.png"] == b[key]["mask.png"]
    distinct = {fields["jpg"] for fields in a.values()}
    assert len(distinct) == len(a)  # different keys, different images


def test_dedicated_inpainting_unet_shares_the_base_components(config_dict, write_config, tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from bench.train_toy_inpaint import inpainting_unet
    from maskmint.pipeline.worker import ShardWorker

    inpaint_dir = tmp_path / "inpaint"
    inpainting_unet(UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")).save_pretrained(
        inpaint_dir / "unet"
    )
    config_dict["model"]["inpaint_path"] = str(inpaint_dir)
    config_path = write_config(config_dict)
    worker = ShardWorker(load_config(config_path), tmp_path / "scratch")
    base, inpaint = worker.generate.pipe, worker.remove.pipe
    assert inpaint.unet.config.in_channels == 9 and base.unet.config.in_channels == 4
    assert inpaint.vae is base.vae and inpaint.text_encoder is base.text_encoder  # loaded once
    worker.close()

    out = tmp_path / "run"
    assert run_cli(config_path, out) == 0
    stats = RunDir(out).shard_stats()
    assert sorted([k for s in stats for k in s.written] + [k for s in stats for k in s.dropped]) == planned_keys(
        load_config(config_path)
    )
