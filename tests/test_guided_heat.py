"""mask.guide_px: the heat maps read again from their token cells, guided by the image's colour."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage.color import rgb2lab

from bench import quality
from maskmint.pipeline.run import run
from maskmint.pipeline.worker import ShardWorker
from maskmint.schemas.config import (CaptureConfig, ConfigError, MaskConfig, RefineConfig, RunConfig, load_config,
                                     parse_config)
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.families import FAMILIES
from maskmint.stages.refine import refine_mask
from maskmint.stages.weak_mask import WeakMask, guided_heat
from tests.conftest import tar_fields

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "some/model"}, "prompts": {"concepts": [{"name": "cat", "class_id": 1}]}}


def slow_joint_upsampling(heat, image, cell, sigma):
    """Joint bilateral upsampling written out pixel by pixel: each cell's value and mean Lab
    colour by slicing; a pixel reads the 4 x 4 cells around its centre (those inside the grid),
    each weighted by exp(-d^2 / 2) for its distance d in cells and exp(-e^2 / 2 sigma^2) for its
    colour's distance e from the pixel's."""
    channels, height, width = heat.shape
    rows, cols = height // cell, width // cell
    lab = rgb2lab(image)
    cell_value = np.zeros((channels, rows, cols))
    cell_lab = np.zeros((rows, cols, 3))
    for r in range(rows):
        for c in range(cols):
            cell_value[:, r, c] = heat[:, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].mean(axis=(1, 2))
            cell_lab[r, c] = lab[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3).mean(axis=0)
    out = np.zeros(heat.shape)
    for y in range(height):
        for x in range(width):
            u, v = (y + 0.5) / cell - 0.5, (x + 0.5) / cell - 0.5
            total, weight_sum = np.zeros(channels), 0.0
            for r in range(math.floor(u) - 1, math.floor(u) + 3):
                for c in range(math.floor(v) - 1, math.floor(v) + 3):
                    if not (0 <= r < rows and 0 <= c < cols):
                        continue
                    colour_gap = np.sum((lab[y, x] - cell_lab[r, c]) ** 2)
                    weight = math.exp(-((u - r) ** 2 + (v - c) ** 2) / 2) * math.exp(-colour_gap / (2 * sigma**2))
                    total += weight * cell_value[:, r, c]
                    weight_sum += weight
            out[:, y, x] = total / weight_sum
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), cell=st.sampled_from([4, 8]), rows=st.integers(1, 4), cols=st.integers(1, 4),
       sigma=st.sampled_from([10.0, 20.0, 60.0]))
def test_guided_heat_equals_joint_bilateral_upsampling_written_out(seed, cell, rows, cols, sigma):
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (2 * rows, 2 * cols, 3), dtype=np.uint8)
    image = np.kron(blocks, np.ones((cell // 2, cell // 2, 1), dtype=np.uint8))  # colour edges inside cells
    heat = rng.random((2, rows * cell, cols * cell)).astype(np.float32)
    np.testing.assert_allclose(guided_heat(heat, image, cell, sigma), slow_joint_upsampling(heat, image, cell, sigma),
                               atol=1e-2)  # OpenCV against scikit-image Lab


def half_hidden_square():
    """A green square mostly behind a blue disc: only a strip of it shows above the disc, across
    two rows of 8 px cells. The square's coarse heat peaks one cell higher, over the empty
    background above the strip, as a DiT's tokens put it; the disc's covers the disc's cells."""
    size, cell = 64, 8
    image = np.full((size, size, 3), 40, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - 41) ** 2 + (xx - 32) ** 2 <= 16**2
    strip = np.zeros((size, size), bool)
    strip[20:28, 20:44] = True
    strip &= ~disc
    image[strip] = (30, 200, 40)
    image[disc] = (40, 60, 220)
    cells = np.zeros((2, size // cell, size // cell), np.float32)
    cells[0, 3:7, 2:6] = 1.0  # the disc's cells
    cells[1, 1, 2:6] = 1.0  # the square's: the row above its strip
    cells[:, 2, 2:6] = [[0.45], [0.55]]
    cells[1, 3, 2:6] = 0.1
    heat = np.stack([np.clip(np.asarray(Image.fromarray(m).resize((size, size), Image.BICUBIC)), 0, None)
                     for m in cells])  # what a capture gives: bicubic from the cells
    background = np.full_like(image, 40)
    return image, background, heat, disc, strip, cell


def test_a_half_hidden_objects_strip_goes_to_it_with_guidance_and_to_its_neighbour_without():
    image, background, heat, disc, strip, cell = half_hidden_square()
    spans = [ConceptSpan(name=word, class_id=class_id, word=word, char_span=span, token_positions=[position])
             for word, class_id, span, position in (("disc", 1, (2, 6), 2), ("square", 2, (13, 19), 5))]
    batch = {"heatmap": heat[None], "image": image[None], "concepts": [spans]}
    masks = {}
    for guide in (None, cell):
        config = MaskConfig(tau=0.4, guide_px=guide)
        out = WeakMask(config)(batch)
        final, _ = refine_mask(image, background, out["weak_mask"][0], out["heat"][0],
                               RefineConfig(ignore_band=False, delta_e=40), [1, 2])
        masks[guide] = final
    assert (masks[None][strip] == 2).mean() < 0.25  # bicubic: most of the strip is the disc's
    assert (masks[cell][strip] == 2).mean() > 0.9
    assert (masks[cell][disc] == 1).mean() > 0.95


def test_guidance_keeps_the_maps_a_convex_mix_of_their_cells():
    """Shares stay shares (concept_attention with mask.normalise: none): every guided value lies
    within its map's range of cell values."""
    image, _, heat, _, _, cell = half_hidden_square()
    guided = guided_heat(heat, image, cell, 20.0)
    cells = heat.reshape(2, 8, cell, 8, cell).mean(axis=(2, 4))
    assert (guided >= cells.min(axis=(1, 2))[:, None, None] - 1e-6).all()
    assert (guided <= cells.max(axis=(1, 2))[:, None, None] + 1e-6).all()


def test_a_run_with_guidance_stores_guided_heat_and_the_same_images(config_dict, tmp_path):
    plain = copy.deepcopy(config_dict)
    plain["output"] = {"samples": 3, "shard_size": 3}
    guided = copy.deepcopy(plain)
    guided["mask"] = {"guide_px": 4}
    stored = {}
    for name, data in (("plain", plain), ("guided", guided)):
        config = parse_config(data)
        run(config, tmp_path / name, show_progress=False)
        stored[name] = tar_fields(tmp_path / name)
    assert stored["plain"].keys() == stored["guided"].keys() and len(stored["plain"]) == 3
    for key, fields in stored["plain"].items():
        image_field = next(field for field in fields if field in ("jpg", "png"))
        assert fields[image_field] == stored["guided"][key][image_field]
    changed = [not np.array_equal(*(np.asarray(Image.open(io.BytesIO(stored[n][key]["heatmap.png"])))
                                    for n in ("plain", "guided"))) for key in stored["plain"]]
    assert all(changed)


def test_guided_maps_tell_the_toy_flux_devs_two_shapes_apart():
    """The toy Flux-dev, ConceptAttention with `caption_phrase`, two shapes, run seed 7, 16
    samples (bench/RESULTS.md): with the config's guide_px 8, heat AUC 0.997, weak mIoU 0.686,
    final mIoU 0.954, 0.30% of object pixels confused; the capture's bicubic maps alone give
    0.985, 0.550, 0.931 and 1.03%, which each floor here fails."""
    data = load_config(REPO / "configs" / "toy-flux-dev.yaml").model_dump(mode="json")
    assert data["mask"]["guide_px"] == 8
    data["prompts"]["concepts_per_image"], data["execution"]["seed"] = 2, 7
    data["capture"].update(recipe="concept_attention", concept_text="caption_phrase")
    data["mask"]["tau"] = 0.4
    summary, scores, _, _ = quality.evaluate(RunConfig.model_validate(data), samples=16, progress=False)
    assert summary["heat_auc"] >= 0.99, scores
    assert summary["weak_miou"] >= 0.65, scores
    assert summary["refined_miou"] >= 0.945, scores
    assert summary["confusion"] < 0.006, scores


# Real models' map cells, from their published configs: SD 1.x cross-attends at 1, 2 and 4 times
# below its 64 x 64 latent (8 px cells at 512 px); SDXL's first block has no attention, so its
# finest is 2 (16 px); SD3 patches 2 x 2 latents; Flux packs 2 x 2 (its transformer's patch_size 1).
@pytest.mark.parametrize(("family", "denoiser", "capture", "cell_px"), [
    ("sd", {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}, {}, 8),
    ("sd", {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}, {"skip_downscales": [1, 8]}, 16),
    ("sdxl", {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, {}, 16),
    ("sd3", {"patch_size": 2}, {}, 16),
    ("flux", {"patch_size": 1}, {}, 16),
])
def test_auto_is_the_finest_map_cell_the_capture_reads(family, denoiser, capture, cell_px):
    assert 8 * FAMILIES[family].map_cell(CaptureConfig(**capture), denoiser) == cell_px  # their VAEs: 8 x


@pytest.mark.parametrize(("name", "cell_px"), [("toy-flux-dev", 8), ("multi", 4)])
def test_auto_on_the_shipped_toy_models(name, cell_px, tmp_path):
    """The toy Flux-dev: a 4 x VAE and 2 x 2 packing, 8 x 8 tokens at 64 px; the toy UNet: a 4 x
    VAE and cross-attention at the latent's own 16 x 16, so 4 px."""
    data = load_config(REPO / "configs" / f"{name}.yaml").model_dump(mode="json")
    data["mask"]["guide_px"] = "auto"
    worker = ShardWorker(RunConfig.model_validate(data), tmp_path)
    try:
        assert worker.weak_mask.guide_px == cell_px
    finally:
        worker.close()


def test_auto_writes_what_the_resolved_cell_writes(config_dict, tmp_path):
    stored = {}
    for name, guide in (("auto", "auto"), ("explicit", 2)):  # the tiny UNet: a 2 x VAE, attention at the latent size
        data = copy.deepcopy(config_dict)
        data["output"] = {"samples": 2, "shard_size": 2}
        data["mask"] = {"guide_px": guide}
        run(parse_config(data), tmp_path / name, show_progress=False)
        stored[name] = {key: {f: v for f, v in fields.items() if f != "json"}
                        for key, fields in tar_fields(tmp_path / name).items()}
    assert stored["auto"] == stored["explicit"] and len(stored["auto"]) == 2


def test_a_run_made_before_guide_px_existed_keeps_its_hash_while_it_is_off():
    assert parse_config(MINIMAL).config_hash() == "715e6ae3b5881529"
    assert parse_config({**MINIMAL, "mask": {"guide_px": None, "guide_colour": 20}}).config_hash() == "715e6ae3b5881529"
    assert parse_config({**MINIMAL, "mask": {"guide_px": 8}}).config_hash() != "715e6ae3b5881529"


@pytest.mark.parametrize("field, value", [("guide_px", 1), ("guide_px", "eight"), ("guide_px", 300), ("guide_px", True),
                                          ("guide_px", 8.5), ("guide_colour", 0), ("guide_colour", -5)])
def test_a_guide_out_of_range_is_one_line(field, value):
    with pytest.raises(ConfigError) as error:
        parse_config({**MINIMAL, "mask": {field: value}})
    assert field in str(error.value) and "\n" not in str(error.value)
    if field == "guide_px":  # one message, not one per member of the int | auto union
        assert str(error.value) == f"mask.guide_px: {value!r} is neither a cell side of 2 to 256 pixels nor auto"
