"""refine.shift_px: a background repainted out of register with the image is not read as object."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskmint.schemas.config import RefineConfig, parse_config
from maskmint.stages.masks import dilate, lab_distance_within
from maskmint.stages.refine import refine_mask
from maskmint.stages.weak_mask import normalise


def slow_nearest_distance(image: np.ndarray, other: np.ndarray, radius: int) -> np.ndarray:
    """Pixel by pixel: the smallest Lab distance to any of `other`'s pixels in the square
    window, coordinates clamped at the edges."""
    a = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).astype(np.float64)
    b = cv2.cvtColor(other.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).astype(np.float64)
    height, width = a.shape[:2]
    out = np.empty((height, width))
    for y in range(height):
        for x in range(width):
            best = np.inf
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    yy, xx = min(max(y + dy, 0), height - 1), min(max(x + dx, 0), width - 1)
                    best = min(best, float(np.sqrt(((a[y, x] - b[yy, xx]) ** 2).sum())))
            out[y, x] = best
    return out


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), radius=st.integers(0, 3), height=st.integers(1, 9), width=st.integers(1, 9))
def test_nearest_distance_equals_a_pixel_by_pixel_search(seed, radius, height, width):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    other = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    np.testing.assert_allclose(lab_distance_within(image, other, radius), slow_nearest_distance(image, other, radius),
                               atol=1e-3)


def checkerboard(size: int, square: int, phase: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    light = ((yy + phase) // square + (xx + phase) // square) % 2 == 0
    return np.where(light[..., None], 200, 60).astype(np.uint8).repeat(3, axis=-1)


def out_of_phase_removal():
    """A red disc on an 8 px checkerboard; removal repaints the dilated weak region with the
    right pattern 4 px out of phase, as a model that learnt the pattern but not its phase."""
    size = 64
    yy, xx = np.mgrid[:size, :size]
    truth = (yy - 32) ** 2 + (xx - 32) ** 2 <= 10**2
    real = checkerboard(size, 8)
    image = real.copy()
    image[truth] = (220, 30, 30)
    weak = np.where(truth, 1, 0).astype(np.uint8)
    region = dilate(truth, 6)
    background = real.copy()
    background[region] = checkerboard(size, 8, phase=4)[region]
    heat = normalise(cv2.GaussianBlur(truth.astype(np.float32) * 5, (0, 0), 3) + 0.3)[None]
    return image, background, weak, heat, truth


@pytest.mark.parametrize("shift_px", [4, 8])
def test_an_out_of_phase_pattern_is_no_object_within_the_shift(shift_px):
    image, background, weak, heat, truth = out_of_phase_removal()
    plain, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False, delta_e=40), [1])
    assert (plain[~truth] == 1).sum() > 50  # the mismatched squares read as object

    tolerant, quality = refine_mask(image, background, weak, heat,
                                    RefineConfig(ignore_band=False, delta_e=40, shift_px=shift_px), [1])
    assert (tolerant[~truth] == 1).sum() == 0
    assert (tolerant[truth] == 1).mean() > 0.97  # the red disc is far from every background colour
    # the removal score the filters read is still the same pixel's change
    assert quality["removal_delta"] == pytest.approx(refine_mask(image, background, weak, heat,
                                                                 RefineConfig(delta_e=40), [1])[1]["removal_delta"])


def test_a_shift_smaller_than_the_phase_error_still_reads_the_squares():
    image, background, weak, heat, truth = out_of_phase_removal()
    tolerant, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False, delta_e=40, shift_px=1), [1])
    assert (tolerant[~truth] == 1).sum() > 0


def test_a_run_made_before_shift_px_existed_keeps_its_hash_while_it_is_off():
    minimal = {"model": {"path": "some/model"}, "prompts": {"concepts": [{"name": "cat", "class_id": 1}]}}
    # the hash maskmint gave this config before refine.shift_px existed: such runs still resume
    assert parse_config(minimal).config_hash() == "715e6ae3b5881529"
    assert parse_config({**minimal, "refine": {"shift_px": 0}}).config_hash() == "715e6ae3b5881529"
    assert parse_config({**minimal, "refine": {"shift_px": 2}}).config_hash() != "715e6ae3b5881529"
