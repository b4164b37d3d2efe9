"""Reading a run back: the training loader, joint transforms, exports and the dataset card."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import BASE_CONFIG

from maskmint import launch
from maskmint.pipeline.dataset import (
    Sample,
    joint_resize_crop,
    read_samples,
    segmentation_dataset,
)
from maskmint.pipeline.export import rle_decode, rle_encode
from maskmint.pipeline.rundir import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """One small run (local executor) shared by the tests below."""
    folder = tmp_path_factory.mktemp("dataset")
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(tiny_model_dir)
    data["refine"] = {"boundary_px": 1}  # the band is on: masks hold 255
    (folder / "run.yaml").write_text(yaml.safe_dump(data))
    assert launch.main(["run", "--config", str(folder / "run.yaml"), "--out", str(folder / "run"), "--quiet"]) == 0
    return folder / "run"


def coded_sample(height: int, width: int) -> Sample:
    """Image pixels encode their own mask value, so any misalignment shows."""
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 3, 255], np.uint8), size=(height, width))
    image = np.stack([mask, np.arange(width)[None, :].repeat(height, 0) % 256, np.arange(height)[:, None].repeat(width, 1)], -1)
    return Sample("k", image.astype(np.uint8), mask, image.astype(np.uint8).copy(), mask[None].copy(), {})


def test_joint_crop_and_flip_keep_image_and_mask_aligned():
    sample = coded_sample(64, 96)  # short side 64: crop 64 px wide windows, no resampling
    transform = joint_resize_crop(64, train=True)
    lefts = set()
    for seed in range(12):
        out = transform(sample, np.random.default_rng(seed))
        assert out.image.shape == (64, 64, 3) and out.mask.shape == (64, 64)
        assert np.array_equal(out.image[..., 0], out.mask)  # the mask moved with the image
        assert np.array_equal(out.background, out.image) and np.array_equal(out.heatmap[0], out.mask)
        lefts.add(int(out.image[0, 0, 1]))
    assert len(lefts) > 2, "crops are random"


def test_joint_resize_keeps_the_ignore_index():
    sample = coded_sample(32, 32)
    out = joint_resize_crop(64, train=False)(sample, np.random.default_rng(0))
    assert set(np.unique(out.mask)) == {0, 3, 255}  # nearest: no blended labels
    assert np.array_equal(out.mask, cv2.resize(sample.mask, (64, 64), interpolation=cv2.INTER_NEAREST))


def test_loader_with_dataloader_workers(run_dir):
    samples = list(read_samples(run_dir))
    written = sum(len(s.written) for s in RunDir(run_dir).shard_stats())
    assert len(samples) == written > 0
    ignored = sum(int((s.mask == 255).sum()) for s in samples)
    assert ignored > 0, "the run has an ignore band to preserve"

    dataset = segmentation_dataset(run_dir, size=None, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    images, masks = [], []
    for image, mask in loader:
        assert image.dtype == torch.float32 and image.shape[1:] == (3, 32, 32) and 0 <= image.min() <= image.max() <= 1
        assert mask.dtype == torch.int64
        images.append(image)
        masks.append(mask)
    masks = torch.cat(masks)
    assert len(masks) == written  # every sample once, across both workers
    assert int((masks == 255).sum()) == ignored
    assert set(masks.unique().tolist()) <= {0, 1, 7, 255}

    resized = next(iter(segmentation_dataset(run_dir, size=48, train=True, shuffle=4)))
    assert resized[0].shape == (3, 48, 48) and resized[1].shape == (48, 48)


def test_rle_round_trip():
    region = np.zeros((5, 7), bool)
    region[0, 0] = region[1:4, 2:5] = region[4, 6] = True
    rle = rle_encode(region)
    assert rle["counts"][0] == 0 and sum(rle["counts"]) == 35
    assert np.array_equal(rle_decode(rle), region)


def test_export_folders_and_coco_round_trip(run_dir, tmp_path):
    samples = {s.key: s for s in read_samples(run_dir)}
    assert launch.main(["export", str(run_dir), "--out", str(tmp_path / "folders")]) == 0
    masks = sorted((tmp_path / "folders" / "masks").glob("*.png"))
    assert [p.stem for p in masks] == sorted(samples)
    for path in masks:
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), samples[path.stem].mask)
        image = cv2.cvtColor(cv2.imread(str(tmp_path / "folders" / "images" / f"{path.stem}.jpg")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(image, samples[path.stem].image)  # the stored file, not a re-encoding
    classes = json.loads((tmp_path / "folders" / "classes.json").read_text())
    assert classes == {"0": "background", "1": "dog", "7": "zebra", "255": "ignore"}

    assert launch.main(["export", str(run_dir), "--out", str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    assert {c["id"] for c in coco["categories"]} == {1, 7}
    by_image = {image["id"]: image["maskmint_key"] for image in coco["images"]}
    assert sorted(by_image.values()) == sorted(samples)
    rebuilt = {key: np.zeros_like(samples[key].mask) for key in samples}
    for annotation in coco["annotations"]:
        region = rle_decode(annotation["segmentation"])
        key = by_image[annotation["image_id"]]
        assert annotation["area"] == region.sum() and not (rebuilt[key][region]).any()  # instances do not overlap
        rebuilt[key][region] = annotation["category_id"]
    for key, sample in samples.items():
        expected = np.where(sample.mask == 255, 0, sample.mask)
        assert np.array_equal(rebuilt[key], expected)

    assert launch.main(["export", str(run_dir), "--out", str(tmp_path / "coco")]) == 2  # not empty: refused


def test_dataset_card(run_dir):
    card = (run_dir / "README.md").read_text()
    written = sum(len(s.written) for s in RunDir(run_dir).shard_stats())
    assert f"{written} written" in card and "| 7 | zebra |" in card and "![preview](preview.png)" in card
    assert (run_dir / "preview.png").stat().st_size > 0
