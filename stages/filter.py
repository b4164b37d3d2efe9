"""Filter: keep a sample only if its image and mask are usable; every drop has a reason.

The reasons the weak mask already decides are checked first, so a run can drop those
samples before removal (`execution.early_drops`) and still give every sample the reason it
would have had after it: a final mask lies inside the weak classes' reach (each class's
weak region dilated by `refine.dilate_px`), so a concept with no weak region, or a reach
below `min_mask_fraction`, cannot pass whatever removal does. `max_weak_fraction` and
`max_weak_components` are rules on the weak mask itself, off unless set.
"""

from __future__ import annotations

import numpy as np

from maskmint.schemas.config import FilterConfig
from maskmint.schemas.records import BACKGROUND_ID
from maskmint.stages.masks import count_components, dilate


def weak_drop_reason(image: np.ndarray, finite: bool, weak: np.ndarray, class_ids: list[int], config: FilterConfig,
                     reach_px: int) -> str | None:
    """The reason known before removal, from the image and the weak mask alone."""
    if not finite:
        return "nan_image"
    if float(image.std()) < config.min_image_std:
        return "blank_image"
    weak_fg = weak != BACKGROUND_ID
    if not weak_fg.any():
        return "empty_weak_mask"
    present = [c for c in class_ids if (weak == c).any()]
    if config.drop_missing_concept and len(present) < len(class_ids):
        return "missing_concept"
    reach = np.zeros(weak.shape, bool)
    for class_id in present:
        reach |= dilate(weak == class_id, reach_px)
    if reach.mean() < config.min_mask_fraction:
        return "empty_mask"
    if config.max_weak_fraction is not None and weak_fg.mean() > config.max_weak_fraction:
        return "full_weak_mask"
    if config.max_weak_components is not None and count_components(weak_fg) > config.max_weak_components:
        return "fragmented_weak_mask"
    return None


def drop_reason(quality: dict[str, float], config: FilterConfig) -> str | None:
    """The reason known once removal and refinement are done."""
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


class EarlyFilter:
    """Batch stage before removal: adds `early_drop` (reason or None per sample); a real image
    that could not be read keeps its own reason."""

    def __init__(self, config: FilterConfig, reach_px: int):
        self.config, self.reach_px = config, reach_px

    def __call__(self, batch: dict) -> dict:
        unusable = batch.get("source_drop") or [None] * len(batch["image"])
        reasons = [
            before or weak_drop_reason(image, finite, weak, [c.class_id for c in spans], self.config, self.reach_px)
            for before, image, finite, weak, spans in zip(unusable, batch["image"], batch["finite"], batch["weak_mask"],
                                                          batch["concepts"])
        ]
        return {"early_drop": reasons}


class Filter:
    """Batch stage after refinement: adds `drop` (reason or None per sample)."""

    def __init__(self, config: FilterConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        return {"drop": [early or drop_reason(quality, self.config)
                         for early, quality in zip(batch["early_drop"], batch["quality"])]}
