"""A toy world whose truth is exact: saturated shapes on achromatic backgrounds.

Scenes hold 1-3 objects of different shapes and colours that may overlap; the truth mask
follows the drawing order (a later object covers an earlier one).

Objects are drawn in a few saturated colours; backgrounds (flat, gradient, striped, noise)
only ever use gray levels. That rule is what gives truth for *generated* images too: a
pixel is object exactly when it is saturated, and its hue says which colour it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

SIZE = 64
SHAPES = {"circle": 1, "square": 2, "triangle": 3}
COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230), "yellow": (230, 200, 20)}
BACKGROUND_KINDS = ("flat", "gradient", "striped", "noise")
BACKGROUND_TONES = {"gray": 128, "white": 215, "black": 40}
# Backgrounds the shipped models never saw, captioned with a word they know (the domain a
# removal adapter is distilled on): checkerboards called "striped", dot grids called "noise".
UNSEEN_KINDS = {"checkerboard": "striped", "dots": "noise"}
# the same patterns at 12-16 px, coarse enough for the toy VAE to draw back (its round trip
# of the fine ones errs by 18 levels inside an object, of these by 14)
COARSE_UNSEEN_KINDS = {"coarse checkerboard": "striped", "coarse dots": "noise"}
UNSEEN_CAPTIONS = {**UNSEEN_KINDS, **COARSE_UNSEEN_KINDS}
WORDS = ["a", "and", "on", "background", *SHAPES, *COLORS, *BACKGROUND_KINDS, *BACKGROUND_TONES]

# A pixel is 'object' when its HSV saturation and value are at least these (0..255 scale).
MIN_OBJECT_SATURATION = 110
MIN_OBJECT_VALUE = 70
HUES = {name: cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0, 0] for name, rgb in COLORS.items()}


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3]
    mask: np.ndarray  # uint8 [H, W], 0 background, shape class id
    background: np.ndarray  # uint8 [H, W, 3], the scene without its objects
    caption: str
    objects: list[tuple[str, str]] = field(default_factory=list)  # (colour, shape), in drawing order
    regions: list[np.ndarray] = field(default_factory=list)  # each object's whole shape, before occlusion


def render_background(kind: str, tone: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    level = BACKGROUND_TONES[tone]
    if kind == "flat":
        gray = np.full((size, size), level, np.float32)
    elif kind == "gradient":
        ramp = np.linspace(-35, 35, size, dtype=np.float32)
        gray = level + (ramp[None, :] if rng.random() < 0.5 else ramp[:, None]) * np.ones((size, size), np.float32)
    elif kind == "striped":
        period = int(rng.integers(6, 12))
        coords = np.arange(size)
        stripes = ((coords // (period // 2)) % 2).astype(np.float32) * 50 - 25
        gray = level + (stripes[None, :] if rng.random() < 0.5 else stripes[:, None]) * np.ones((size, size), np.float32)
    elif kind == "noise":
        gray = level + rng.normal(0, 22, (size, size)).astype(np.float32)
    elif kind in ("checkerboard", "coarse checkerboard"):
        cell = int(rng.integers(4, 9) if kind == "checkerboard" else rng.integers(12, 17))
        rows, cols = np.mgrid[:size, :size] // cell
        gray = level + ((rows + cols) % 2).astype(np.float32) * 60 - 30
    elif kind in ("dots", "coarse dots"):
        step = int(rng.integers(6, 10) if kind == "dots" else rng.integers(14, 19))
        rows, cols = np.mgrid[:size, :size] % step
        dot = (rows - step // 2) ** 2 + (cols - step // 2) ** 2 <= (step // 4) ** 2
        gray = level + np.where(dot, 45.0, -10.0).astype(np.float32)
    else:
        raise ValueError(f"unknown background kind {kind}")
    gray = np.clip(gray, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def shape_mask(shape: str, center: tuple[int, int], radius: int, size: int = SIZE) -> np.ndarray:
    canvas = np.zeros((size, size), np.uint8)
    cx, cy = center
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), radius, 1, thickness=-1)
    elif shape == "square":
        cv2.rectangle(canvas, (cx - radius, cy - radius), (cx + radius, cy + radius), 1, thickness=-1)
    elif shape == "triangle":
        h = int(round(radius * 1.1))
        points = np.array([(cx, cy - h), (cx - radius - 2, cy + h), (cx + radius + 2, cy + h)], np.int32)
        cv2.fillPoly(canvas, [points], 1)
    else:
        raise ValueError(f"unknown shape {shape}")
    return canvas.astype(bool)


def caption_for(objects: list[tuple[str, str]], kind: str, tone: str) -> str:
    things = " and ".join(f"a {colour} {shape}" for colour, shape in objects)
    scene = f"a {UNSEEN_CAPTIONS.get(kind, kind)} {tone} background"
    return f"{things} on {scene}" if things else scene


OBJECT_COUNTS = (1, 2, 3)
OBJECT_COUNT_WEIGHTS = (0.45, 0.35, 0.2)
MIN_VISIBLE = 0.6  # every object keeps at least this share of its own area in view
OVERLAP_SHARE = 0.5  # share of placements that may touch or overlap earlier objects


def _place(shape: str, drawn: list[np.ndarray], rng: np.random.Generator, size: int) -> np.ndarray | None:
    """A region for `shape` that leaves every object (earlier ones and itself) mostly visible."""
    may_overlap = rng.random() < OVERLAP_SHARE
    taken = np.logical_or.reduce(drawn) if drawn else np.zeros((size, size), bool)
    near = cv2.dilate(taken.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    for _attempt in range(30):
        radius = int(rng.integers(size // 8, size // 4))
        margin = radius + 3
        center = (int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin)))
        region = shape_mask(shape, center, radius, size)
        if not may_overlap and np.any(region & near):
            continue
        covers = [np.logical_or.reduce([region, *drawn[j + 1:]]) for j in range(len(drawn))]
        if all((earlier & ~cover).sum() >= MIN_VISIBLE * earlier.sum() for earlier, cover in zip(drawn, covers)):
            return region
    return None


def render_scene(rng: np.random.Generator, n_objects: int | None = None, size: int = SIZE,
                 kinds: tuple[str, ...] = BACKGROUND_KINDS) -> Scene:
    """1-3 objects of distinct shapes and colours; later ones are drawn over earlier ones.

    The mask is exact under overlap: each pixel holds the class of the last object drawn
    there, and `objects` lists the objects in drawing order (the caption's order).
    """
    kind = kinds[rng.integers(len(kinds))]
    tone = list(BACKGROUND_TONES)[rng.integers(len(BACKGROUND_TONES))]
    background = render_background(kind, tone, rng, size)
    image = background.copy()
    mask = np.zeros((size, size), np.uint8)
    if n_objects is None:
        n_objects = int(rng.choice(OBJECT_COUNTS, p=OBJECT_COUNT_WEIGHTS))
    shapes = [str(s) for s in rng.permutation(list(SHAPES))[:n_objects]]
    colours = [str(c) for c in rng.permutation(list(COLORS))[:n_objects]]
    objects: list[tuple[str, str]] = []
    drawn: list[np.ndarray] = []
    for shape, colour in zip(shapes, colours):
        region = _place(shape, drawn, rng, size)
        if region is None:
            continue
        image[region] = COLORS[colour]
        mask[region] = SHAPES[shape]
        drawn.append(region)
        objects.append((colour, shape))
    return Scene(image, mask, background, caption_for(objects, kind, tone), objects, drawn)


def object_pixels(image: np.ndarray) -> np.ndarray:
    """The world's rule: saturated, not dark pixels are object pixels."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    return (hsv[..., 1] >= MIN_OBJECT_SATURATION) & (hsv[..., 2] >= MIN_OBJECT_VALUE)


def colour_pixels(image: np.ndarray, colour: str, hue_tolerance: int = 12) -> np.ndarray:
    """Object pixels whose hue is that of `colour` (OpenCV hue, 0..179, wraps at red)."""
    hue = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 0].astype(int)
    distance = np.abs(hue - int(HUES[colour]))
    distance = np.minimum(distance, 180 - distance)
    return object_pixels(image) & (distance <= hue_tolerance)


def shape_fill_ratio(region: np.ndarray) -> float:
    """Area over bounding-box area: ~1.0 square, ~0.79 circle, ~0.5 triangle."""
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return 0.0
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(region.sum() / box)


FILL_RATIOS = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}


def closest_shape(region: np.ndarray) -> str:
    ratio = shape_fill_ratio(region)
    return min(FILL_RATIOS, key=lambda name: abs(FILL_RATIOS[name] - ratio))


def touches_other_object(region: np.ndarray, image: np.ndarray) -> bool:
    """Whether another object borders `region`: then it may be occluded and its shape cut."""
    ring = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~region
    return bool((ring & object_pixels(image)).any())
