"""The concept-distillation paper's mask rules beside maskmint's: the GMM-midpoint threshold,
the orphan-pixel filter and the `fgbg` refinement, on hand-made maps."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from maskmint.schemas.config import MaskConfig, RefineConfig
from maskmint.stages.masks import orphan_filter
from maskmint.stages.refine import refine_mask
from maskmint.stages.weak_mask import gmm_midpoint, gmm_threshold, weak_mask


def slow_orphan_filter(mask: np.ndarray) -> np.ndarray:
    """The paper's filter written out: every inner pixel becomes 1 when at least 5 of the
    9 pixels of its 3 x 3 neighbourhood (itself included) are set; the border stays."""
    out = mask.copy()
    rows, cols = mask.shape
    for r in range(1, rows - 1):
        for c in range(1, cols - 1):
            out[r, c] = sum(mask[r + dr, c + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)) >= 5
    return out


@settings(max_examples=60, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_orphan_filter_is_the_3x3_majority_vote_on_inner_pixels(mask):
    assert np.array_equal(orphan_filter(mask), slow_orphan_filter(mask))


def test_orphan_filter_drops_a_lone_pixel_and_fills_a_pinhole():
    mask = np.zeros((10, 10), bool)
    mask[2:7, 2:7] = True
    mask[4, 4] = False  # pinhole
    mask[8, 8] = True  # lone pixel
    out = orphan_filter(mask)
    assert out[4, 4] and not out[8, 8]
    assert out[3:6, 3:6].all()


def two_clusters(low, low_sd, high, high_sd, counts=(3000, 1000), seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(low, low_sd, counts[0]), rng.normal(high, high_sd, counts[1])]).reshape(40, 100)


def test_gmm_midpoint_is_halfway_between_the_two_cluster_means():
    values = two_clusters(0.2, 0.02, 0.6, 0.02)
    assert abs(gmm_midpoint(values) - 0.4) < 0.01


def test_gmm_midpoint_differs_from_the_posterior_rule_when_spreads_differ():
    # A narrow low mode and a wide high one: the posterior turns close to the narrow mode,
    # while the paper's threshold stays halfway between the means.
    values = two_clusters(0.1, 0.01, 0.7, 0.15)
    assert abs(gmm_midpoint(values) - 0.4) < 0.03
    assert gmm_threshold(values) < 0.25


def test_gmm_midpoint_of_a_flat_map_keeps_nothing():
    assert gmm_midpoint(np.full((8, 8), 0.3)) == 1.0


def test_weak_mask_with_the_papers_rule():
    heat = np.full((1, 24, 24), 0.1, np.float32)
    heat[0, 6:16, 6:16] = 0.9
    heat[0, 10, 10] = 0.1  # a cold pixel inside the object
    heat[0, 20, 20] = 0.9  # a hot lone pixel outside it
    config = MaskConfig(threshold="gmm_midpoint", orphan_filter=True, open_px=0, close_px=0, min_area=0.0,
                        normalise="none")
    mask = weak_mask(heat, [3], config)
    expected = np.zeros((24, 24), np.uint8)
    expected[6:16, 6:16] = 3
    expected[[6, 6, 15, 15], [6, 15, 6, 15]] = 0  # the vote rounds the corners (4 of 9 set)
    assert np.array_equal(mask, expected)
    plain = weak_mask(heat, [3], config.model_copy(update={"orphan_filter": False}))
    assert plain[20, 20] == 3 and plain[10, 10] == 0


def scene():
    """A grey image with a red square; its background is the image without the square, and
    the weak mask is a larger square around it (weak masks overreach)."""
    image = np.full((32, 32, 3), 120, np.uint8)
    image[10:20, 10:20] = (220, 30, 30)
    background = np.full((32, 32, 3), 120, np.uint8)
    background[12:15, 12:15] = image[12:15, 12:15] - 1  # removal left a near-copy of the object: a hole
    weak = np.zeros((32, 32), np.uint8)
    weak[7:23, 7:23] = 2
    heat = np.zeros((1, 32, 32), np.float32)
    heat[0, 7:23, 7:23] = 1.0
    return image, background, weak, heat


def test_fgbg_is_the_weak_region_and_the_changed_pixels():
    image, background, weak, heat = scene()
    background[28, 28] = 0  # a change outside any weak region is never an object
    config = RefineConfig(method="fgbg", ignore_band=False)
    mask, quality = refine_mask(image, background, weak, heat, config, [2])
    expected = np.zeros((32, 32), np.uint8)
    expected[10:20, 10:20] = 2
    expected[[10, 10, 19, 19], [10, 19, 10, 19]] = 0  # the orphan vote rounds the corners
    assert np.array_equal(mask, expected)
    assert quality["missing_concepts"] == 0.0


def test_fgbg_without_the_fill_keeps_the_hole():
    image, background, weak, heat = scene()
    mask, _ = refine_mask(image, background, weak, heat, RefineConfig(method="fgbg", fgbg_fill=False, ignore_band=False), [2])
    assert mask[13, 13] == 0 and mask[11, 11] == 2
    filled, _ = refine_mask(image, background, weak, heat, RefineConfig(method="fgbg", ignore_band=False), [2])
    assert filled[13, 13] == 2


def test_fgbg_gives_each_class_only_its_own_weak_region():
    image = np.full((32, 40, 3), 120, np.uint8)
    image[8:18, 4:14] = (220, 30, 30)
    image[8:18, 24:34] = (30, 30, 220)
    background = np.full_like(image, 120)
    weak = np.zeros((32, 40), np.uint8)
    weak[6:20, 2:16] = 1
    weak[6:20, 22:36] = 2
    heat = np.stack([(weak == 1), (weak == 2)]).astype(np.float32)
    mask, _ = refine_mask(image, background, weak, heat, RefineConfig(method="fgbg", ignore_band=False), [1, 2])
    assert set(np.unique(mask[9:17, 5:13])) == {1}
    assert set(np.unique(mask[9:17, 25:33])) == {2}
    assert (mask != 0).sum() == 200 - 8  # less the rounded corners
