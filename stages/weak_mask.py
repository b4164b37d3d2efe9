"""Weak mask: the concepts' heat maps normalised, thresholded, argmax over classes, cleaned."""

from __future__ import annotations

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from sklearn.mixture import GaussianMixture

from maskmint.schemas.config import MaskConfig
from maskmint.schemas.records import BACKGROUND_ID, IGNORE_INDEX
from maskmint.stages.masks import clean, orphan_filter, to_lab


def normalise(heat: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per map ([..., H, W]); a flat map becomes all zeros."""
    low = heat.min(axis=(-2, -1), keepdims=True)
    span = heat.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (heat - low) / np.where(span > 0, span, 1), 0).astype(np.float32)


GUIDE_REACH = 2  # cells each side of a pixel's own that joint upsampling reads (4 x 4 in all)


def guided_heat(heat: np.ndarray, image: np.ndarray, cell_px: int, colour_sigma: float) -> np.ndarray:
    """Maps [C, H, W] read again from their token cells by joint bilateral upsampling (Kopf et
    al. 2007): a pixel takes the nearby cells' values weighted by distance (sigma one cell) and by
    how close each cell's mean Lab colour is to its own, so a map's edges move onto the image's.
    The capture's bicubic upsampling is blind to the image, which puts a small object's edge, or
    an object half hidden behind another, on the wrong side of a colour edge by up to a cell."""
    channels, height, width = heat.shape
    rows, cols = max(1, round(height / cell_px)), max(1, round(width / cell_px))
    cells = np.stack([cv2.resize(m, (cols, rows), interpolation=cv2.INTER_AREA).reshape(rows, cols)
                      for m in heat.astype(np.float32)])
    lab = to_lab(image)
    cell_lab = cv2.resize(lab, (cols, rows), interpolation=cv2.INTER_AREA).reshape(rows, cols, 3)
    # each pixel centre in cell units, and the 4 x 4 cells around it
    at_y = (np.arange(height) + 0.5) * rows / height - 0.5
    at_x = (np.arange(width) + 0.5) * cols / width - 0.5
    base_y, base_x = np.floor(at_y).astype(int), np.floor(at_x).astype(int)
    offsets = [(dy, dx) for dy in range(1 - GUIDE_REACH, GUIDE_REACH + 1) for dx in range(1 - GUIDE_REACH, GUIDE_REACH + 1)]
    neighbours = []  # each offset's cell row and column per pixel row and column
    log_weights = np.empty((len(offsets), height, width), np.float32)
    for k, (dy, dx) in enumerate(offsets):
        cy, cx = base_y + dy, base_x + dx
        qy, qx = np.clip(cy, 0, rows - 1), np.clip(cx, 0, cols - 1)
        neighbours.append((qy, qx))
        spatial = -((at_y - qy)[:, None] ** 2 + (at_x - qx)[None, :] ** 2) / 2.0
        gap = lab - cell_lab[qy][:, qx]
        colour = -np.einsum("hwc,hwc->hw", gap, gap) / (2.0 * colour_sigma**2)
        inside = ((cy >= 0) & (cy < rows))[:, None] & ((cx >= 0) & (cx < cols))[None, :]
        log_weights[k] = np.where(inside, spatial + colour, -np.inf)
    weights = np.exp(log_weights - log_weights.max(axis=0))
    guided = np.zeros((channels, height, width), np.float32)
    for k, (qy, qx) in enumerate(neighbours):
        guided += weights[k] * cells[:, qy][:, :, qx]
    return guided / weights.sum(axis=0)


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

    def __init__(self, config: MaskConfig, model_cell_px: int | None = None):
        """model_cell_px: the model's map cell in image pixels, which `guide_px: auto` takes."""
        self.config = config
        self.guide_px = model_cell_px if config.guide_px == "auto" else config.guide_px
        if self.guide_px is None and config.guide_px == "auto":
            raise ValueError("mask.guide_px: auto needs the model's map cell")

    def __call__(self, batch: dict) -> dict:
        maps, config = batch["heatmap"], self.config
        if self.guide_px is not None:
            maps = np.stack([guided_heat(m, image, self.guide_px, config.guide_colour)
                             for m, image in zip(maps, batch["image"])])
        heat = scaled(maps, config)
        masks = [weak_mask(h, [c.class_id for c in spans], self.config) for h, spans in zip(heat, batch["concepts"])]
        return {"heat": heat, "weak_mask": np.stack(masks)}
