"""refine.segment_vote: a boundary between two classes follows colour edges, not the coarse heat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.segmentation import felzenszwalb

from maskmint.schemas.config import ConfigError, RefineConfig, parse_config
from maskmint.stages.refine import refine_mask, segment_winners

SIZE = 64


def two_touching_squares(right_colour=(40, 60, 220), shift=5):
    """A red square and, touching it on the right, a second square on a grey ground. The heat
    maps are the truth shifted `shift` px to the right and blurred, as coarse maps upsampled: the
    per-pixel argmax gives the red class a strip of the right square."""
    image = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
    left = np.zeros((SIZE, SIZE), bool)
    right = np.zeros((SIZE, SIZE), bool)
    left[16:48, 8:32] = True
    right[16:48, 32:56] = True
    image[left] = (220, 30, 30)
    image[right] = right_colour
    background = np.full_like(image, 128)
    weak = np.zeros((SIZE, SIZE), np.uint8)
    weak[left] = 1
    weak[right] = 2

    def coarse(region):
        shifted = np.roll(region, shift, axis=1).astype(np.float32)
        kernel = np.ones(9) / 9
        blurred = np.apply_along_axis(lambda row: np.convolve(row, kernel, "same"), 1, shifted)
        return np.apply_along_axis(lambda col: np.convolve(col, kernel, "same"), 0, blurred)

    heat = np.stack([coarse(left), coarse(right)])
    return image, background, weak, heat, left, right


def test_per_pixel_heat_strays_and_the_segment_vote_puts_the_boundary_on_the_colour_edge():
    image, background, weak, heat, left, right = two_touching_squares()
    plain, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False), [1, 2])
    assert (plain[right] == 1).sum() >= 4 * 32  # a strip of the right square went to the left's class

    voted, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False, segment_vote=0.6), [1, 2])
    # what is left is the edge column, whose smoothed colour is a segment of its own
    assert ((voted == 1) & right).sum() <= 32
    assert ((voted == 2) & left).sum() == 0
    assert (voted[left] == 1).mean() > 0.98


def test_one_colour_over_two_classes_is_left_to_the_heat():
    """Two objects of the same colour make one segment; while its votes split (here 27 of 48
    columns to one class) it decides nothing. (Past the vote share it would give them all
    to one class: that is what the share guards against.)"""
    image, background, weak, heat, left, right = two_touching_squares(right_colour=(220, 30, 30), shift=3)
    plain, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False), [1, 2])
    voted, _ = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False, segment_vote=0.6), [1, 2])
    np.testing.assert_array_equal(voted, plain)
    assert (voted == 2).sum() > 0.5 * right.sum()


def slow_segment_winners(image, taken, reach, winner, vote, scale):
    """Segment by segment, with loops: count each class's pixels among the taken ones, and
    where the most voted class has at least `vote` of them, give it every taken pixel of the
    segment that it reaches."""
    segments = felzenszwalb(image, scale=scale, sigma=0.5, min_size=10)
    out = winner.copy()
    for label in np.unique(segments):
        inside = (segments == label) & taken
        if not inside.any():
            continue
        counts = [int((winner[inside] == c).sum()) for c in range(reach.shape[0])]
        best = int(np.argmax(counts))
        if counts[best] < vote * inside.sum():
            continue
        for y, x in zip(*np.nonzero(inside)):
            if reach[best, y, x]:
                out[y, x] = best
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), classes=st.integers(2, 3), vote=st.sampled_from([0.5, 0.6, 0.8, 1.0]),
       scale=st.sampled_from([20.0, 200.0]))
def test_segment_winners_equal_a_segment_by_segment_count(seed, classes, vote, scale):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))  # 32 x 32 of flat blocks
    taken = rng.random((32, 32)) < 0.7
    reach = rng.random((classes, 32, 32)) < 0.8
    winner = rng.integers(0, classes, (32, 32))
    config = RefineConfig(segment_vote=vote, segment_scale=scale)
    np.testing.assert_array_equal(segment_winners(image, taken, reach, winner, config),
                                  slow_segment_winners(image, taken, reach, winner, vote, scale))


def test_a_run_made_before_segment_vote_existed_keeps_its_hash_while_it_is_off():
    minimal = {"model": {"path": "some/model"}, "prompts": {"concepts": [{"name": "cat", "class_id": 1}]}}
    assert parse_config(minimal).config_hash() == "715e6ae3b5881529"
    assert parse_config({**minimal, "refine": {"segment_vote": None, "segment_scale": 200}}).config_hash() \
        == "715e6ae3b5881529"
    assert parse_config({**minimal, "refine": {"segment_vote": 0.6}}).config_hash() != "715e6ae3b5881529"


@pytest.mark.parametrize("vote", [0.3, 1.5, "most"])
def test_a_vote_share_outside_a_majority_is_one_line(vote):
    minimal = {"model": {"path": "some/model"}, "prompts": {"concepts": [{"name": "cat", "class_id": 1}]}}
    with pytest.raises(ConfigError) as error:
        parse_config({**minimal, "refine": {"segment_vote": vote}})
    assert "segment_vote" in str(error.value) and "\n" not in str(error.value)
