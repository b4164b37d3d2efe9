"""Weak mask: the concepts' heat maps normalised, thresholded, argmax over classes, cleaned."""

from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu
from sklearn.mixture import GaussianMixture

from maskmint.schemas.config import MaskConfig
from maskmint.schemas.records import BACKGROUND_ID, IGNORE_INDEX
from maskmint.stages.masks import clean, orphan_filter


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per map ([..., H, W]); a flat map becomes all zeros."""
    low = heat.min(axis=(-2, -1), keepdims=True)
    span = heat.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (heat - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


GMM_SAMPLE = 4096  # map values the mixture is fitted on


def fitted_mixture(values: np.ndarray, seed: int = 0) -> GaussianMixture | None:
    """A two-component Gaussian mixture of (a seeded sample of) the map's values; None for a flat map."""
    flat = values.reshape(-1, 1).astype(np.float64)
    if np.ptp(flat) == 0:
        return None
    rng = np.random.default_rng(seed)
    fitted = flat[rng.choice(len(flat), size=min(GMM_SAMPLE, len(flat)), replace=False)]
    return GaussianMixture(n_components=2, random_state=seed).fit(fitted)


def gmm_threshold(values: np.ndarray, seed: int = 0) -> float:
    """The lowest value a two-component Gaussian mixture of `values` gives to the higher
    component (the concept-distillation FG/BG split); 1.0 when the map has one mode."""
    mixture = fitted_mixture(values, seed)
    if mixture is None:
        return 1.0
    high = int(np.argmax(mixture.means_[:, 0]))
    grid = np.linspace(0.0, 1.0, 257).reshape(-1, 1)
    is_high = mixture.predict_proba(grid)[:, high] >= 0.5
    above = np.flatnonzero(is_high & (grid[:, 0] >= mixture.means_[1 - high, 0]))
    return float(grid[above[0], 0]) if len(above) else 1.0


def gmm_midpoint(values: np.ndarray, seed: int = 0) -> float:
    """The concept-distillation paper's threshold: the mean of a two-component Gaussian
    mixture's two means (`gmm` instead asks where the mixture's posterior turns)."""
    mixture = fitted_mixture(values, seed)
    return 1.0 if mixture is None else float(mixture.means_.mean())


def class_threshold(norm: np.ndarray, config: MaskConfig) -> float:
    if config.threshold == "fixed" or np.ptp(norm) == 0:
        return config.tau
    if config.threshold == "otsu":
        return float(threshold_otsu(norm))
    if config.threshold == "gmm":
        return gmm_threshold(norm)
    if config.threshold == "gmm_midpoint":
        return gmm_midpoint(norm)
    return config.band_high


def scaled(heat: np.ndarray, config: MaskConfig) -> np.ndarray:
    """The maps thresholds and the argmax read: stretched per map, or as they are (shares)."""
    return normalise(heat) if config.normalise == "per_map" else heat.astype(np.float32)


def weak_mask(heat: np.ndarray, class_ids: list[int], config: MaskConfig) -> np.ndarray:
    """Class-index mask [H, W] from one sample's maps [C, H, W], each scaled as
    `config.normalise` says: the argmax over classes wins a pixel if its score passes that class's threshold.
    With the `band` threshold, pixels whose winning score lies in [band_low, band_high) and
    that no class took are 255 (uncertain)."""
    norm = scaled(heat, config)
    mask = np.full(heat.shape[1:], BACKGROUND_ID, dtype=np.uint8)
    winner = norm.argmax(axis=0)
    for c, class_id in enumerate(class_ids):
        region = norm[c] >= class_threshold(norm[c], config)
        if config.orphan_filter:
            region = orphan_filter(region)
        region = clean(region, config.open_px, config.close_px, config.min_area)
        mask[region & (winner == c)] = class_id
    if config.threshold == "band":
        score = norm[: len(class_ids)].max(axis=0)
        mask[(score >= config.band_low) & (mask == BACKGROUND_ID)] = IGNORE_INDEX
    return mask


class WeakMask:
    """Batch stage: adds `heat` (normalised maps) and `weak_mask` (uint8 [B, H, W])."""

    def __init__(self, config: MaskConfig):
        self.config = config

    def __call__(self, batch: dict) -> dict:
        heat = scaled(batch["heatmap"], self.config)
        masks = [weak_mask(h, [c.class_id for c in spans], self.config) for h, spans in zip(heat, batch["concepts"])]
        return {"heat": heat, "weak_mask": np.stack(masks)}
