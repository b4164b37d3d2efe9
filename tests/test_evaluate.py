"""`evaluate` scoring an annotated run (a folder source) against truth the test draws by hand:
class-index PNGs, and COCO json read back by pycocotools."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from maskmint import launch
from maskmint.pipeline.dataset import read_samples
from tests.test_annotate import save, scene
from tests.test_folder_source import SOURCES, annotated_folder_run, write


@pytest.fixture(scope="module")
def folder_run(tiny_model_dir, tmp_path_factory):
    return annotated_folder_run(tiny_model_dir, tmp_path_factory.mktemp("folder-run"))


def on_source_grid(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The 32 px mask drawn back over each test source by hand: a 64 px square halves, the
    64 x 96 one also loses 8 model-frame columns... i.e. 16 source columns each side."""
    if (rows, cols) == (32, 32):
        return mask.copy()
    big = mask.repeat(2, axis=0).repeat(2, axis=1)
    if (rows, cols) == (64, 64):
        return big
    out = np.full((64, 96), 255, np.uint8)
    out[:, 16:80] = big
    return out


def hand_scores(pairs: list[tuple[np.ndarray, np.ndarray]], classes: list[int], band: str) -> dict:
    """VOC scores counted class by class with plain comparisons."""
    hits = {c: [0, 0] for c in [0, *classes]}  # class -> [intersection, union]
    correct = total = fg_hit = fg_union = 0
    for truth, predicted in pairs:
        truth = np.where(np.isin(truth, [0, 255, *classes]), truth, 0)
        valid = truth != 255
        if band == "ignore":
            valid &= predicted != 255
        predicted = np.where(predicted == 255, 0, predicted)
        for c in hits:
            hits[c][0] += int(((truth == c) & (predicted == c) & valid).sum())
            hits[c][1] += int((((truth == c) | (predicted == c)) & valid).sum())
        correct += int(((truth == predicted) & valid).sum())
        total += int(valid.sum())
        fg_hit += int(((truth > 0) & (predicted > 0) & valid).sum())
        fg_union += int((((truth > 0) | (predicted > 0)) & valid).sum())
    per_class = {c: i / u for c, (i, u) in hits.items() if u}
    return {"per_class": per_class, "miou": sum(per_class.values()) / len(per_class),
            "foreground_iou": fg_hit / fg_union, "pixel_accuracy": correct / total}


def hand_truth(rows: int, cols: int, seed: int, class_id: int) -> np.ndarray:
    """A rectangle of the class, another class's square, a void stripe and an unknown value."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((rows, cols), np.uint8)
    top, left = rng.integers(0, rows // 2), rng.integers(0, cols // 2)
    truth[top : top + rows // 2, left : left + cols // 3] = class_id
    truth[:4, -6:] = 7 if class_id == 1 else 1
    truth[-2:, :] = 255
    truth[rows // 2, :3] = 42  # a class the run does not have: background
    return truth


def write_voc_truth(folder: Path) -> dict[str, np.ndarray]:
    """Palette PNGs as VOC ships them (d: the dropped file's truth)."""
    truths = {}
    for i, (name, rows, cols) in enumerate(SOURCES):
        rows, cols = rows or 40, cols or 40
        truth = hand_truth(rows, cols, i, 1 if name.startswith("dog") else 7)
        image = Image.fromarray(truth, mode="L").convert("P")
        image.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{Path(name).stem}.png")
        truths[Path(name).stem] = truth
    assert np.array_equal(np.asarray(Image.open(folder / "a.png")), truths["a"])  # indices, not colours
    return truths


@pytest.mark.parametrize("band", ["background", "ignore"])
def test_evaluate_scores_against_hand_made_voc_truth(folder_run, tmp_path, capsys, band):
    _, out, _ = folder_run
    truths = write_voc_truth(tmp_path / "SegmentationClass")
    samples = {Path(s.metadata["source"]["path"]).stem: s for s in read_samples(out)}
    assert sorted(samples) == ["a", "b", "c"]
    pairs = []
    for i, (name, rows, cols) in enumerate(SOURCES[:3]):
        predicted = on_source_grid(samples[Path(name).stem].mask, rows, cols)
        pairs.append((truths[Path(name).stem], predicted))
    expected = hand_scores(pairs, [1, 7], band)
    with_drops = hand_scores(pairs + [(truths["d"], np.zeros((40, 40), np.uint8))], [1, 7], band)

    assert launch.main(["evaluate", str(out), "--truth", str(tmp_path / "SegmentationClass"), "--json",
                        "--band", band]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["dropped"] == 1 and report["no_truth"] == 0
    names = {0: "background", 1: "dog", 7: "zebra"}
    assert report["per_class"] == pytest.approx({names[c]: v for c, v in expected["per_class"].items()}, abs=1e-5)
    for score in ("miou", "foreground_iou", "pixel_accuracy"):
        assert report[score] == pytest.approx(expected[score], abs=1e-5), score
    assert report["miou_with_drops"] == pytest.approx(with_drops["miou"], abs=1e-5)
    assert report["miou_with_drops"] != report["miou"]  # the dropped image counts there

    assert launch.main(["evaluate", str(out), "--truth", str(tmp_path / "SegmentationClass"), "--band", band]) == 0
    text = capsys.readouterr().out
    assert f"mIoU {report['miou']:.4f}" in text and "dropped 1" in text


def coco_truth(path: Path, truths: dict[str, np.ndarray]) -> None:
    """The hand-made truths as COCO: each region once as a polygon, compressed RLE or plain RLE."""
    from pycocotools import mask as coco_mask

    import cv2

    images, annotations = [], []
    for number, (stem, truth) in enumerate(sorted(truths.items()), start=1):
        rows, cols = truth.shape
        images.append({"id": number, "file_name": f"photos/{stem}.jpg", "height": rows, "width": cols})
        for class_id in (1, 7):
            region = truth == class_id
            if not region.any():
                continue
            kind = (number + class_id) % 3
            if kind == 0:
                contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                segmentation = [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]
            elif kind == 1:
                rle = coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode()}
            else:
                flat = region.reshape(-1, order="F").astype(np.int8)
                edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
                counts = np.diff(np.concatenate([[0], edges])).tolist()
                segmentation = {"size": [rows, cols], "counts": counts}
            annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": class_id,
                                "segmentation": segmentation, "area": int(region.sum()), "iscrowd": 0,
                                "bbox": [0, 0, cols, rows]})
        top = np.zeros_like(truth, dtype=bool)  # a large region under the others: painted first
        top[: rows // 2] = True
        rle = coco_mask.encode(np.asfortranarray(top.astype(np.uint8)))
        annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 7, "iscrowd": 0,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "area": int(top.sum()) + rows * cols, "bbox": [0, 0, cols, rows]})
        void = truth == 255  # VOC's void as a crowd region
        rle = coco_mask.encode(np.asfortranarray(void.astype(np.uint8)))
        annotations.append({"id": len(annotations) + 1, "image_id": number, "category_id": 1, "iscrowd": 1,
                            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "area": 0, "bbox": [0, 0, cols, rows]})
    categories = [{"id": 1, "name": "dog"}, {"id": 7, "name": "zebra"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def test_evaluate_reads_coco_truth_as_pycocotools_does(folder_run, tmp_path, capsys):
    from pycocotools.coco import COCO

    _, out, _ = folder_run
    truths = write_voc_truth(tmp_path / "voc")
    coco_truth(tmp_path / "instances.json", truths)
    coco = COCO(str(tmp_path / "instances.json"))
    reference = {}
    for image in coco.dataset["images"]:  # semantic masks through pycocotools' own decoding
        mask = np.zeros((image["height"], image["width"]), np.uint8)
        for annotation in sorted(coco.imgToAnns[image["id"]], key=lambda a: -a["area"]):
            mask[coco.annToMask(annotation) > 0] = 255 if annotation["iscrowd"] else annotation["category_id"]
        reference[Path(image["file_name"]).stem] = mask
    capsys.readouterr()  # pycocotools' own notices
    samples = {Path(s.metadata["source"]["path"]).stem: s for s in read_samples(out)}
    pairs = [(reference[Path(n).stem], on_source_grid(samples[Path(n).stem].mask, r, c)) for n, r, c in SOURCES[:3]]
    expected = hand_scores(pairs, [1, 7], "background")

    assert launch.main(["evaluate", str(out), "--truth", str(tmp_path / "instances.json"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["dropped"] == 1
    # polygons are rasterised by the pixel-centre rule, pycocotools' by its own: a few edge pixels
    assert report["miou"] == pytest.approx(expected["miou"], abs=0.005)
    assert report["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"], abs=0.005)


def test_coco_regions_decode_as_pycocotools_decodes_them():
    from pycocotools import mask as coco_mask

    from maskmint.pipeline.evaluate import decode_segmentation

    rng = np.random.default_rng(0)
    mismatched = total = 0
    for trial in range(60):
        rows, cols = (int(n) for n in rng.integers(5, 70, 2))
        region = rng.random((rows, cols)) < rng.uniform(0.05, 0.95)  # ragged: long and short runs, signed deltas
        rle = coco_mask.encode(np.asfortranarray(region.astype(np.uint8)))
        compressed = {"size": rle["size"], "counts": rle["counts"].decode()}
        assert np.array_equal(decode_segmentation(compressed, rows, cols), coco_mask.decode(rle).astype(bool))
        points = rng.uniform(0, [cols, rows], (int(rng.integers(3, 9)), 2)).reshape(-1).tolist()
        reference = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects([points], rows, cols))).astype(bool)
        mismatched += int((decode_segmentation([points], rows, cols) ^ reference).sum())
        total += int(reference.sum())
    assert mismatched < 0.06 * total, (mismatched, total)


def test_evaluate_mistakes_are_one_line(folder_run, tmp_path, capsys):
    _, out, _ = folder_run
    rgb = tmp_path / "rgb"
    save(rgb / "a.png", scene(1))
    unrelated = tmp_path / "unrelated"
    save(unrelated / "zzz.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.json").write_text("{\"images\": 3}")
    cases = {
        str(tmp_path / "nothing"): f"error: --truth: '{tmp_path / 'nothing'}' is neither a folder of PNG masks nor a "
                                   "COCO .json file",
        str(rgb): f"error: {rgb / 'a.png'}: a RGB image, not class indices (a palette or grey PNG)",
        str(unrelated): f"error: {out}: no annotated sample's source image has truth in {unrelated} (matched by file "
                        "stem: images/0001.jpg <-> 0001.png, or a COCO image's file_name)",
        str(tmp_path / "broken.json"): f"error: {tmp_path / 'broken.json'}: not a COCO instances json "
                                       "(TypeError: 'int' object is not iterable)",
    }
    for truth, error in cases.items():
        assert launch.main(["evaluate", str(out), "--truth", truth]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [error]
    assert launch.main(["evaluate", str(tmp_path), "--truth", str(unrelated)]) == 2
    assert "not a maskmint run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        launch.main(["evaluate", str(out), "--truth", str(unrelated), "--band", "half"])
    assert exit_.value.code == 2


def test_a_run_stored_at_the_source_size_keeps_the_source_and_scores_the_same(folder_run, tiny_model_dir, tmp_path,
                                                                              capsys):
    config, fitted_run, images = folder_run
    data = yaml.safe_load(config.read_text())
    data["annotate"]["store_size"] = "source"
    data["output"]["image_format"] = "png"
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write(data, tmp_path / "run.yaml")), "--out", str(out), "--quiet"]) == 0
    fitted = {s.key: s for s in read_samples(fitted_run)}
    stored = {s.key: s for s in read_samples(out)}
    assert sorted(stored) == sorted(fitted) == ["0000000000", "0000000001", "0000000002"]
    for (name, rows, cols), key in zip(SOURCES, sorted(stored)):
        sample = stored[key]
        source = np.asarray(Image.open(images / name).convert("RGB"))
        assert np.array_equal(sample.image, source)  # the source itself, not a resample of it
        assert np.array_equal(sample.mask, on_source_grid(fitted[key].mask, rows, cols))
        assert sample.heatmap.shape == (1, rows, cols) and sample.background.shape == (rows, cols, 3)
        assert (sample.metadata["height"], sample.metadata["width"]) == (rows, cols)
        if cols == 96:  # where the crop cut away, the background is the source's own pixels
            assert np.array_equal(sample.background[:, :16], source[:, :16])
    truth = tmp_path / "truth"
    write_voc_truth(truth)
    capsys.readouterr()
    reports = []
    for run in (fitted_run, out):
        assert launch.main(["evaluate", str(run), "--truth", str(truth), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert {k: v for k, v in reports[0].items() if k != "run"} == {k: v for k, v in reports[1].items() if k != "run"}
