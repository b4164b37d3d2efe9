"""Refine: where the image differs in colour from its object-free background is the object."""

from __future__ import annotations

import numpy as np

from schemas.config import RefineConfig
from schemas.records import BACKGROUND_ID, IGNORE_INDEX
from stages.masks import clean, count_components, dilate, erode, lab_distance


def refine_mask(
    image: np.ndarray, background: np.ndarray, weak: np.ndarray, heat: np.ndarray, config: RefineConfig
) -> tuple[np.ndarray, dict[str, float]]:
    """Final class mask [H, W] (0, class ids, 255) and its quality scores for one sample.

    heat is the sample's normalised maps [C, H, W]; weak its class-index weak mask.
    """
    delta = lab_distance(image, background)
    weak_fg = weak != BACKGROUND_ID
    changed = clean((delta > config.delta_e) & dilate(weak_fg, config.dilate_px), config.open_px, config.close_px, config.min_area)

    mask = np.full(weak.shape, BACKGROUND_ID, dtype=np.uint8)
    for class_id in np.unique(weak[weak_fg]):
        mask[changed & dilate(weak == class_id, config.dilate_px) & (mask == BACKGROUND_ID)] = class_id
    foreground = mask != BACKGROUND_ID

    if config.ignore_band:
        band = dilate(foreground, config.boundary_px) & ~erode(foreground, config.boundary_px)
        hottest = heat.max(axis=0)
        disagree = (foreground & (hottest < config.disagree_low)) | (~foreground & (hottest > config.disagree_high))
        mask[band | disagree] = IGNORE_INDEX

    union = np.logical_or(weak_fg, foreground).sum()
    quality = {
        "mask_fraction": float(foreground.mean()),
        "weak_fraction": float(weak_fg.mean()),
        "ignore_fraction": float((mask == IGNORE_INDEX).mean()),
        "components": float(count_components(foreground)),
        "weak_refined_iou": float(np.logical_and(weak_fg, foreground).sum() / union) if union else 0.0,
        "removal_delta": float(delta[weak_fg].mean()) if weak_fg.any() else 0.0,
    }
    return mask, quality


class Refine:
    """Batch stage: adds `mask` (uint8 [B, H, W]) and `quality` (list of dicts)."""

    def __init__(self, config: RefineConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        results = [
            refine_mask(image, background, weak, heat, self.config)
            for image, background, weak, heat in zip(batch["image"], batch["background"], batch["weak_mask"], batch["heat"])
        ]
        return {"mask": np.stack([m for m, _ in results]), "quality": [q for _, q in results]}
