"""Reading maskmint shards back: for training, previews and exports, all through webdataset.

A source is a run directory (its whole shards are read, pending ones skipped), a shard
path/URL, a brace pattern ("runs/a/shards/{000000..000009}.tar") or a list of those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import webdataset as wds

from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.records import (
    HEATMAP_FIELD,
    IGNORE_INDEX,
    IMAGE_FIELDS,
    MASK_FIELD,
    METADATA_FIELD,
    background_field,
)

Source = str | Path | list[str | Path]


def shard_urls(source: Source) -> list[str]:
    if isinstance(source, list):
        return [url for item in source for url in shard_urls(item)]
    path = Path(source)
    if path.is_dir():
        rundir = RunDir(path)
        rundir.manifest()  # a clear error when it is not a run directory
        return [str(rundir.tar_path(s)) for s in sorted(rundir.complete_shards())]
    return [str(source)]


@dataclass
class Sample:
    key: str
    image: np.ndarray  # [H, W, 3] uint8 RGB
    mask: np.ndarray  # [H, W] uint8: 0 background, class ids, 255 ignore
    background: np.ndarray  # [H, W, 3] uint8 RGB
    heatmap: np.ndarray  # [C, H, W] uint8, one map per concept
    metadata: dict


def _to_sample(raw: dict) -> Sample:
    """A webdataset sample decoded with "rgb8" -> Sample; image fields found by suffix, jpg or png."""
    image_field = next(k for k in IMAGE_FIELDS.values() if k in raw)
    metadata = raw[METADATA_FIELD]
    if isinstance(metadata, bytes | str):
        metadata = json.loads(metadata)
    mask = raw[MASK_FIELD]
    heat = raw[HEATMAP_FIELD]
    mask = mask[..., 0] if mask.ndim == 3 else mask
    heat = heat[..., 0] if heat.ndim == 3 else heat
    width = mask.shape[1]
    return Sample(
        key=raw["__key__"],
        image=raw[image_field],
        mask=mask,
        background=raw[background_field(image_field)],
        heatmap=np.stack(np.split(heat, heat.shape[1] // width, axis=1)),
        metadata=metadata,
    )


def read_encoded(source: Source) -> Iterator[dict]:
    """Samples as stored: {"__key__", field: bytes}; for copying files out without re-encoding."""
    urls = shard_urls(source)
    return iter(wds.WebDataset(urls, shardshuffle=False, empty_check=False)) if urls else iter(())


def read_samples(source: Source, shuffle: int = 0, seed: int = 0) -> Iterator[Sample]:
    """Decoded samples in shard order, or shuffled through a buffer of `shuffle` samples."""
    urls = shard_urls(source)
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, seed=seed)
    if shuffle:
        dataset = dataset.shuffle(shuffle)
    return map(_to_sample, dataset.decode("rgb8"))


def joint_resize_crop(size: int, train: bool = True) -> Callable[[Sample, np.random.Generator], Sample]:
    """Resize the short side to `size` and crop a square (random when training, else centre),
    the same window on image, mask, background and heat map; masks use nearest so 255 stays 255."""

    def transform(sample: Sample, rng: np.random.Generator) -> Sample:
        height, width = sample.mask.shape
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        top = int(rng.integers(0, new_h - size + 1)) if train else (new_h - size) // 2
        left = int(rng.integers(0, new_w - size + 1)) if train else (new_w - size) // 2
        flip = train and rng.random() < 0.5

        def fit(array: np.ndarray, nearest: bool) -> np.ndarray:
            if (new_h, new_w) != array.shape[:2]:
                interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
                array = cv2.resize(array, (new_w, new_h), interpolation=interpolation)
            array = array[top : top + size, left : left + size]
            return np.ascontiguousarray(array[:, ::-1] if flip else array)

        return Sample(
            key=sample.key,
            image=fit(sample.image, nearest=False),
            mask=fit(sample.mask, nearest=True),
            background=fit(sample.background, nearest=False),
            heatmap=np.stack([fit(h, nearest=False) for h in sample.heatmap]),
            metadata=sample.metadata,
        )

    return transform


def segmentation_dataset(
    source: Source,
    size: int | None = None,
    train: bool = True,
    shuffle: int = 256,
    seed: int = 0,
    with_background: bool = False,
):
    """An iterable torch dataset of (image float [3, S, S] in [0, 1], mask int64 [S, S]) pairs,
    ignore index 255 kept; with_background adds the background image. Use it with a plain
    DataLoader: webdataset splits shards across workers (give at least as many shards)."""
    import torch

    transform = joint_resize_crop(size, train) if size else None
    rngs: dict[int, np.random.Generator] = {}

    def worker_rng() -> np.random.Generator:
        """One generator per DataLoader worker: a shared seed would give every worker the same crops."""
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else -1
        if worker not in rngs:
            rngs[worker] = np.random.default_rng([seed, worker + 1])
        return rngs[worker]

    def to_tensors(raw: dict):
        sample = _to_sample(raw)
        if transform is not None:
            sample = transform(sample, worker_rng())
        image = torch.from_numpy(np.array(sample.image)).permute(2, 0, 1).float().div_(255)  # decoded arrays are read-only
        mask = torch.from_numpy(sample.mask.astype(np.int64))
        if with_background:
            return image, mask, torch.from_numpy(np.array(sample.background)).permute(2, 0, 1).float().div_(255)
        return image, mask

    urls = shard_urls(source)
    dataset = wds.WebDataset(
        urls, shardshuffle=len(urls) if train else False, nodesplitter=wds.split_by_node, empty_check=False, seed=seed
    )
    if train and shuffle:
        dataset = dataset.shuffle(shuffle)
    return dataset.decode("rgb8").map(to_tensors)


__all__ = [
    "IGNORE_INDEX", "Sample", "joint_resize_crop", "read_encoded", "read_samples", "segmentation_dataset", "shard_urls",
]
