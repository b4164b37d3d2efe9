"""Exports of a run to formats other tools read, streamed sample by sample.

- `folders`: OUT/images/KEY.jpg|png, OUT/masks/KEY.png (class indices, 255 ignore),
  OUT/backgrounds/KEY.*, OUT/metadata/KEY.json and OUT/classes.json: what most semantic
  segmentation codebases take.
- `hf`: Hugging Face `datasets` Arrow shards, loaded with `datasets.load_from_disk(OUT)`
  (see `export_hf`).
- `coco`: OUT/images/KEY.* and OUT/annotations.json in COCO's instance format: one
  annotation per connected component of each class, its segmentation an uncompressed RLE
  (column-major counts, as pycocotools reads it), bbox and area; 255 pixels belong to no
  annotation. Image and annotation records are spooled to disk as they come, so memory
  stays flat however large the run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import get_args

import cv2
import numpy as np

from maskmint.pipeline.dataset import read_encoded
from maskmint.pipeline.rundir import RunDir, RunDirError
from maskmint.schemas.config import ExportFormat
from maskmint.schemas.records import BACKGROUND_ID, IGNORE_INDEX, MASK_FIELD, METADATA_FIELD

FORMATS = get_args(ExportFormat)


def rle_encode(region: np.ndarray) -> dict:
    """COCO uncompressed RLE of a boolean [H, W] mask: run lengths over column-major pixels,
    starting with a run of zeros."""
    flat = np.asfortranarray(region).reshape(-1, order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"size": list(region.shape), "counts": counts}


def rle_decode(rle: dict) -> np.ndarray:
    height, width = rle["size"]
    values = np.zeros(height * width, np.uint8)
    position, value = 0, 0
    for count in rle["counts"]:
        values[position : position + count] = value
        position += count
        value = 1 - value
    return values.reshape((height, width), order="F").astype(bool)


def instances(mask: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(class id, component) for every connected component of every class in the mask."""
    for class_id in np.unique(mask):
        if class_id in (BACKGROUND_ID, IGNORE_INDEX):
            continue
        count, labels = cv2.connectedComponents((mask == class_id).astype(np.uint8), connectivity=8)
        for label in range(1, count):
            yield int(class_id), labels == label


def export(run_dir: Path | str, out: Path | str, fmt: str) -> int:
    """Write the run's whole shards to OUT in `fmt`; returns the number of samples."""
    if fmt not in FORMATS:
        raise RunDirError(f"unknown export format '{fmt}' (choose from {', '.join(FORMATS)})")
    rundir = RunDir(run_dir)
    manifest = rundir.manifest()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out}: is a file; --out takes a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise RunDirError(f"{out}: exists and is not empty; choose an empty or new folder")
    if fmt == "hf":
        return export_hf(run_dir, out, manifest)
    image_field, background_field = manifest.fields["image"], manifest.fields["background"]
    suffix = "." + image_field
    folders = ["images", "masks", "backgrounds", "metadata"] if fmt == "folders" else ["images"]
    for name in folders:
        (out / name).mkdir(parents=True, exist_ok=True)
    classes = {int(k): v for k, v in manifest.classes.items()}

    count = 0
    with (
        tempfile.TemporaryDirectory(dir=out) as spool,
        open(Path(spool) / "images.jsonl", "w") as images_spool,
        open(Path(spool) / "annotations.jsonl", "w") as annotations_spool,
    ):
        annotation_id = 0
        for image_id, stored in enumerate(read_encoded(run_dir), start=1):
            key = stored["__key__"]
            # files are copied as stored: no re-encoding, no loss
            (out / "images" / f"{key}{suffix}").write_bytes(stored[image_field])
            if fmt == "folders":
                (out / "masks" / f"{key}.png").write_bytes(stored[MASK_FIELD])
                (out / "backgrounds" / f"{key}{suffix}").write_bytes(stored[background_field])
                (out / "metadata" / f"{key}.json").write_bytes(stored[METADATA_FIELD])
            else:
                mask = cv2.imdecode(np.frombuffer(stored[MASK_FIELD], np.uint8), cv2.IMREAD_UNCHANGED)
                height, width = mask.shape
                images_spool.write(json.dumps({
                    "id": image_id, "file_name": f"images/{key}{suffix}", "height": height, "width": width,
                    "maskmint_key": key, "prompt": json.loads(stored[METADATA_FIELD]).get("prompt"),
                }) + "\n")
                for class_id, region in instances(mask):
                    annotation_id += 1
                    x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
                    annotations_spool.write(json.dumps({
                        "id": annotation_id, "image_id": image_id, "category_id": class_id, "iscrowd": 0,
                        "area": int(region.sum()), "bbox": [x, y, w, h], "segmentation": rle_encode(region),
                    }) + "\n")
            count += 1
        images_spool.flush()
        annotations_spool.flush()
        if fmt == "folders":
            (out / "classes.json").write_text(json.dumps({BACKGROUND_ID: "background", **classes, IGNORE_INDEX: "ignore"}, indent=1))
        else:
            _stitch_coco(out / "annotations.json", classes, Path(spool))
    return count


def class_label_names(classes: dict[int, str]) -> list[str]:
    """ClassLabel names indexed by class id (0 background; ids the run does not use get a
    placeholder, so a label's index is its mask value)."""
    names = [f"unused_{i}" for i in range(max(classes, default=0) + 1)]
    names[BACKGROUND_ID] = "background"
    for class_id, name in classes.items():
        names[class_id] = name
    return names


def export_hf(run_dir: Path | str, out: Path, manifest) -> int:
    """Hugging Face `datasets` Arrow shards (`datasets.load_from_disk(OUT)`): image, mask,
    background and heat map as `Image` features holding the stored bytes (no re-encoding;
    mask values stay class ids, 255 ignore), the sample's classes as a `ClassLabel` sequence
    (names indexed by class id), prompt and metadata. Written through a generator, batch
    by batch, so memory stays flat."""
    try:
        import datasets
    except ImportError:
        raise RunDirError("export --format hf needs the `datasets` package: pip install -e \".[hf]\"") from None
    datasets.disable_progress_bars()
    fields = manifest.fields
    classes = {int(k): v for k, v in manifest.classes.items()}
    features = datasets.Features({
        "key": datasets.Value("string"),
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "background": datasets.Image(),
        "heatmap": datasets.Image(),
        "classes": datasets.Sequence(datasets.ClassLabel(names=class_label_names(classes))),
        "prompt": datasets.Value("string"),
        "metadata": datasets.Value("string"),
    })

    def rows():
        for stored in read_encoded(run_dir):
            metadata = json.loads(stored[fields["metadata"]])
            yield {
                "key": stored["__key__"],
                **{name: {"bytes": stored[fields[name]], "path": None} for name in ("image", "mask", "background", "heatmap")},
                "classes": [c["class_id"] for c in metadata["concepts"]],
                "prompt": metadata["prompt"],
                "metadata": stored[fields["metadata"]].decode(),
            }

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as cache:
        dataset = datasets.Dataset.from_generator(rows, features=features, cache_dir=cache)
        if len(dataset) == 0:
            raise RunDirError(f"{run_dir}: no whole shard with samples to export yet")
        dataset.save_to_disk(str(out))
    return len(dataset)


def _stitch_coco(path: Path, classes: dict[int, str], spool: Path) -> None:
    """annotations.json from the spooled records, line by line."""

    def copy_array(handle, name: str, source: Path) -> None:
        handle.write(f'"{name}": [')
        with open(source) as lines:
            for i, line in enumerate(lines):
                handle.write(("," if i else "") + "\n" + line.rstrip("\n"))
        handle.write("\n]")

    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        categories = [{"id": k, "name": v, "supercategory": "object"} for k, v in sorted(classes.items())]
        handle.write('{"info": {"description": "maskmint export"},\n"categories": ' + json.dumps(categories) + ",\n")
        copy_array(handle, "images", spool / "images.jsonl")
        handle.write(",\n")
        copy_array(handle, "annotations", spool / "annotations.jsonl")
        handle.write("}\n")
    shutil.move(tmp, path)
