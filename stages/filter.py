"""Filter: keep a sample only if its image and mask are usable; every drop has a reason."""

from __future__ import annotations

import numpy as np

from maskmint.schemas.config import FilterConfig


def drop_reason(image: np.ndarray, finite: bool, quality: dict[str, float], config: FilterConfig) -> str | None:
    if not finite:
        return "nan_image"
    if float(image.std()) < config.min_image_std:
        return "blank_image"
    if quality["weak_fraction"] == 0.0:
        return "empty_weak_mask"
    if quality["removal_delta"] < config.min_removal_delta:
        return "removal_failed"
    if quality["mask_fraction"] < config.min_mask_fraction:
        return "empty_mask"
    if quality["mask_fraction"] > config.max_mask_fraction:
        return "full_mask"
    if quality["components"] > config.max_components:
        return "fragmented"
    if config.drop_missing_concept and quality.get("missing_concepts", 0) > 0:
        return "missing_concept"
    return None


class Filter:
    """Batch stage: adds `drop` (reason or None per sample)."""

    def __init__(self, config: FilterConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        unusable = batch.get("source_drop") or [None] * len(batch["image"])  # a real image that could not be read
        reasons = [
            before or drop_reason(image, finite, quality, self.config)
            for before, image, finite, quality in zip(unusable, batch["image"], batch["finite"], batch["quality"])
        ]
        return {"drop": reasons}
