"""Several concepts per image: prompts, weak-mask thresholds over classes, refinement and
filtering over several objects, and a whole run."""

from __future__ import annotations

import copy
from collections import Counter

import cv2
import numpy as np
import pytest

from maskmint import launch
from maskmint.schemas.config import ConfigError, FilterConfig, MaskConfig, RefineConfig, parse_config
from maskmint.schemas.prompts import PromptsConfig
from maskmint.stages.filter import drop_reason
from maskmint.stages.prompts import PromptBuilder
from maskmint.stages.tokens import TextLayout
from maskmint.stages.refine import refine_mask
from maskmint.stages.weak_mask import gmm_threshold, normalise, weak_mask


def disk(size=64, center=(32, 32), radius=10):
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


MULTI = {
    "concepts": [
        {"name": "dog", "class_id": 1, "synonyms": ["puppy"]},
        {"name": "cat", "class_id": 2},
        {"name": "zebra", "class_id": 7},
        {"name": "horse", "class_id": 9},
    ],
    "templates": [
        "a photo of a {concept}",
        {"prompt": "a {colour} {concept} and a {colour2} {concept2} in a {place}", "background": "a {place}"},
        "a {concept}, a {concept2} and a {concept3} in a {place}",
    ],
    "fillers": {"colour": ["red", "blue"], "place": ["park", "kitchen"]},
    "concepts_per_image": [1, 2, 3],
}


@pytest.fixture(scope="module")
def tokenizer():
    from maskmint.pipeline.testing.tiny_models import build_tokenizer

    return build_tokenizer(["dog", "puppy", "cat", "horse", "red", "blue", "park", "kitchen", "photo"])


def test_prompt_builder_with_two_and_three_concepts(tokenizer):
    build = PromptBuilder(PromptsConfig(**MULTI), TextLayout.single(tokenizer))
    made = [build(i, np.random.default_rng(i)) for i in range(60)]
    assert made == [build(i, np.random.default_rng(i)) for i in range(60)]  # deterministic
    names = {c["name"] for c in MULTI["concepts"]}
    for i, (prompt, background, negative, spans) in enumerate(made):
        assert spans[0].class_id == [1, 2, 7, 9][i % 4]  # the first concept takes turns
        assert len(spans) == [1, 2, 3][i // 4 % 3]  # the count moves on after every class's turn
        assert len({s.class_id for s in spans}) == len(spans)  # no class twice
        ids = tokenizer(prompt).input_ids
        for span in spans:
            assert prompt[slice(*span.char_span)] == span.word
            assert tokenizer.decode([ids[p] for p in span.token_positions]).replace(" ", "") == span.word
            assert span.word not in background.split() and span.name in negative
        assert not names & set(background.replace(",", " ").split())
        words = background.replace(",", " , ").split()
        assert words[0] not in ("and", ",") and all(  # no join left dangling where concepts were
            not (a in ("and", ",") and b in ("and", ",")) for a, b in zip(words, words[1:]))
    two = [m for i, m in enumerate(made) if i // 4 % 3 == 1]
    assert {m[1] for m in two} <= {"a park", "a kitchen"}  # the explicit background
    assert all("red" in m[0] and "blue" in m[0] for m in two)  # {colour2} drawn apart from {colour}
    counts = Counter(s.class_id for *_, spans in made for s in spans)
    assert max(counts.values()) - min(counts.values()) <= 12  # balanced over the run
    expected = build.concept_counts(60)
    assert sum(expected.values()) == pytest.approx(sum(counts.values()))


def test_classes_stay_balanced_when_counts_and_classes_share_a_cycle(tokenizer):
    """Three classes and counts [1, 2, 3]: no class may be tied to one count."""
    config = copy.deepcopy(MULTI)
    config["concepts"] = config["concepts"][:3]
    build = PromptBuilder(PromptsConfig(**config), TextLayout.single(tokenizer))
    made = [build(i, np.random.default_rng(i)) for i in range(900)]
    pairs = Counter((spans[0].class_id, len(spans)) for *_, spans in made)
    assert len(pairs) == 9 and set(pairs.values()) == {100}  # every class first with every count
    counts = Counter(s.class_id for *_, spans in made for s in spans)
    assert max(counts.values()) / min(counts.values()) < 1.1, counts
    assert build.concept_counts(900) == pytest.approx(counts, rel=0.1)


def test_several_concept_configs_are_checked():
    with pytest.raises(ValueError, match="no template names 2 concept"):
        PromptsConfig(**{**MULTI, "templates": ["a {concept}"], "concepts_per_image": [1, 2]})
    with pytest.raises(ValueError, match="each count must be 1..2"):
        PromptsConfig(**{**MULTI, "concepts": MULTI["concepts"][:2], "concepts_per_image": 3})
    with pytest.raises(ValueError, match="without the slots before it"):
        PromptsConfig(**{**MULTI, "templates": ["a {concept} and a {concept3}"]})
    with pytest.raises(ValueError, match=r"\['shade2'\]"):
        PromptsConfig(**{**MULTI, "templates": [*MULTI["templates"], "a {shade2} {concept}"]})


def test_a_concept_past_the_limit_in_a_three_concept_template_names_it(config_dict, write_config, capsys):
    data = copy.deepcopy(config_dict)
    data["prompts"] = copy.deepcopy(MULTI)
    data["prompts"]["templates"].append("a {concept} and a {concept2} " + "very " * 60 + "and a {concept3}")
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(write_config(data))]) == 2
    assert "prompts.templates.3" in capsys.readouterr().err


def test_argmax_threshold_and_band_on_hand_made_maps():
    left, right = disk(center=(32, 18), radius=9), disk(center=(32, 46), radius=9)
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1)).astype(np.float32)
    heat = np.stack([np.where(left, 1.0, 0.0) + 0.2 * ramp, np.where(right, 1.0, 0.0) + 0.1 * ramp])
    mask = weak_mask(heat, [4, 6], MaskConfig(tau=0.5, open_px=0, close_px=0, min_area=0))
    assert np.array_equal(mask == 4, left) and np.array_equal(mask == 6, right)

    # the band: 255 where the winning score is in [low, high), background below
    graded = np.stack([ramp, np.zeros_like(ramp)])
    banded = weak_mask(graded, [4, 6], MaskConfig(threshold="band", band_low=0.25, band_high=0.75,
                                                  open_px=0, close_px=0, min_area=0))
    norm = normalise(graded)[0]
    assert np.array_equal(banded == 4, norm >= 0.75)
    assert np.array_equal(banded == 255, (norm >= 0.25) & (norm < 0.75))
    assert np.array_equal(banded == 0, norm < 0.25)
    with pytest.raises(ValueError, match="band_low must be below"):
        MaskConfig(threshold="band", band_low=0.7, band_high=0.6)


def test_shares_are_read_as_they_are_when_not_normalised():
    """ConceptAttention's maps are each pixel's share of a softmax that includes the background
    concepts: a map that never wins stays out, where stretching it would let its peak in."""
    left = disk(center=(32, 18), radius=9)
    corner = np.zeros((64, 64), bool)
    corner[:8, :8] = True
    heat = np.stack([np.where(left, 0.8, 0.3), np.where(corner, 0.25, 0.2)]).astype(np.float32)
    loose = dict(tau=0.5, open_px=0, close_px=0, min_area=0)
    as_shares = weak_mask(heat, [4, 6], MaskConfig(normalise="none", **loose))
    assert np.array_equal(as_shares == 4, left) and not (as_shares == 6).any()
    stretched = weak_mask(heat, [4, 6], MaskConfig(**loose))
    assert np.array_equal(stretched == 6, corner)


def test_unnormalised_maps_need_the_concept_attention_recipe(tmp_path, capsys):
    data = {"model": {"path": str(tmp_path)}, "prompts": {"concepts": [{"name": "cat", "class_id": 1}]},
            "mask": {"normalise": "none"}}
    with pytest.raises(ConfigError, match="concept_attention"):
        parse_config(data, base_dir=tmp_path)
    data["capture"] = {"recipe": "concept_attention"}
    assert parse_config(data, base_dir=tmp_path).mask.normalise == "none"


@pytest.mark.parametrize("method", ["otsu", "gmm"])
def test_otsu_and_gmm_split_a_bimodal_map(method):
    rng = np.random.default_rng(0)
    truth = disk(radius=14)
    heat = np.where(truth, rng.normal(0.8, 0.05, truth.shape), rng.normal(0.2, 0.05, truth.shape)).astype(np.float32)
    mask = weak_mask(heat[None], [3], MaskConfig(threshold=method, open_px=0, close_px=0, min_area=0))
    assert iou(mask == 3, truth) > 0.98
    if method == "gmm":
        assert 0.3 < gmm_threshold(normalise(heat[None])[0]) < 0.7
        assert gmm_threshold(np.full((8, 8), 0.5)) == 1.0  # one mode: nothing is 'high'


def test_refine_two_objects_by_heat_and_the_band_between_classes():
    background = np.full((64, 64, 3), 120, np.uint8)
    left, right = disk(center=(32, 22), radius=10), disk(center=(32, 42), radius=10)  # they touch
    image = background.copy()
    image[left] = (220, 30, 30)
    image[right] = (30, 30, 220)
    weak = np.zeros((64, 64), np.uint8)
    weak[disk(center=(32, 20), radius=8)] = 1
    weak[disk(center=(32, 44), radius=8)] = 2
    heat = np.stack([cv2.GaussianBlur(left.astype(np.float32), (0, 0), 3),
                     cv2.GaussianBlur(right.astype(np.float32), (0, 0), 3)])
    mask, quality = refine_mask(image, background, weak, normalise(heat), RefineConfig(ignore_band=False), [1, 2])
    assert iou(mask == 1, left & ~right) > 0.9 and iou(mask == 2, right & ~left) > 0.9
    assert quality["missing_concepts"] == 0
    banded, _ = refine_mask(image, background, weak, normalise(heat),
                            RefineConfig(boundary_px=1, disagree_high=1.0, disagree_low=0.0), [1, 2])
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))  # 4-neighbours
    between = cv2.dilate((mask == 1).astype(np.uint8), cross).astype(bool) & (mask == 2)
    assert between.any() and np.all(banded[between] == 255)  # the class-to-class boundary is ignored


def test_a_missing_concept_is_a_drop_with_its_reason_or_kept():
    quality = {"weak_fraction": 0.2, "removal_delta": 20.0, "mask_fraction": 0.2, "components": 1.0, "missing_concepts": 1.0}
    assert drop_reason(quality, FilterConfig()) == "missing_concept"
    assert drop_reason(quality, FilterConfig(drop_missing_concept=False)) is None


def test_a_run_with_two_concept_prompts(config_dict, write_config, tmp_path):
    import json

    import webdataset as wds

    data = copy.deepcopy(config_dict)
    data["prompts"]["templates"] = ["a {concept} and a {concept2} in a {place}"]
    data["prompts"]["concepts_per_image"] = 2
    # a random model: low thresholds and a permissive refine, so both classes reach the mask
    data["mask"] = {"tau": 0.2, "min_area": 0.0, "open_px": 0}
    data["refine"] = {"delta_e": 0.5, "dilate_px": 8, "min_area": 0.0, "open_px": 0, "ignore_band": False}
    data["filter"] = {**data["filter"], "drop_missing_concept": False}
    data["output"] = {"samples": 4, "shard_size": 4}
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(out), "--quiet"]) == 0
    stats = json.loads((out / "shards" / "000000.json").read_text())
    samples = list(wds.WebDataset(str(out / "shards" / "000000.tar"), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 4
    both = 0
    for sample in samples:
        meta = sample["json"]
        ids = [c["class_id"] for c in meta["concepts"]]
        assert sorted(ids) == [1, 7] and stats["classes"][sample["__key__"]] == ids
        values = set(np.unique(sample["mask.png"][..., 0])) - {0, 255}
        assert values <= {1, 7}
        both += values == {1, 7}
        assert sample["heatmap.png"].shape[1] == 2 * 32  # two maps side by side
        assert "dog" in meta["background_negative_prompt"] and "zebra" in meta["background_negative_prompt"]
    assert both >= 1


def test_minimal_multi_config_defaults_still_one_concept(config_dict):
    config = parse_config(config_dict)
    assert config.prompts.concepts_per_image == 1 and config.mask.threshold == "fixed"
    with pytest.raises(ConfigError, match="concepts_per_image"):
        parse_config({**config_dict, "prompts": {**config_dict["prompts"], "concepts_per_image": [0]}})
