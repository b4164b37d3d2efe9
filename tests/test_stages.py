"""CPU stages on synthetic inputs whose right answer is known; prompts and token positions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from maskmint.pipeline.testing.tiny_models import build_tokenizer
from maskmint.schemas.config import FilterConfig, MaskConfig, RefineConfig
from maskmint.schemas.prompts import PromptsConfig
from maskmint.stages.filter import drop_reason, weak_drop_reason
from maskmint.stages.masks import cover_cells, lab_distance
from maskmint.stages.prompts import PromptBuilder
from maskmint.stages.tokens import PromptError, TextLayout
from maskmint.stages.refine import refine_mask
from maskmint.stages.remove import prefill
from maskmint.stages.weak_mask import normalise, weak_mask


def disk(size=64, center=(32, 32), radius=12):
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def blurred_heat(region, sigma=3.0, scale=5.0):
    return cv2.GaussianBlur(region.astype(np.float32) * scale, (0, 0), sigma) + 0.3


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


def test_weak_mask_recovers_a_blob_and_drops_specks():
    truth = disk()
    heat = blurred_heat(truth)
    heat[5, 5] = heat.max()  # a single-pixel speck as hot as the object
    mask = weak_mask(heat[None], [3], MaskConfig(min_area=0.01))
    assert set(np.unique(mask)) == {0, 3}
    assert iou(mask == 3, truth) > 0.8
    assert mask[5, 5] == 0


def test_weak_mask_otsu_and_two_concepts():
    left, right = disk(center=(32, 16), radius=9), disk(center=(32, 48), radius=9)
    heat = np.stack([blurred_heat(left), blurred_heat(right)])
    mask = weak_mask(heat, [1, 2], MaskConfig(threshold="otsu"))
    assert iou(mask == 1, left) > 0.7 and iou(mask == 2, right) > 0.7
    assert not np.any((mask == 1) & right) and not np.any((mask == 2) & left)


def test_normalise_flat_map_is_zero():
    assert normalise(np.full((1, 4, 4), 3.0)).max() == 0


def scene(radius=12):
    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(120, 4, (64, 64, 3)), 0, 255).astype(np.uint8)
    truth = disk(radius=radius)
    image = background.copy()
    image[truth] = (220, 30, 30)
    return image, background, truth


def test_refine_recovers_the_object_exactly_from_its_background():
    image, background, truth = scene()
    weak = np.where(disk(center=(34, 30), radius=10), 5, 0).astype(np.uint8)  # offset and too small
    heat = normalise(blurred_heat(truth))[None]
    mask, quality = refine_mask(image, background, weak, heat, RefineConfig(ignore_band=False))
    assert set(np.unique(mask)) == {0, 5}
    assert iou(mask == 5, truth) > 0.97
    assert quality["components"] == 1 and quality["removal_delta"] > 50


def test_cover_cells_masks_every_latent_cell_the_region_touches():
    region = np.zeros((16, 12), bool)
    region[5, 6] = True  # one pixel in the cell at rows 4-7, columns 4-7
    region[15, 0] = True
    covered = cover_cells(region, 4)
    expected = np.zeros_like(region)
    expected[4:8, 4:8] = expected[12:16, 0:4] = True
    np.testing.assert_array_equal(covered, expected)


def test_prefill_leaves_no_object_in_the_region():
    image, background, truth = scene()
    region = cv2.dilate(truth.astype(np.uint8), np.ones((5, 5))).astype(bool)
    filled = prefill(image, region)
    assert np.all(filled[~region] == image[~region])
    assert lab_distance(filled, background)[region].max() < 20  # gray (up to its noise), not red
    assert lab_distance(image, background)[truth].min() > 50


def test_refine_ignore_band_marks_the_outline():
    image, background, truth = scene()
    weak = np.where(truth, 5, 0).astype(np.uint8)
    heat = normalise(blurred_heat(truth))[None]
    mask, quality = refine_mask(image, background, weak, heat, RefineConfig(boundary_px=1, disagree_high=1.0))
    band = mask == 255
    assert band.any() and quality["ignore_fraction"] == pytest.approx(band.mean())
    outline = cv2.dilate(truth.astype(np.uint8), np.ones((3, 3))) != cv2.erode(truth.astype(np.uint8), np.ones((3, 3)))
    assert np.all(band <= outline) and iou(band, outline) > 0.5
    assert np.all(mask[cv2.erode(truth.astype(np.uint8), np.ones((5, 5))).astype(bool)] == 5)


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(removal_delta=0.5), "removal_failed"),
        (dict(mask_fraction=0.0), "empty_mask"),
        (dict(mask_fraction=0.99), "full_mask"),
        (dict(components=9.0), "fragmented"),
        (dict(missing_concepts=1.0), "missing_concept"),
        (dict(), None),
    ],
)
def test_filter_reasons_after_removal(change, reason):
    quality = {"weak_fraction": 0.2, "removal_delta": 20.0, "mask_fraction": 0.2, "components": 1.0, **change}
    assert drop_reason(quality, FilterConfig()) == reason


def two_blobs(size=64):
    weak = np.zeros((size, size), np.uint8)
    weak[disk(size, (20, 20), 8)] = 1
    weak[disk(size, (44, 44), 8)] = 2
    return weak


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(finite=False), "nan_image"),
        (dict(image=np.full((64, 64, 3), 7, np.uint8)), "blank_image"),
        (dict(weak=np.zeros((64, 64), np.uint8)), "empty_weak_mask"),
        (dict(classes=[1, 2, 3]), "missing_concept"),
        (dict(config=FilterConfig(min_mask_fraction=0.3)), "empty_mask"),  # the reach is about 0.25 of the image
        (dict(config=FilterConfig(max_weak_fraction=0.05)), "full_weak_mask"),
        (dict(config=FilterConfig(max_weak_components=1)), "fragmented_weak_mask"),
        (dict(config=FilterConfig(drop_missing_concept=False), classes=[1, 2, 3]), None),
        (dict(), None),
    ],
)
def test_filter_reasons_before_removal(change, reason):
    args = dict(image=np.random.default_rng(0).integers(0, 255, (64, 64, 3)).astype(np.uint8), finite=True,
                weak=two_blobs(), classes=[1, 2], config=FilterConfig())
    args.update(change)
    assert weak_drop_reason(args["image"], args["finite"], args["weak"], args["classes"], args["config"], 6) == reason


@given(st.integers(0, 2**31 - 1), st.integers(0, 8), st.booleans())
def test_a_final_mask_lies_in_the_weak_classes_reach(seed, dilate_px, band):
    """What makes early drops exact: whatever removal leaves, refinement labels only pixels within
    refine.dilate_px of a class's own weak region, and only classes the weak mask holds."""
    rng = np.random.default_rng(seed)
    weak = np.zeros((32, 32), np.uint8)
    for class_id in rng.choice([1, 2, 3], size=rng.integers(1, 4), replace=False):
        y, x, r = rng.integers(4, 28), rng.integers(4, 28), rng.integers(1, 6)
        weak[disk(32, (y, x), r)] = class_id
    if band:
        weak[rng.random((32, 32)) < 0.05] = 255
    image = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    background = rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)
    heat = rng.random((3, 32, 32)).astype(np.float32)
    config = RefineConfig(dilate_px=dilate_px, open_px=0, close_px=0, min_area=0.0)
    mask, quality = refine_mask(image, background, weak, heat, config, [1, 2, 3])
    reach = np.zeros(weak.shape, bool)
    for class_id in (1, 2, 3):
        own = weak == class_id
        reach |= cv2.dilate(own.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1,) * 2)).astype(bool) if dilate_px else own
        if not own.any():
            assert not (mask == class_id).any()
    foreground = (mask != 0) & (mask != 255)
    assert np.all(reach[foreground])
    assert quality["mask_fraction"] <= reach.mean() + 1e-9
    early = weak_drop_reason(image, True, weak, [1, 2, 3], FilterConfig(min_mask_fraction=0.2), dilate_px)
    if early in ("missing_concept", "empty_mask"):  # the late filter could never keep it
        late = drop_reason(quality, FilterConfig(min_mask_fraction=0.2, min_removal_delta=0.0))
        assert late in ("missing_concept", "empty_mask"), (early, late, quality)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_token_positions_single_and_multi_token(tokenizer):
    layout = TextLayout.single(tokenizer)
    ids = tokenizer("a photo of a dog in a park").input_ids
    assert layout.positions("a photo of a dog in a park", (13, 16)) == [5]
    assert ids[5] == tokenizer.convert_tokens_to_ids("dog</w>")
    prompt = "a zebra in a park"
    positions = layout.positions(prompt, (2, 7))
    ids = tokenizer(prompt).input_ids
    assert len(positions) == 5 and tokenizer.decode([ids[p] for p in positions]).replace(" ", "") == "zebra"
    assert layout.room == 75 and layout.count("a zebra") == 6
    with pytest.raises(PromptError, match="outside the first 75 tokens"):
        layout.positions("dog " * 80 + "zebra", (320, 325))
    # the last token before EOS is still inside; the next is not
    assert layout.positions("dog " * 74 + "cat", (296, 299)) == [75]
    with pytest.raises(PromptError):
        layout.positions("dog " * 75 + "cat", (300, 303))


def test_local_tokenizer_keeps_every_listed_word_whole():
    # "striped" holds the start of "triangle" ("tri"): a naive merge list splits it
    words = ["triangle", "striped", "green", "red", "tree", "street"]
    tokenizer = build_tokenizer(words)
    assert {w: tokenizer.tokenize(w) for w in words} == {w: [w + "</w>"] for w in words}
    assert tokenizer.tokenize("zebra") != ["zebra</w>"]  # unlisted words still split into pieces


def test_prompt_builder_is_deterministic_and_balanced(tokenizer):
    config = PromptsConfig(
        concepts=[
            {"name": "dog", "class_id": 1, "synonyms": ["puppy"]},
            {"name": "cat", "class_id": 2, "templates": ["a cat on a table"]},
        ],
        templates=[{"prompt": "a {concept} on a {surface}", "background": "a {surface}"}, "a photo of a {concept}"],
        fillers={"surface": ["table", "beach"]},
    )
    build = PromptBuilder(config, TextLayout.single(tokenizer))
    made = [build(i, np.random.default_rng(i)) for i in range(40)]
    assert made == [build(i, np.random.default_rng(i)) for i in range(40)]
    assert [spans[0].class_id for *_, spans in made[:4]] == [1, 2, 1, 2]
    for prompt, background, negative, spans in made:
        span = spans[0]
        assert prompt[span.char_span[0] : span.char_span[1]] == span.word
        assert span.word in ("dog", "puppy", "cat")
        assert span.word not in background.split()
        assert span.name in negative
    assert {m[0] for m in made if m[3][0].name == "cat"} >= {"a cat on a table"}
    assert "a table" in {m[1] for m in made} or "a beach" in {m[1] for m in made}


@pytest.mark.parametrize("prompt, word, background", [
    ("a photo of a dog in a park", "dog", "a photo of in a park"),
    ("a green square on a striped white background", "square", "on a striped white background"),
    ("an old-fashioned red bus in the rain", "bus", "in the rain"),
    ("a photo of the cute little dog", "dog", "a photo of"),
    ("a big red dog and a cat in a kitchen", "dog", "a cat in a kitchen"),
    ("dog on grass", "dog", "on grass"),
])
def test_a_default_background_drops_the_concept_with_its_article_and_modifiers(prompt, word, background):
    from maskmint.stages.prompts import _drop_concept, _drop_dangling_joins

    assert _drop_dangling_joins(_drop_concept(prompt, word)) == background


@pytest.mark.parametrize("prompt, word, phrase", [
    ("a red circle on a striped gray background", "circle", "red circle"),
    ("a photo of a dog in a park", "dog", "dog"),
    ("a big red dog and a blue cat", "cat", "blue cat"),
    ("an old-fashioned red bus in the rain", "bus", "old-fashioned red bus"),
    ("dog on grass", "dog", "dog"),
    ("a photo of the cute little dog", "dog", "cute little dog"),
])
def test_a_concepts_noun_phrase_is_the_word_with_its_modifiers(prompt, word, phrase):
    from maskmint.stages.prompts import noun_phrase

    start = prompt.index(word)
    assert noun_phrase(prompt, (start, start + len(word))) == phrase


@given(st.lists(st.sampled_from(["red", "big", "old-fashioned", "striped", "tiny"]), max_size=3),
       st.sampled_from(["a photo of", "a picture taken with", "two cats and"]),
       st.sampled_from(["dog", "zebra"]))
def test_a_noun_phrase_keeps_every_modifier_and_no_joining_word(modifiers, lead, word):
    from maskmint.stages.prompts import noun_phrase

    prompt = " ".join([lead, "a", *modifiers, word, "in a park"])
    start = prompt.rindex(" " + word + " ") + 1
    assert noun_phrase(prompt, (start, start + len(word))) == " ".join([*modifiers, word])


def test_template_prompts_record_each_concepts_noun_phrase(tokenizer):
    config = PromptsConfig(
        concepts=[{"name": "circle", "class_id": 1}, {"name": "square", "class_id": 2}], concepts_per_image=2,
        templates=[{"prompt": "a {colour} {concept} and a {colour2} {concept2} on a {tone} background"}],
        fillers={"colour": ["red"], "tone": ["gray"]},
    )
    builder = PromptBuilder(config, TextLayout.single(tokenizer))
    prompt, _, _, spans = builder(0, np.random.default_rng(0))
    assert prompt in ("a red circle and a red square on a gray background", "a red square and a red circle on a gray background")
    assert {s.word: s.phrase for s in spans} == {"circle": "red circle", "square": "red square"}
    for span in spans:  # the phrase's tokens: the word's and the colour's just before them
        phrase_chars = (span.char_span[1] - len(span.phrase), span.char_span[1])
        assert prompt[phrase_chars[0] : phrase_chars[1]] == span.phrase
        assert span.phrase_positions == [span.token_positions[0] - 1, *span.token_positions]


@given(st.lists(st.sampled_from(["red", "big", "old-fashioned", "striped", "tiny"]), max_size=3),
       st.sampled_from(["a photo of", "a picture taken with", "in the style of a drawing of"]))
def test_no_modifier_of_the_concept_is_left_for_removal_to_draw(modifiers, lead):
    from maskmint.stages.prompts import _drop_concept, _drop_dangling_joins

    prompt = " ".join([lead, "a", *modifiers, "dog", "in a park"])
    assert _drop_dangling_joins(_drop_concept(prompt, "dog")) == f"{lead} in a park"
