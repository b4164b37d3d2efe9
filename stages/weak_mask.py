"""Weak mask: the concept heat map normalised, thresholded and cleaned."""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu

from schemas.config import MaskConfig
from schemas.records import BACKGROUND_ID
from stages.masks import clean


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per map ([..., H, W]); a flat map becomes all zeros."""
    low = heat.min(axis=(-2, -1), keepdims=True)
    span = heat.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (heat - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


def weak_mask(heat: np.ndarray, class_ids: list[int], config: MaskConfig) -> np.ndarray:
    """Class-index mask [H, W] from one sample's maps [C, H, W]; overlaps go to the hotter concept."""
    norm = normalise(heat)
    mask = np.full(heat.shape[1:], BACKGROUND_ID, dtype=np.uint8)
    winner = norm.argmax(axis=0)
    for c, class_id in enumerate(class_ids):
        tau = config.tau if config.threshold == "fixed" or np.ptp(norm[c]) == 0 else threshold_otsu(norm[c])
        region = clean(norm[c] >= tau, config.open_px, config.close_px, config.min_area)
        mask[region & (winner == c)] = class_id
    return mask


class WeakMask:
    """Batch stage: adds `heat` (normalised maps) and `weak_mask` (uint8 [B, H, W])."""

    def __init__(self, config: MaskConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        heat = normalise(batch["heatmap"])
        masks = [weak_mask(h, [c.class_id for c in spans], self.config) for h, spans in zip(heat, batch["concepts"])]
        return {"heat": heat, "weak_mask": np.stack(masks)}
