"""Model families: the same command, shard format and checks on SD and SDXL tiny models (SD3, Flux: test_dit)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from maskmint import launch
from bench.chaos import audit
from maskmint.pipeline.testing.tiny_models import build_tiny_sdxl_pipeline
from maskmint.schemas.config import CaptureConfig, GenerationConfig, ModelConfig
from maskmint.stages.families import FLUX, SD, SD3, SDXL, UnsupportedModel, resolve_family
from maskmint.stages.generate import Generate, to_uint8
from maskmint.stages.tokens import token_slots
from tests.conftest import TEST_IMAGE_SIZE
from tests.test_capture import STEPS, StoringProcessor, _batch, _generate_plain, reference_heatmaps


@pytest.fixture(scope="module")
def sdxl_pipe():
    pipe = build_tiny_sdxl_pipeline(seed=1, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_dir(sdxl_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    sdxl_pipe.save_pretrained(folder)
    return folder


def test_family_auto_reads_the_checkpoint(tiny_model_dir, sdxl_dir, tmp_path):
    assert resolve_family(ModelConfig(path=str(tiny_model_dir))) is SD
    assert resolve_family(ModelConfig(path=str(sdxl_dir))) is SDXL
    assert resolve_family(ModelConfig(path=str(sdxl_dir), family="sd")) is SD  # explicit wins
    for class_name, family in (("StableDiffusion3Pipeline", SD3), ("FluxPipeline", FLUX)):
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert resolve_family(ModelConfig(path=str(folder))) is family
    pixart = tmp_path / "pixart"
    pixart.mkdir()
    (pixart / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(UnsupportedModel, match="PixArtAlphaPipeline \\(family pixart\\) is not a pipeline maskmint runs"):
        resolve_family(ModelConfig(path=str(pixart)))

    from safetensors.torch import save_file

    original = tmp_path / "sdxl-original.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, original)
    assert resolve_family(ModelConfig(path=str(original))) is SDXL
    sd_original = tmp_path / "sd-original.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}, sd_original)
    assert resolve_family(ModelConfig(path=str(sd_original))) is SD


def test_an_unsupported_pipeline_is_one_line_exit_2(config_dict, write_config, tmp_path, capsys):
    other = tmp_path / "pixart"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    config_dict["model"]["path"] = str(other)
    for command in (["plan", "--config", str(write_config(config_dict))],
                    ["run", "--config", str(write_config(config_dict)), "--out", str(tmp_path / "run"), "--quiet"]):
        capsys.readouterr()
        assert launch.main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "PixArtAlphaPipeline (family pixart)" in err[0] and "model.family" in err[0]
    assert not (tmp_path / "run").exists()


def test_sdxl_runs_end_to_end(sdxl_dir, config_dict, write_config, tmp_path):
    import webdataset as wds

    data = copy.deepcopy(config_dict)
    data["model"]["path"] = str(sdxl_dir)
    data["mask"] = {"tau": 0.2, "min_area": 0.0}
    data["output"] = {"samples": 6, "shard_size": 3}
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(out), "--quiet"]) == 0
    assert audit(out) == []
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("rgb8"))
    assert samples
    for sample in samples:
        class_id = sample["json"]["concepts"][0]["class_id"]
        assert set(np.unique(sample["mask.png"][..., 0])) <= {0, class_id, 255}
        assert sample["jpg"].shape == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)
        heat = sample["heatmap.png"][..., 0]
        assert heat.max() > heat.min()  # not flat
    worker = json.loads((out / "shards" / "000000.json").read_text())["worker"]
    assert worker["device"] == "cpu"


def test_sdxl_capture_equals_slow_reference_and_leaves_images_alone(sdxl_pipe):
    batch = _batch(sdxl_pipe)
    latent = TEST_IMAGE_SIZE // sdxl_pipe.vae_scale_factor
    _, log = _generate_plain(sdxl_pipe, batch, lambda layer, log: StoringProcessor(layer, log))
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, set(range(STEPS)), False, [8])
    generate = Generate(sdxl_pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig())
    out = generate(batch)
    _, weights = token_slots(batch["concepts"])
    captured = generate.store.heatmaps(weights).numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)

    plain, _ = _generate_plain(sdxl_pipe, batch, lambda layer, log: AttnProcessor2_0())
    decoded = sdxl_pipe.vae.decode(plain / sdxl_pipe.vae.config.scaling_factor, return_dict=False)[0]
    np.testing.assert_array_equal(out["image"], to_uint8(decoded))


def test_per_resolution_weighting_equals_slow_reference(sdxl_pipe):
    """Each resolution's maps averaged on their own, then the resolutions averaged."""
    batch = _batch(sdxl_pipe)
    latent = TEST_IMAGE_SIZE // sdxl_pipe.vae_scale_factor
    _, log = _generate_plain(sdxl_pipe, batch, lambda layer, log: StoringProcessor(layer, log))
    by_resolution: dict[int, list] = {}
    for layer, probs in log:
        tokens = probs.shape[2]
        if round(math.sqrt(latent * latent / tokens)) == 8 or layer.startswith("mid_block"):
            continue
        by_resolution.setdefault(tokens, []).append((layer, probs))
    assert len(by_resolution) == 2  # the tiny SDXL has two attention resolutions
    means = [reference_heatmaps(entries, 2, batch["concepts"], latent, set(range(STEPS)), False, [8])
             for entries in by_resolution.values()]
    expected = np.mean(means, axis=0)

    generate = Generate(sdxl_pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig(weighting="per_resolution"))
    generate(batch)
    _, weights = token_slots(batch["concepts"])
    captured = generate.store.heatmaps(weights).numpy()
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)
    per_map = Generate(sdxl_pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig())
    per_map(batch)
    assert not np.allclose(per_map.store.heatmaps(weights).numpy(), captured)  # the weighting matters


def test_tiny_model_command_writes_each_family(tmp_path):
    from maskmint.pipeline.testing.tiny_models import main

    for family, class_name in (("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline"),
                               ("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")):
        assert main(["--family", family, "--out", str(tmp_path / family)]) == 0
        assert json.loads((tmp_path / family / "model_index.json").read_text())["_class_name"] == class_name


def test_sdxl_fp16_vae_decodes_in_fp32():
    from diffusers import AutoencoderKL

    from maskmint.stages.generate import decode

    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, force_upcast=True).to(torch.float16)
    latents = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    out = decode(vae, latents)
    assert out.dtype == torch.float32 and vae.dtype == torch.float16
    assert F is not None


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_shipped_tiny_family_configs_run(tmp_path, family):
    """configs/tiny-<family>.yaml as the README has it: the tiny model made, then the run."""
    import shutil

    from pathlib import Path

    from maskmint.pipeline.testing.tiny_models import main

    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "configs", tmp_path / "configs")
    assert main(["--family", family, "--out", str(tmp_path / "models" / f"tiny-{family}")]) == 0
    out = tmp_path / "runs" / f"tiny-{family}"
    assert launch.main(["run", "--config", str(tmp_path / "configs" / f"tiny-{family}.yaml"), "--out", str(out),
                        "--executor", "local", "--quiet"]) == 0
    assert audit(out) == []


def test_the_base_unet_blends_latents_so_removal_encodes_nothing(sdxl_pipe):
    """With a 4-channel UNet removal starts from generation's latents: plan counts no encode
    (and the family contract test holds the run to what plan counts)."""
    from maskmint.pipeline.testing.tiny_models import build_tiny_pipeline

    for family, pipe in ((SD, build_tiny_pipeline(seed=0, image_size=32)), (SDXL, sdxl_pipe)):
        assert family.reuses_generation_latents(pipe.unet.config)
        assert family.removal_encodes(pipe.unet.config, prefill=False) == 0
        assert family.removal_encodes(pipe.unet.config, prefill=True) == 2
        nine = {**pipe.unet.config, "in_channels": 9}  # a dedicated inpainting UNet takes the masked image too
        assert not family.reuses_generation_latents(nine) and family.removal_encodes(nine, prefill=False) == 2
