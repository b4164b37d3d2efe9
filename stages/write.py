"""Encode samples and write a WebDataset shard that appears whole or not at all."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from maskmint.schemas.records import HEATMAP_FIELD, MASK_FIELD, METADATA_FIELD, SampleMetadata, ShardStats, background_field
from maskmint.stages.durable import file_sha256, fsync_dir, write_temp


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


def write_shard(
    tar_path: Path,
    stats_path: Path,
    samples: list[dict],
    stats: ShardStats,
    before_publish: Callable[[], None] = lambda: None,
) -> ShardStats:
    """Both files are written under temp names first; `before_publish` may still refuse
    (a fenced writer). Then the tar is renamed into place and the stats json last: a shard
    counts as whole only when both exist and agree, so a crash in between leaves a shard
    that is simply redone. The stats record the tar's size and digest for that check."""

    def write_tar(handle) -> None:
        with wds.TarWriter(handle) as writer:
            for sample in samples:
                writer.write(sample)

    tar_tmp = write_temp(tar_path, write_tar)
    stats_tmp = None
    try:
        stats = stats.model_copy(update={"tar_bytes": tar_tmp.stat().st_size, "tar_sha256": file_sha256(tar_tmp)})
        stats_tmp = write_temp(stats_path, lambda handle: handle.write(stats.model_dump_json(indent=1).encode()))
        before_publish()
        os.replace(tar_tmp, tar_path)
        try:
            os.replace(stats_tmp, stats_path)
        except BaseException:
            tar_path.unlink(missing_ok=True)  # its stats never landed: nothing of the shard stays visible
            raise
    finally:
        for tmp in (tar_tmp, stats_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    fsync_dir(tar_path.parent)
    return stats
