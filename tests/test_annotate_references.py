"""Capture on a real image against slow references written here, for the UNet and the MM-DiTs:
each denoiser call's inputs are recorded during annotate and replayed with processors that
keep every softmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskmint.pipeline.testing.tiny_models import BUILDERS, TinyShape, build_tiny_pipeline
from maskmint.schemas.config import AnnotateConfig, CaptureConfig, GenerationConfig
from maskmint.stages.annotate import Annotate
from maskmint.stages.generate import Generate
from maskmint.stages.tokens import token_slots
from tests.conftest import TEST_IMAGE_SIZE
from tests.test_annotate import save, scene
from tests.test_capture import STEPS, StoringProcessor, reference_heatmaps
from tests.test_capture import _batch as unet_batch
from tests.test_dit import DIT_FAMILIES, _batch, _storing


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def dit(request):
    pipe = BUILDERS[request.param](seed=1, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_capture_on_a_real_image_equals_a_slow_reference_and_every_step_reads_the_image(tmp_path):
    """Each denoiser call's input is recorded; the UNet is run again on those inputs with a
    processor that keeps every softmax, and DAAM's aggregation is done the slow way. Every
    call after the first starts from the clean latent (encoded here, by hand) noised afresh:
    its residual over the clean latent's share is a standard normal draw."""
    pipe = build_tiny_pipeline(seed=3, image_size=TEST_IMAGE_SIZE, shape=TinyShape(unet_channels=(32, 64, 64)))
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for i in range(2):
        save(tmp_path / f"{i}.png", scene(i, TEST_IMAGE_SIZE))
        paths.append(str(tmp_path / f"{i}.png"))
    batch = {**unet_batch(pipe), "image_path": paths}
    generate = Generate(pipe, GenerationConfig(steps=STEPS), CaptureConfig())
    annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                        AnnotateConfig(steps=STEPS, strength=1.0, guidance_scale=1.0), CaptureConfig())
    calls = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone())),
        with_kwargs=True)
    encodes = []
    counter = pipe.vae.encoder.register_forward_hook(lambda module, args, output: encodes.append(len(args[0])))
    try:
        out = annotate(batch)
    finally:
        hook.remove()
        counter.remove()
    assert len(calls) == STEPS
    assert encodes == [2]  # the batch is VAE-encoded once: the image-to-image pipeline takes its latents
    captured = annotate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()

    log = []
    pipe.unet.set_attn_processor({n: StoringProcessor(n.removesuffix(".processor"), log) for n in pipe.unet.attn_processors})
    with torch.no_grad():
        for sample, timestep, states in calls:
            pipe.unet(sample, timestep, encoder_hidden_states=states)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, set(range(STEPS)), False, [8])
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=1e-4, atol=1e-6)

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_array_equal(out["image"], images)  # the stored image is the input (same size here)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        clean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    torch.testing.assert_close(out["latents"], clean)
    alphas = pipe.scheduler.alphas_cumprod
    for sample, timestep, _ in calls[1:]:
        share = alphas[int(timestep)]
        residual = (sample - share.sqrt() * clean) / (1 - share).sqrt()
        assert abs(float(residual.mean())) < 0.25 and 0.75 < float(residual.std()) < 1.25, float(residual.std())


def test_mmdit_capture_on_a_real_image_equals_a_slow_reference_and_every_step_reads_the_image(dit, tmp_path):
    """Annotate on the MM-DiTs: every transformer call's inputs are recorded, the transformer
    is run again on them with processors that keep each joint softmax, and the maps are
    aggregated the slow way. Every call after the first starts from the clean latent noised
    afresh along the flow: its residual over the clean latent's share is a standard normal draw."""
    name, pipe = dit
    batch, layout = _batch(pipe)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        image = np.full((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), 100, np.uint8)
        image[8:20, 10 + i : 24 + i] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    capture = CaptureConfig(steps=[0, 2])  # the step gate counts annotate's steps too
    generate = Generate(pipe, GenerationConfig(steps=STEPS), capture)
    annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                        AnnotateConfig(steps=STEPS, strength=1.0, guidance_scale=1.0), capture)
    calls = []

    def record(module, args, kwargs):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    encodes = []
    counter = pipe.vae.encoder.register_forward_hook(lambda module, args, output: encodes.append(len(args[0])))
    try:
        out = annotate({**batch, "image_path": paths})
    finally:
        hook.remove()
        counter.remove()
    assert len(calls) == STEPS
    assert encodes == [2]  # the batch is VAE-encoded once: the image-to-image pipeline takes its latents
    captured = annotate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()

    log = []
    transformer = pipe.transformer
    saved = dict(transformer.attn_processors)
    transformer.set_attn_processor({n: _storing(name)(n.removesuffix(".processor"), log) for n in saved})
    try:
        with torch.no_grad():
            for kwargs in calls:
                transformer(**kwargs)
    finally:
        transformer.set_attn_processor(saved)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, {0, 2}, False, [8])
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)

    clean = out["latents"]  # in the transformer's own layout (packed for Flux)
    for kwargs in calls[1:]:
        sigma = float(kwargs["timestep"].flatten()[0]) / (1000.0 if name == "sd3" else 1.0)
        residual = (kwargs["hidden_states"] - (1 - sigma) * clean) / sigma
        assert abs(float(residual.mean())) < 0.25 and 0.75 < float(residual.std()) < 1.25, (sigma, float(residual.std()))
