"""The contract every family module keeps, checked on each registered family's tiny model.

A new family passes these by being registered (`stages/families`) with a tiny builder
(`pipeline/testing/tiny_models.py`); nothing here names a family.
"""

from __future__ import annotations

import pytest
import torch

from maskmint.pipeline.cost import _count
from maskmint.pipeline.testing.tiny_models import BUILDERS
from maskmint.schemas.config import CaptureConfig, GenerationConfig, ModelConfig, parse_config
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.capture.store import CaptureStore
from maskmint.stages.families import FAMILIES, family_of_pipeline, resolve_family
from maskmint.stages.generate import Generate
from maskmint.stages.tokens import token_slots
from maskmint.stages.loading import ModelLoadError
from maskmint.stages.models import check_before_loading, load_inpainting, pipeline_image_size
from tests.conftest import TEST_IMAGE_SIZE

ALL_RECIPES = sorted({recipe for family in FAMILIES.values() for recipe in family.recipes()})


def test_every_family_has_a_tiny_builder():
    assert sorted(BUILDERS) == sorted(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request, tmp_path_factory):
    pipe = BUILDERS[request.param](seed=3, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("contract") / request.param
    pipe.save_pretrained(folder)
    return FAMILIES[request.param], pipe, folder


def batch_for(pipe, layout):
    prompts = ["a photo of a dog in a park", "a red ball and a cup"]
    spans = [
        [ConceptSpan(name="dog", class_id=1, word="dog", char_span=(13, 16),
                     token_positions=layout.positions(prompts[0], (13, 16)))],
        [ConceptSpan(name="ball", class_id=2, word="ball", char_span=(6, 10),
                     token_positions=layout.positions(prompts[1], (6, 10))),
         ConceptSpan(name="cup", class_id=3, word="cup", char_span=(17, 20),
                     token_positions=layout.positions(prompts[1], (17, 20)))],
    ]
    return {"prompt": prompts, "negative_prompt": ["", ""], "seed": [5, 6], "concepts": spans}


def test_the_family_is_recognised_loaded_and_from_its_folder(tiny):
    family, pipe, folder = tiny
    assert family_of_pipeline(pipe) is family
    assert resolve_family(ModelConfig(path=str(folder))) is family  # model.family: auto
    loaded = family.load(ModelConfig(path=str(folder)), torch.device("cpu"), torch.float32)
    assert type(loaded).__name__ == family.text_to_image
    assert family.denoiser(loaded) is getattr(loaded, family.denoiser_component)


def test_the_text_layout_is_the_sequence_the_encoder_gives(tiny):
    family, pipe, _ = tiny
    layout = family.text_layout(pipe.components)
    states, pooled = family.encode_text(pipe, layout, ["a photo of a dog"])
    assert states.shape[1] == sum(segment.length for segment in layout.segments)
    assert pooled is None or pooled.shape[0] == 1
    kwargs = family.prompt_kwargs(layout, ["a dog"], ["blurry"])
    assert kwargs["prompt"] == ["a dog"] and ("negative_prompt" in kwargs) == family.takes_negative_prompt


def test_latents_reach_the_vae_and_come_back(tiny):
    family, pipe, _ = tiny
    batch = batch_for(pipe, family.text_layout(pipe.components))
    latents = pipe(**family.prompt_kwargs(family.text_layout(pipe.components), batch["prompt"][:1], [""]),
                   num_inference_steps=1, height=TEST_IMAGE_SIZE, width=TEST_IMAGE_SIZE, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    for_vae = family.latents_for_vae(pipe, latents, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    side = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    assert for_vae.shape == (1, pipe.vae.config.latent_channels, side, side)
    back = family.latents_from_vae(pipe, for_vae, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    torch.testing.assert_close(back, latents, rtol=1e-5, atol=1e-5)
    # and what the VAE encodes from a decoded image goes in the denoiser's layout
    with torch.no_grad():
        image = pipe.vae.decode(for_vae).sample
        encoded = pipe.vae.encode(image).latent_dist.mean
    assert family.latents_from_vae(pipe, encoded, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE).shape == latents.shape


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_every_offered_recipe_makes_maps_and_the_rest_are_refused(tiny, recipe):
    family, pipe, folder = tiny
    capture = CaptureConfig(recipe=recipe)
    if recipe not in family.recipes():
        with pytest.raises(ModelLoadError, match=f"capture.recipe: .*family {family.name}"):
            family.refuse(ModelConfig(path=str(folder)), capture)
        return
    family.refuse(ModelConfig(path=str(folder)), capture)
    generate = Generate(pipe, GenerationConfig(steps=2, guidance_scale=3.0), capture)
    assert isinstance(generate.store, CaptureStore)
    batch = batch_for(pipe, generate.layout)
    out = generate(batch)
    assert out["heatmap"].shape == (2, 2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert (out["heatmap"] >= 0).all() and out["heatmap"][0, 0].max() > 0
    assert (out["heatmap"][0, 1] == 0).all()  # the first sample has one concept: its second slot stays empty
    assert out["image"].shape == (2, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3) and all(out["finite"])
    generate.store.begin(batch["concepts"], token_slots(batch["concepts"])[0], (4, 4))
    generate.store.end()
    assert generate.store.held_bytes() >= 0


def test_the_cost_inputs_are_what_the_real_denoiser_takes(tiny):
    family, pipe, _ = tiny
    denoiser = family.denoiser(pipe)
    latent = (TEST_IMAGE_SIZE // pipe.vae_scale_factor,) * 2
    layout = family.text_layout(pipe.components)
    tokens = sum(segment.length for segment in layout.segments)
    args, kwargs = family.denoiser_call(denoiser.config, latent, tokens)

    def real(value):
        if isinstance(value, torch.Tensor):
            return torch.zeros(value.shape)
        return {k: real(v) for k, v in value.items()} if isinstance(value, dict) else value

    with torch.no_grad():
        out = denoiser(*[real(a) for a in args], **{k: real(v) for k, v in kwargs.items()}, return_dict=False)[0]
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    assert _count(lambda: denoiser(*[real(a) for a in args], **{k: real(v) for k, v in kwargs.items()})) > 0


def test_inpainting_shares_the_generator_and_says_how_it_encodes(tiny):
    family, pipe, folder = tiny
    inpaint = load_inpainting(pipe, ModelConfig(path=str(folder)))
    assert type(inpaint).__name__ == family.inpainting
    assert family.denoiser(inpaint) is family.denoiser(pipe) and inpaint.vae is pipe.vae
    config = family.denoiser(inpaint).config
    if family.reuses_generation_latents(config):
        assert family.removal_encodes(config, prefill=False) == 0
    assert family.removal_encodes(config, prefill=True) >= 1


def test_the_config_checks_accept_the_tiny_model_and_tile_its_size(tiny, config_dict):
    family, pipe, folder = tiny
    config = parse_config({**config_dict, "model": {"path": str(folder)}})
    assert check_before_loading(config) is family
    height, width = pipeline_image_size(pipe, config.generation)
    tile = pipe.vae_scale_factor * family.denoiser_levels(family.denoiser(pipe).config)
    assert height % tile == 0 and width % tile == 0


@pytest.mark.parametrize("prefill", [False, True])
def test_removal_encodes_as_often_as_the_family_says(tiny, config_dict, tmp_path, prefill):
    """What plan counts is what removal does: latent blending reuses generation's latents
    (no encode), every other path encodes as many images as `removal_encodes` says."""
    from collections import defaultdict

    from maskmint.pipeline.worker import ShardWorker, as_columns

    family, pipe, folder = tiny
    data = {**config_dict, "model": {"path": str(folder)}, "removal": {"steps": 2, "prefill": prefill},
            "generation": {"steps": 2, "batch_size": 1}, "mask": {"tau": 0.01, "min_area": 0.0}}
    worker = ShardWorker(parse_config(data), tmp_path, pipe=pipe)
    calls = []
    encode = pipe.vae.encode
    pipe.vae.encode = lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs)
    try:
        out = worker.model_stages(as_columns([worker.plan.sample(0)]), defaultdict(float))
    finally:
        del pipe.vae.encode
        worker.close()
    assert out["weak_mask"].any()  # removal ran
    assert len(calls) == family.removal_encodes(family.denoiser(worker.remove.pipe).config, prefill)
