"""Binary-mask clean-up shared by the weak-mask and refine stages (OpenCV)."""

from __future__ import annotations

import cv2
import numpy as np


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    return cv2.dilate(mask.astype(np.uint8), _disk(radius)).astype(bool)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask.astype(bool)
    return cv2.erode(mask.astype(np.uint8), _disk(radius), borderType=cv2.BORDER_REPLICATE).astype(bool)


def cover_cells(mask: np.ndarray, cell: int) -> np.ndarray:
    """Grow a mask to whole cell x cell blocks: every latent cell it touches, at pixel size.

    Inpainting samples the pixel mask down to the latent grid by nearest neighbour, so a cell
    only partly masked may be kept whole and carry the object's edge into the background.
    """
    height, width = mask.shape
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), bool)
    padded[:height, :width] = mask
    cells = padded.reshape(rows, cell, cols, cell).any(axis=(1, 3))
    return np.repeat(np.repeat(cells, cell, axis=0), cell, axis=1)[:height, :width]


def count_components(mask: np.ndarray) -> int:
    count, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return count - 1


def clean(mask: np.ndarray, open_px: int, close_px: int, min_area: float) -> np.ndarray:
    """Opening drops specks, closing fills pinholes, then components under min_area (fraction) go."""
    m = mask.astype(np.uint8)
    if open_px > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(open_px))
    if close_px > 0:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _disk(close_px))
    min_pixels = min_area * m.size
    if min_pixels > 0:
        count, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        keep = np.zeros(count, dtype=bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_pixels
        m = keep[labels].astype(np.uint8)
    return m.astype(bool)


def orphan_filter(mask: np.ndarray) -> np.ndarray:
    """The concept-distillation clean-up: an inner pixel is set where at least half of its
    3 x 3 neighbourhood is (a majority vote that drops lone pixels and fills lone holes);
    the outermost rows and columns are left as they are."""
    m = mask.astype(bool)
    if min(m.shape) < 3:
        return m
    votes = cv2.blur(m.astype(np.float32), (3, 3), borderType=cv2.BORDER_CONSTANT)
    out = m.copy()
    out[1:-1, 1:-1] = votes[1:-1, 1:-1] >= 0.5 - 1e-6
    return out


def to_lab(image: np.ndarray) -> np.ndarray:
    """A uint8 RGB image in CIE Lab (float32), where distances follow perceived colour."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def lab_distance(image: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per-pixel CIE76 colour difference of two uint8 RGB images."""
    return np.linalg.norm(to_lab(image) - to_lab(other), axis=-1)


def lab_distance_within(image: np.ndarray, other: np.ndarray, radius: int) -> np.ndarray:
    """Per pixel, the smallest CIE76 distance from the image's colour to any of `other`'s
    within `radius` pixels (a square; the edges replicated). A background repainted a little
    out of register with the image (a pattern a few pixels out of phase) then reads as
    unchanged, while a colour found nowhere near, an object's, still reads as changed."""
    return nearest_lab_distance(to_lab(image), to_lab(other), radius)


def nearest_lab_distance(a: np.ndarray, b: np.ndarray, radius: int) -> np.ndarray:
    """`lab_distance_within` of two images already in Lab."""
    height, width = a.shape[:2]
    padded = cv2.copyMakeBorder(b, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
    nearest = np.full((height, width), np.inf, np.float32)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            nearest = np.minimum(nearest, np.linalg.norm(a - padded[dy:dy + height, dx:dx + width], axis=-1))
    return nearest
