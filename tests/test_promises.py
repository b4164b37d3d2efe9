"""Documented behaviour that had no test of its own: plan's truncation warnings, the 255
marking where heat and colour disagree, PNG output, and every file and column of the exports."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import webdataset as wds
import yaml

from maskmint import launch
from bench.chaos import audit
from maskmint.pipeline.plan import Plan
from maskmint.pipeline.worker import ShardWorker, as_columns
from maskmint.schemas.config import RefineConfig, load_config
from maskmint.schemas.records import IGNORE_INDEX
from maskmint.stages.refine import refine_mask
from tests.conftest import BASE_CONFIG, tar_fields


def decoded(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if image.ndim == 3 else image


def test_plan_warns_of_prompts_the_text_encoder_truncates(config_dict, write_config, capsys):
    data = copy.deepcopy(config_dict)
    data["prompts"]["templates"] = ["a {concept} " + "in a very green park " * 20]  # the concept early, a long tail
    path = write_config(data)
    assert launch.main(["plan", "--config", str(path)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning: truncated past" in line]
    assert warnings and "a dog in a very green park" in warnings[0]
    assert launch.main(["plan", "--config", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["truncated_prompts"] and report["max_prompt_tokens"] > report["token_limit"]
    data["prompts"]["templates"] = ["a {concept} in a park"]
    assert launch.main(["plan", "--config", str(write_config(data))]) == 0
    assert "warning" not in capsys.readouterr().out


def test_pixels_where_heat_and_colour_disagree_become_255():
    """An object pixel (changed colour) whose heat is below disagree_low, and a background pixel
    whose heat is above disagree_high, are marked uncertain; agreeing pixels keep their class."""
    size = 32
    image = np.full((size, size, 3), 128, np.uint8)
    background = image.copy()
    image[8:24, 8:24] = (255, 0, 0)  # the object: changed against its background
    weak = np.zeros((size, size), np.uint8)
    weak[8:24, 8:24] = 3
    heat = np.full((1, size, size), 0.5, np.float32)
    heat[0, 10:12, 10:12] = 0.01  # cold inside the object
    heat[0, 2:4, 2:4] = 0.99  # hot outside it
    config = RefineConfig(boundary_px=0, disagree_low=0.05, disagree_high=0.9, min_area=0.0)
    mask, _ = refine_mask(image, background, weak, heat, config, [3])
    assert (mask[10:12, 10:12] == IGNORE_INDEX).all() and (mask[2:4, 2:4] == IGNORE_INDEX).all()
    assert (mask[14:22, 14:22] == 3).all() and mask[28, 28] == 0
    assert (mask == IGNORE_INDEX).sum() == 8
    relaxed, _ = refine_mask(image, background, weak, heat, RefineConfig(boundary_px=0, disagree_low=0.0,
                                                                         disagree_high=1.0, min_area=0.0), [3])
    assert not (relaxed == IGNORE_INDEX).any() and (relaxed[10:12, 10:12] == 3).all()


@pytest.fixture(scope="module")
def png_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("png")
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(tiny_model_dir)
    data["output"] = {"samples": 4, "shard_size": 4, "image_format": "png"}
    (folder / "run.yaml").write_text(yaml.safe_dump(data))
    assert launch.main(["run", "--config", str(folder / "run.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder


def test_png_output_stores_the_generated_pixels_losslessly(png_run):
    out = png_run / "run"
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["fields"]["image"] == "png" and manifest["fields"]["background"] == "background.png"
    samples = tar_fields(out)
    assert samples and all(set(s) == {"png", "background.png", "mask.png", "heatmap.png", "json"} for s in samples.values())
    assert audit(out) == []
    # the same samples generated again in this process: the stored PNG is exactly those pixels
    config = load_config(png_run / "run.yaml")
    worker = ShardWorker(config, png_run / "again")
    planned = Plan(config, worker.generate.layout).shard(0)[: config.generation.batch_size]  # the run's first batch
    batch = worker.model_stages(as_columns(planned), {k: 0.0 for k in ("generate", "weak_mask", "remove")})
    worker.close()
    assert all(sample.key in samples for sample in planned)
    for i, sample in enumerate(planned):
        if sample.key in samples:
            assert np.array_equal(decoded(samples[sample.key]["png"]), batch["image"][i])
            assert np.array_equal(decoded(samples[sample.key]["background.png"]), batch["background"][i])
    # and plain webdataset reads it as the design promises
    rows = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("rgb8"))
    assert len(rows) == len(samples) and rows[0]["png"].shape == (32, 32, 3)


@pytest.fixture(scope="module")
def jpg_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(tiny_model_dir)
    data["output"] = {"samples": 4, "shard_size": 2}
    (folder / "run.yaml").write_text(yaml.safe_dump(data))
    assert launch.main(["run", "--config", str(folder / "run.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def test_folder_export_writes_backgrounds_and_metadata_as_tar_fields(jpg_run, tmp_path):
    out = tmp_path / "folders"
    assert launch.main(["export", str(jpg_run), "--out", str(out)]) == 0
    samples = tar_fields(jpg_run)
    assert sorted(p.stem for p in (out / "backgrounds").iterdir()) == sorted(samples)
    assert sorted(p.stem for p in (out / "metadata").iterdir()) == sorted(samples)
    for key, fields in samples.items():
        assert (out / "backgrounds" / f"{key}.jpg").read_bytes() == fields["background.jpg"]
        assert (out / "metadata" / f"{key}.json").read_bytes() == fields["json"]
        assert json.loads((out / "metadata" / f"{key}.json").read_text())["key"] == key


def test_hf_export_columns_hold_the_stored_background_heatmap_and_prompt(jpg_run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "hf"
    assert launch.main(["export", str(jpg_run), "--out", str(out), "--format", "hf"]) == 0
    ds = datasets.load_from_disk(str(out))
    assert {"background", "heatmap", "prompt"} <= set(ds.column_names)
    samples = tar_fields(jpg_run)
    assert sorted(ds["key"]) == sorted(samples)
    for row in ds:
        fields = samples[row["key"]]
        assert np.array_equal(np.array(row["background"]), decoded(fields["background.jpg"]))
        assert np.array_equal(np.array(row["heatmap"]), decoded(fields["heatmap.png"]))
        assert row["prompt"] == json.loads(fields["json"])["prompt"] and "a photo of a" in row["prompt"]
