"""distill: the concept-distillation fine-tune of the removal model, as a LoRA adapter."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from maskmint import launch
from maskmint.pipeline.distill import CHECKPOINT, Trainer, distill
from maskmint.pipeline.run import run
from maskmint.pipeline.testing.tiny_models import BUILDERS
from maskmint.schemas.config import parse_config
from maskmint.schemas.distill import DistillConfig
from maskmint.schemas.masking import ADAPTER_WEIGHTS
from maskmint.stages.distill import background_rectangle, latent_foreground, masked_mse
from maskmint.stages.families import FAMILIES
from maskmint.stages.remove import load_adapter
from tests.conftest import TEST_IMAGE_SIZE, tar_fields

QUICK = DistillConfig(steps=2, batch_size=2, checkpoint_every=1)


# -- the example: masks, rectangles, loss ------------------------------------------------------
def test_masked_loss_covers_exactly_the_chosen_pixels():
    target = torch.zeros(2, 4, 6, 6)
    prediction = torch.zeros(2, 4, 6, 6)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 1:3, 2:5] = True
    mask[1, 5, 5] = True
    prediction[~mask[:, None].expand_as(prediction)] = 100.0  # errors outside the mask count for nothing
    assert masked_mse(prediction, target, mask) == 0.0
    prediction[0, :, 1, 2] = 2.0  # one covered pixel off by 2 in all 4 channels
    covered = int(mask.sum()) * 4
    assert masked_mse(prediction, target, mask).item() == pytest.approx(4 * 4 / covered)


def test_latent_foreground_is_a_majority_of_each_cell():
    pixels = np.zeros((8, 8), bool)
    pixels[0:4, 0:3] = True  # 12 of 16 pixels of cell (0, 0)
    pixels[4:6, 4:8] = True  # 8 of 16 of cell (1, 1): not more than half
    assert latent_foreground(pixels, 4).tolist() == [[True, False], [False, False]]


@pytest.mark.parametrize("margin, cells", [(0, [[False, False], [False, False]]), (1, [[True, True], [False, False]]),
                                           (3, [[True, True], [False, False]]), (7, [[True, True], [True, True]])])
def test_a_background_margin_keeps_the_cells_beside_the_mask_out_of_the_background(margin, cells):
    pixels = np.zeros((8, 8), bool)
    pixels[0:2] = True  # half of each top cell: background at no margin
    # margin 1 reaches row 2 (12 of 16 top pixels), 3 reaches row 4 (4 of 16 bottom), 7 all
    assert latent_foreground(pixels, 4, margin).tolist() == cells


def check_rectangle(region, foreground, config):
    background = ~foreground
    assert not (region & foreground).any(), "a loss pixel on the object"
    if np.array_equal(region, background):
        return "whole"
    rows, cols = np.nonzero(region)
    height, width = rows.max() - rows.min(), cols.max() - cols.min()
    scale = np.sqrt(foreground.size) / 64
    assert height > config.rect_min_side * scale and width > config.rect_min_side * scale
    assert height * width >= config.rect_min_area * scale**2
    assert height * width <= (config.rect_max_side * scale) ** 2
    box = np.zeros_like(foreground)
    box[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1] = True
    assert np.array_equal(region, box & background), "the region is the background inside one box"
    assert region.sum() >= config.rect_background * height * width
    return "box"


@settings(max_examples=40, deadline=None)
@given(st.integers(8, 64), st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.05, 0.6)), max_size=3),
       st.integers(0, 2**31))
def test_rectangles_keep_the_background_share_and_sizes(side, blobs, seed):
    rows, cols = np.mgrid[:side, :side] / side
    foreground = np.zeros((side, side), bool)
    for y, x, r in blobs:
        foreground |= (rows - y) ** 2 + (cols - x) ** 2 < r**2
    config = DistillConfig()
    region = background_rectangle(foreground, np.random.default_rng(seed), config)
    if (~foreground).sum() < 2:
        assert not region.any()
    else:
        check_rectangle(region, foreground, config)


def test_an_empty_background_gives_a_rectangle_on_the_64_grid():
    foreground = np.zeros((64, 64), bool)
    foreground[20:40, 20:40] = True
    kinds = {check_rectangle(background_rectangle(foreground, np.random.default_rng(s), DistillConfig()), foreground,
                             DistillConfig()) for s in range(20)}
    assert kinds == {"box"}


# -- runs to learn from -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def family_model(request, tmp_path_factory):
    name = getattr(request, "param", "sd")
    folder = tmp_path_factory.mktemp("distill-models") / name
    BUILDERS[name](seed=2, image_size=TEST_IMAGE_SIZE).save_pretrained(folder)
    return name, folder


def minted(model, out, **removal) -> dict:
    """A small run of the test config on `model`; its config mapping."""
    from tests.conftest import BASE_CONFIG

    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(model)
    data["output"] = {"samples": 4, "shard_size": 2}
    data["filter"]["drop_missing_concept"] = False
    data["mask"] = {"min_area": 0.0}
    data["removal"].update(removal)
    run(parse_config(data), out, show_progress=False)
    return data


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("distill-run") / "run"
    return minted(tiny_model_dir, out), out


def lora_tensors(out):
    return torch.load(out / CHECKPOINT, weights_only=False)["lora"]


def test_background_steps_learn_no_cell_within_the_margin_of_the_weak_mask(sd_run, tmp_path):
    """Every background step's loss cells lie outside the margin, by a distance transform
    of each image's own weak mask; without a margin the same steps do learn such cells."""
    from scipy import ndimage

    _, run_dir = sd_run
    reached, learnt = {}, {}
    for margin in (0, 2):
        options = QUICK.model_copy(update={"concept_share": 0.0, "flip": False, "background_margin_px": margin})
        trainer = Trainer(run_dir, tmp_path / f"margin{margin}", options)
        cell = trainer.pipe.vae_scale_factor
        learnt_near = learnt[margin] = 0
        for step in range(4):
            _, masks, _ = trainer.batch(step)
            for j, mask in enumerate(masks.numpy()):
                foreground = trainer.samples.at(step * options.batch_size + j)[1]
                learnt[margin] += int(mask.sum())
                within = ndimage.distance_transform_edt(~foreground) <= 1  # wholly inside a 2 px margin
                h, w = mask.shape
                near = within[: h * cell, : w * cell].reshape(h, cell, w, cell).all(axis=(1, 3))
                learnt_near += int((mask & near).sum())
        reached[margin] = learnt_near
    assert reached[2] == 0 and reached[0] > 0 and learnt[2] > 0, (reached, learnt)


def test_resumed_training_ends_with_the_uninterrupted_weights(sd_run, tmp_path, monkeypatch):
    _, run_dir = sd_run
    options = QUICK.model_copy(update={"steps": 4, "checkpoint_every": 2})
    distill(run_dir, tmp_path / "whole", options, progress=False)

    real_loss = Trainer.loss

    def dies_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_loss(self, step)

    monkeypatch.setattr(Trainer, "loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        distill(run_dir, tmp_path / "cut", options, progress=False)
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)["step"] == 2
    monkeypatch.setattr(Trainer, "loss", real_loss)
    report = distill(run_dir, tmp_path / "cut", options, progress=False)
    assert report["steps_done"] == 4
    for whole, resumed in zip(lora_tensors(tmp_path / "whole"), lora_tensors(tmp_path / "cut")):
        assert torch.equal(whole, resumed)
    # A rerun asking for more steps continues from the last one.
    more = distill(run_dir, tmp_path / "cut", options.model_copy(update={"steps": 5}), progress=False)
    assert more["steps_done"] == 5 and len(more["loss_every_10_steps"]) == 1


@pytest.mark.parametrize("layers", [None, "attention", "all"])  # None: the documented default, every layer
def test_the_adapter_file_round_trips_into_a_fresh_denoiser(sd_run, tiny_model_dir, tmp_path, layers):
    _, run_dir = sd_run
    trainer = Trainer(run_dir, tmp_path / "ad", QUICK if layers is None else QUICK.model_copy(update={"layers": layers}))
    trainer.train(progress=False)
    fresh = BUILDERS["sd"](seed=0, image_size=TEST_IMAGE_SIZE).unet
    fresh.load_state_dict(trainer.denoiser.state_dict(), strict=False)  # the base weights only
    load_adapter(fresh, str(tmp_path / "ad"))
    torch.manual_seed(0)
    sample, states = torch.randn(1, 4, 4, 4), torch.randn(1, 77, fresh.config.cross_attention_dim)
    with torch.no_grad():
        trained = trainer.denoiser(sample, 10, encoder_hidden_states=states).sample
        off = fresh(sample, 10, encoder_hidden_states=states).sample
        fresh.enable_adapters()
        on = fresh(sample, 10, encoder_hidden_states=states).sample
    assert torch.allclose(on, trained, atol=1e-6)
    assert not torch.allclose(off, on, atol=1e-7), "the adapter changes nothing"
    saved = load_file(tmp_path / "ad" / ADAPTER_WEIGHTS)
    assert saved and all("lora_" in name for name in saved)
    assert any(t.ndim == 4 for t in saved.values()) == (layers != "attention"), "convolutions adapted only with all"
    provenance = json.loads((tmp_path / "ad" / "distill.json").read_text())
    assert provenance["family"] == "sd" and provenance["steps_done"] == 2 and provenance["run_config_hash"]


def test_removal_with_the_adapter_leaves_images_and_maps_bit_identical(sd_run, tmp_path):
    data, run_dir = sd_run
    distill(run_dir, tmp_path / "ad", QUICK.model_copy(update={"lr": 0.05}), progress=False)
    without = tar_fields(run_dir)
    minted(data["model"]["path"], tmp_path / "with", adapter=str(tmp_path / "ad"))
    with_adapter = tar_fields(tmp_path / "with")
    assert with_adapter.keys() == without.keys() and without
    for key in without:
        assert with_adapter[key]["jpg"] == without[key]["jpg"], key
        assert with_adapter[key]["heatmap.png"] == without[key]["heatmap.png"], key
    assert any(with_adapter[k]["background.jpg"] != without[k]["background.jpg"] for k in without), \
        "the adapter did not reach removal"


@pytest.mark.parametrize("family_model", sorted(FAMILIES), indirect=True)
def test_distill_runs_end_to_end_on_every_family(family_model, tmp_path):
    name, model = family_model
    minted(model, tmp_path / "run")
    report = distill(tmp_path / "run", tmp_path / "ad", QUICK, progress=False)
    assert report["family"] == name and report["steps_done"] == 2
    assert np.isfinite(report["final_loss"]) and report["final_loss"] > 0
    saved = load_file(tmp_path / "ad" / ADAPTER_WEIGHTS)
    assert any(t.abs().sum() > 0 for n, t in saved.items() if "lora_B" in n), "training moved nothing"
    # ... and a run on the same model removes with it.
    minted(model, tmp_path / "again", adapter=str(tmp_path / "ad"))
    assert tar_fields(tmp_path / "again")


# -- what a user gets wrong ---------------------------------------------------------------------
def test_bad_runs_are_refused_in_one_line(sd_run, tmp_path, capsys):
    _, run_dir = sd_run
    assert launch.main(["distill", str(tmp_path), "--out", str(tmp_path / "a")]) == launch.USER_ERROR
    assert "not a maskmint run directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    import shutil

    shutil.copytree(run_dir, partial)
    (partial / "shards" / "000001.json").unlink()
    assert launch.main(["distill", str(partial), "--out", str(tmp_path / "b"), "--quiet"]) == launch.USER_ERROR
    err = capsys.readouterr().err
    assert "partial (1 of 2 shards)" in err and len(err.strip().splitlines()) == 1
    assert launch.main(["distill", str(run_dir), "--out", str(tmp_path / "c"), "--rect-min-side", "40"]) == launch.USER_ERROR
    assert "error: distill --rect-min-side must be below --rect-max-side\n" == capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--background-margin-px", "-1"), ("--concept-share", "2"), ("--lr", "0"),
                                         ("--rect-background", "0"), ("--steps", "0")])
def test_a_bad_distill_flag_is_named_as_typed(sd_run, tmp_path, capsys, flag, value):
    _, run_dir = sd_run
    assert launch.main(["distill", str(run_dir), "--out", str(tmp_path / "a"), flag, value]) == launch.USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith(f"error: distill {flag}: ") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a").exists()


def test_another_runs_checkpoint_is_not_continued(sd_run, tmp_path, capsys):
    _, run_dir = sd_run
    distill(run_dir, tmp_path / "ad", QUICK, progress=False)
    code = launch.main(["distill", str(run_dir), "--out", str(tmp_path / "ad"), "--rank", "4", "--quiet"])
    assert code == launch.USER_ERROR
    assert "with other options" in capsys.readouterr().err


def test_the_adapter_of_another_family_is_refused_before_the_run(sd_run, tmp_path, write_config, capsys):
    data, run_dir = sd_run
    distill(run_dir, tmp_path / "ad", QUICK, progress=False)
    provenance = json.loads((tmp_path / "ad" / "distill.json").read_text())
    (tmp_path / "ad" / "distill.json").write_text(json.dumps({**provenance, "family": "flux"}))
    config = copy.deepcopy(data)
    config["removal"] = {**config["removal"], "adapter": str(tmp_path / "ad")}
    assert launch.main(["plan", "--config", str(write_config(config))]) == launch.USER_ERROR
    assert "removal.adapter: trained for family flux, this model is sd" in capsys.readouterr().err
    config["removal"]["adapter"] = str(tmp_path)
    assert launch.main(["plan", "--config", str(write_config(config))]) == launch.USER_ERROR
    assert "is not an adapter folder" in capsys.readouterr().err


def test_the_adapter_enters_the_config_hash(sd_run, tmp_path):
    data, run_dir = sd_run
    distill(run_dir, tmp_path / "ad", QUICK, progress=False)
    plain = parse_config(data).config_hash()
    with_adapter = copy.deepcopy(data)
    with_adapter["removal"] = {**data["removal"], "adapter": str(tmp_path / "ad")}
    assert parse_config(with_adapter).config_hash() != plain
    import shutil

    shutil.copytree(tmp_path / "ad", tmp_path / "moved")
    with_adapter["removal"]["adapter"] = str(tmp_path / "moved")
    assert parse_config(with_adapter).config_hash() == parse_config(
        {**data, "removal": {**data["removal"], "adapter": str(tmp_path / "ad")}}).config_hash()


def test_a_run_stored_at_the_source_size_trains_on_the_frame_the_model_saw(tiny_model_dir, tmp_path):
    """The same images annotated twice, stored at the model's size and at their own: distill
    reads both back as the same model-sized images and weak masks."""
    from maskmint.pipeline.dataset import read_samples
    from maskmint.pipeline.distill import RunSamples
    from maskmint.schemas.masking import MaskConfig
    from tests.test_folder_source import folder_config, make_images, write

    images = make_images(tmp_path / "images")  # square, wide and small sources
    samples = {}
    for size in ("model", "source"):
        config = write(folder_config(tiny_model_dir, images, annotate={"store_size": size}), tmp_path / f"{size}.yaml")
        assert launch.main(["run", "--config", str(config), "--out", str(tmp_path / size), "--quiet"]) == 0
        read = RunSamples(tmp_path / size, MaskConfig(), seed=0, fit_how="crop")
        read.size = (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
        samples[size] = [read.at(i) for i in range(read.count)]
    assert len(samples["model"]) == len(samples["source"]) == 3
    assert sorted(s.image.shape[1] for s in read_samples(tmp_path / "source")) == [32, 64, 96]  # the sources' own sizes
    for (image, foreground, caption, background), (image2, foreground2, caption2, background2) in zip(
            samples["model"], samples["source"]):
        assert image2.shape == image.shape == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)
        assert (caption, background) == (caption2, background2)
        assert np.abs(image.astype(int) - image2).mean() < 6  # both through jpg, one through a resize back
        agree = (foreground == foreground2).mean()
        assert agree > 0.9, agree
