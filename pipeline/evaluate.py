"""evaluate: an annotated run's masks scored against the user's own labelled truth.

Truth is a folder of class-index PNGs named like the source images (PASCAL VOC's
SegmentationClass layout: 0 background, class ids, 255 void), or a COCO instances json whose
category ids are the run's class ids. Each kept sample is matched to its truth by the stem of
its source image, and its mask is carried back onto the source image's grid (the inverse of
`annotate.fit`, nearest neighbour) and then to the truth's size. Scores are accumulated over
all pixels, as VOC does: per class TP / (TP + FP + FN), background included in the mean.

- A mask's 255 (the uncertain band, and source pixels a crop cut away) counts as background
  by default, so uncertainty is never free; `band="ignore"` leaves those pixels out instead.
- Truth values that are not the run's classes count as background; 255 in the truth is void.
- Dropped images are reported, and scored as all background in `miou_with_drops`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
from PIL import Image, ImageOps
from skimage import draw

from maskmint.pipeline.dataset import read_encoded
from maskmint.pipeline.export import rle_decode
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.config import AnnotateConfig, EvaluateBand
from maskmint.schemas.inputs import read_source_bytes
from maskmint.schemas.records import BACKGROUND_ID, IGNORE_INDEX, MASK_FIELD, METADATA_FIELD
from maskmint.stages.annotate import to_source_grid

BANDS = get_args(EvaluateBand)


class EvaluateError(ValueError):
    """Truth that cannot be read or matched; the message is meant to be shown as is."""


def read_class_png(path: Path) -> np.ndarray:
    """Class indices of a PNG: a palette PNG's indices (VOC), or a grey one's values."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I"):
            raise EvaluateError(f"{path}: a {image.mode} image, not class indices (a palette or grey PNG)")
        values = np.asarray(image)
    if values.max(initial=0) > IGNORE_INDEX:
        raise EvaluateError(f"{path}: holds values above {IGNORE_INDEX}; class indices are 0..254 and 255 void")
    return values.astype(np.uint8)


class PngTruth:
    """A folder (searched recursively) of class-index PNGs, one per source image's stem."""

    def __init__(self, root: Path):
        self.paths: dict[str, Path] = {}
        for path in sorted(root.rglob("*.png")):
            if path.stem in self.paths:
                raise EvaluateError(f"{root}: two truth files for '{path.stem}' ({self.paths[path.stem]}, {path})")
            self.paths[path.stem] = path
        if not self.paths:
            raise EvaluateError(f"{root}: holds no PNG truth mask")

    def __contains__(self, stem: str) -> bool:
        return stem in self.paths

    def mask(self, stem: str) -> np.ndarray:
        return read_class_png(self.paths[stem])


def rle_from_string(counts: str) -> list[int]:
    """COCO's compressed RLE counts (a string of 5-bit groups, each count after the second stored
    as its difference from the count two before) as run lengths."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            group = ord(counts[position]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO annotation's region as a boolean [height, width] mask: RLE (plain or compressed)
    exactly; polygons in COCO's corner-origin coordinates, a pixel inside when its centre is
    (pycocotools' own rasteriser differs from that on a few edge pixels)."""
    if isinstance(segmentation, list):
        region = np.zeros((height, width), bool)
        for polygon in segmentation:
            points = np.asarray(polygon, np.float64).reshape(-1, 2)
            if len(points) >= 3:
                rows, cols = draw.polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, (height, width))
                region[rows, cols] = True
        return region
    counts = segmentation["counts"]
    runs = rle_from_string(counts if isinstance(counts, str) else counts.decode()) if isinstance(counts, str | bytes) else counts
    return rle_decode({"size": segmentation["size"], "counts": runs})


class CocoTruth:
    """A COCO instances json: each image's annotations painted by category id, the largest
    first so that smaller objects lie on top; crowd regions are void."""

    def __init__(self, path: Path):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.images = {Path(image["file_name"]).stem: image for image in data["images"]}
            self.annotations: dict[int, list[dict]] = {}
            for annotation in data["annotations"]:
                self.annotations.setdefault(annotation["image_id"], []).append(annotation)
        except (ValueError, KeyError, TypeError) as error:
            raise EvaluateError(f"{path}: not a COCO instances json ({type(error).__name__}: {error})") from None

    def __contains__(self, stem: str) -> bool:
        return stem in self.images

    def mask(self, stem: str) -> np.ndarray:
        image = self.images[stem]
        height, width = image["height"], image["width"]
        mask = np.zeros((height, width), np.uint8)
        for annotation in sorted(self.annotations.get(image["id"], []), key=lambda a: -a.get("area", 0)):
            region = decode_segmentation(annotation["segmentation"], height, width)
            mask[region] = IGNORE_INDEX if annotation.get("iscrowd") else annotation["category_id"]
        return mask


def open_truth(path: Path) -> PngTruth | CocoTruth:
    if path.is_dir():
        return PngTruth(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return CocoTruth(path)
    raise EvaluateError(f"--truth: '{path}' is neither a folder of PNG masks nor a COCO .json file")


def upright_size(path: str) -> tuple[int, int]:
    """(rows, cols) of an image as annotate saw it, EXIF rotation applied (for runs whose
    samples do not record it)."""
    with Image.open(io.BytesIO(read_source_bytes(path))) as image:
        return ImageOps.exif_transpose(image).size[::-1]


class Confusion:
    """Pixel counts of truth class x predicted class, over the run's classes and background."""

    def __init__(self, class_ids: list[int]):
        self.ids = [BACKGROUND_ID, *class_ids]
        self.index = np.zeros(256, np.int64)  # any other value: background
        for position, class_id in enumerate(self.ids):
            self.index[class_id] = position
        self.counts = np.zeros((len(self.ids), len(self.ids)), np.int64)

    def add(self, truth: np.ndarray, predicted: np.ndarray, band: str) -> None:
        scored = truth != IGNORE_INDEX
        if band == "ignore":
            scored &= predicted != IGNORE_INDEX
        t, p = self.index[truth[scored]], self.index[predicted[scored]]  # predicted 255 -> background
        self.counts += np.bincount(t * len(self.ids) + p, minlength=self.counts.size).reshape(self.counts.shape)

    def scores(self, names: dict[int, str]) -> dict:
        counts = self.counts
        hit = np.diag(counts)
        union = counts.sum(0) + counts.sum(1) - hit
        per_class = {("background" if i == BACKGROUND_ID else names[i]): round(float(hit[k] / union[k]), 5)
                     for k, i in enumerate(self.ids) if union[k]}
        fg_hit = counts[1:, 1:].sum()  # foreground against background, whatever the class
        fg_union = counts.sum() - counts[0, 0]
        return {
            "miou": round(float(np.mean(list(per_class.values()))), 5) if per_class else None,
            "per_class": per_class,
            "foreground_iou": round(float(fg_hit / fg_union), 5) if fg_union else None,
            "pixel_accuracy": round(float(hit.sum() / counts.sum()), 5) if counts.sum() else None,
        }


def predicted_on(truth: np.ndarray, mask: np.ndarray, source: dict, how: str) -> np.ndarray:
    """The sample's mask on the truth's grid: unfitted to the source image, then to the truth's size."""
    rows, cols = source.get("size") or upright_size(source["path"])
    if mask.shape != (rows, cols):
        mask = to_source_grid(mask, rows, cols, how, IGNORE_INDEX, cv2.INTER_NEAREST_EXACT)
    if mask.shape != truth.shape:
        mask = cv2.resize(mask, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
    return mask


def evaluate(run_dir: Path | str, truth_path: Path | str, band: str = "background") -> dict:
    if band not in BANDS:
        raise EvaluateError(f"--band: '{band}' is not one of {', '.join(BANDS)}")
    rundir = RunDir(run_dir)
    manifest = rundir.manifest()
    truth = open_truth(Path(truth_path))
    names = {int(k): v for k, v in manifest.classes.items()}
    how = AnnotateConfig.model_validate(manifest.config.get("annotate", {})).fit
    kept, with_drops = Confusion(sorted(names)), Confusion(sorted(names))
    stats = rundir.shard_stats()
    report = {"run": str(run_dir), "truth": str(truth_path), "band": band, "images": 0, "dropped": 0,
              "no_truth": 0, "generated": 0, "whole": rundir.summarise().whole}
    for raw in read_encoded(rundir.root):
        metadata = json.loads(raw[METADATA_FIELD])
        source = metadata.get("source")
        if source is None:
            report["generated"] += 1
            continue
        stem = Path(source["path"]).stem
        if stem not in truth:
            report["no_truth"] += 1
            continue
        target = truth.mask(stem)
        mask = cv2.imdecode(np.frombuffer(raw[MASK_FIELD], np.uint8), cv2.IMREAD_UNCHANGED)
        predicted = predicted_on(target, mask, source, how)
        kept.add(target, predicted, band)
        with_drops.add(target, predicted, band)
        report["images"] += 1
    for shard in stats:
        for key in shard.dropped:
            stem = Path(shard.sources[key]).stem if key in shard.sources else None
            if stem is not None and stem in truth:
                target = truth.mask(stem)
                with_drops.add(target, np.zeros_like(target), band)
                report["dropped"] += 1
    if report["images"] + report["dropped"] == 0:
        raise EvaluateError(
            f"{run_dir}: no annotated sample's source image has truth in {truth_path} "
            "(matched by file stem: images/0001.jpg <-> 0001.png, or a COCO image's file_name)"
        )
    report |= kept.scores(names)
    report["miou_with_drops"] = with_drops.scores(names)["miou"]
    return report


def describe(report: dict) -> list[str]:
    state = "" if report["whole"] else " (a partial run: its whole shards only)"
    lines = [f"{report['run']}: {report['images']} images scored against {report['truth']}{state}"]
    if report["miou"] is not None:
        lines.append(f"  mIoU {report['miou']:.4f}, foreground IoU {report['foreground_iou']:.4f}, "
                     f"pixel accuracy {report['pixel_accuracy']:.4f} (mask band as {report['band']})")
    lines.append("  " + ", ".join(f"{name} {iou:.4f}" for name, iou in report["per_class"].items()))
    lines.append(f"  dropped {report['dropped']}: mIoU with drops as background {report['miou_with_drops']:.4f}")
    if report["no_truth"]:
        lines.append(f"  {report['no_truth']} kept samples have no truth (not scored)")
    if report["generated"]:
        lines.append(f"  {report['generated']} generated samples (not scored)")
    return lines
