"""Encode samples and write a WebDataset shard that appears whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from schemas.records import HEATMAP_FIELD, MASK_FIELD, METADATA_FIELD, SampleMetadata, background_field

TEMP_PREFIX = "."  # temp files are hidden, so `*.tar` globs never see a half-written shard


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """uint8 RGB [H,W,3] or gray [H,W] -> JPEG/PNG bytes."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if image_format == "jpg" else []
    ok, buffer = cv2.imencode(f".{image_format}", image, params)
    if not ok:
        raise RuntimeError(f"could not encode a {image.shape} image as {image_format}")
    return buffer.tobytes()


def heatmap_png(heat: np.ndarray) -> bytes:
    """[C, H, W] maps in [0, 1] -> one gray PNG, concepts side by side."""
    tiles = np.concatenate(list(heat), axis=1)
    return encode_image((tiles.clip(0, 1) * 255).round().astype(np.uint8), "png")


def encode_sample(
    key: str,
    image: np.ndarray,
    mask: np.ndarray,
    background: np.ndarray,
    heat: np.ndarray,
    metadata: SampleMetadata,
    image_format: str,
    jpeg_quality: int,
) -> dict:
    return {
        "__key__": key,
        image_format: encode_image(image, image_format, jpeg_quality),
        MASK_FIELD: encode_image(mask, "png"),
        background_field(image_format): encode_image(background, image_format, jpeg_quality),
        HEATMAP_FIELD: heatmap_png(heat),
        METADATA_FIELD: metadata.model_dump_json().encode(),
    }


def temp_path(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = temp_path(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shard(tar_path: Path, stats_path: Path, samples: list[dict], stats_json: str) -> None:
    """The tar is renamed into place first and the stats json last: a shard counts as whole
    only when both exist, so a crash in between leaves a shard that is simply redone."""
    tmp = temp_path(tar_path)
    with open(tmp, "wb") as handle:
        with wds.TarWriter(handle) as writer:
            for sample in samples:
                writer.write(sample)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tar_path)
    atomic_write_bytes(stats_path, stats_json.encode())


def load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
