"""What one concept-distillation example is: the weak mask on the latent grid, the rectangle
of background a background caption is learnt on, and the loss restricted to it.

The background task teaches the denoiser what the domain's backgrounds look like under
the background caption, so removal can paint them in; the loss covers only pixels the weak
mask calls background, in a rectangle like the holes removal fills.
"""

from __future__ import annotations

import numpy as np
import torch

from maskmint.schemas.distill import DistillConfig
from maskmint.stages.masks import dilate

REFERENCE_GRID = 64  # the latent side the rectangle sizes are given at (SD 1.x at 512 px)


def latent_foreground(foreground: np.ndarray, cell: int, margin_px: int = 0) -> np.ndarray:
    """A pixel mask [H, W] on the latent grid [H / cell, W / cell]: a cell is foreground
    when more than half of its pixels are within `margin_px` of the mask. A margin keeps
    the object's edge cells, which a weak mask often misses, out of the background task."""
    foreground = dilate(foreground.astype(bool), margin_px)
    rows, cols = foreground.shape[0] // cell, foreground.shape[1] // cell
    cells = foreground[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell)
    return cells.mean(axis=(1, 3)) > 0.5


def background_rectangle(foreground: np.ndarray, rng: np.random.Generator, config: DistillConfig) -> np.ndarray:
    """The background pixels inside a random rectangle whose two corners are background
    pixels, of bounded size and mostly background; after `rect_tries` failures, the whole
    background. Nothing when (almost) everything is foreground."""
    background = ~foreground.astype(bool)
    if background.sum() < 2:
        return np.zeros_like(background)
    scale = np.sqrt(foreground.size) / REFERENCE_GRID
    min_side, max_side = config.rect_min_side * scale, config.rect_max_side * scale
    min_area, max_area = config.rect_min_area * scale**2, (config.rect_max_side * scale) ** 2
    rows, cols = np.nonzero(background)
    for _ in range(config.rect_tries):
        first, second = rng.integers(len(rows), size=2)
        if first == second:
            continue
        top, bottom = sorted((rows[first], rows[second]))
        left, right = sorted((cols[first], cols[second]))
        height, width = bottom - top, right - left  # as the paper measures: corner to corner
        area = height * width
        if height <= min_side or width <= min_side or area < min_area:
            continue
        if (height > max_side and width > max_side) or area > max_area:
            continue
        box = np.zeros_like(background)
        box[top : bottom + 1, left : right + 1] = True
        inside = box & background
        if inside.sum() >= config.rect_background * area:
            return inside
    return background


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked latent pixels [B, h, w] only, every channel."""
    weights = mask.to(prediction.dtype)[:, None]
    squared = (prediction.float() - target.float()) ** 2 * weights
    covered = weights.sum() * prediction.shape[1]
    return squared.sum() / covered.clamp(min=1)
