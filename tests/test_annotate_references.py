"""Capture on a real image against slow references written here, for the UNet and the MM-DiTs:
each denoiser call's inputs are recorded during annotate and replayed, one noise level at a
time, with processors that keep every softmax; and the levels annotate stacks into its calls
against those diffusers' own image-to-image loop reads when each step is noised afresh."""

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
from tests import test_capture
from tests.test_capture import STEPS, StoringProcessor, reference_heatmaps
from tests.test_capture import _batch as unet_batch
from tests.test_dit import DIT_FAMILIES, _batch, _storing


def levels_of(rows: list[torch.Tensor], batch: int) -> list[list[torch.Tensor]]:
    """Each recorded call's tensors [levels x batch, ...] cut into one group per noise level."""
    return [list(level) for level in zip(*(row.split(batch) for row in rows))]


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def dit(request):
    pipe = BUILDERS[request.param](seed=1, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_capture_on_a_real_image_equals_a_slow_reference_and_every_step_reads_the_image(tmp_path):
    """Each denoiser call's input is recorded; the UNet is run again on those inputs with a
    processor that keeps every softmax, one noise level at a time, and DAAM's aggregation is
    done the slow way. Every level starts from the clean latent (encoded here, by hand) noised
    afresh: its residual over the clean latent's share is a standard normal draw. All four levels
    in one call read what one level a call reads."""
    pipe = build_tiny_pipeline(seed=3, image_size=TEST_IMAGE_SIZE, shape=TinyShape(unet_channels=(32, 64, 64)))
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for i in range(2):
        save(tmp_path / f"{i}.png", scene(i, TEST_IMAGE_SIZE))
        paths.append(str(tmp_path / f"{i}.png"))
    batch = {**unet_batch(pipe), "image_path": paths}
    generate = Generate(pipe, GenerationConfig(steps=STEPS), CaptureConfig())
    annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                        AnnotateConfig(steps=STEPS, strength=1.0, guidance_scale=1.0, steps_per_call=STEPS), CaptureConfig())
    one_a_call = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                          AnnotateConfig(steps=STEPS, strength=1.0, guidance_scale=1.0, steps_per_call=1), CaptureConfig())
    one_a_call(batch)
    single = one_a_call.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()
    annotate(batch)  # the first batch also reads the pipeline's schedule
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
    assert len(calls) == 1 and len(calls[0][0]) == STEPS * 2  # every level in one call of the stacked batch
    assert encodes == [2]  # the batch is VAE-encoded once
    captured = annotate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()
    np.testing.assert_allclose(single, captured, rtol=1e-4, atol=1e-6)

    levels = [level for call in calls for level in levels_of(list(call), 2)]
    assert len(levels) == STEPS
    log = []
    pipe.unet.set_attn_processor({n: StoringProcessor(n.removesuffix(".processor"), log) for n in pipe.unet.attn_processors})
    with torch.no_grad():
        for sample, timestep, states in levels:
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
    for sample, timestep, _ in levels:
        assert len(set(timestep.tolist())) == 1  # a level's rows share their noise level
        share = alphas[int(timestep[0])]
        residual = (sample - share.sqrt() * clean) / (1 - share).sqrt()
        assert abs(float(residual.mean())) < 0.25 and 0.75 < float(residual.std()) < 1.25, float(residual.std())


def test_mmdit_capture_on_a_real_image_equals_a_slow_reference_and_every_step_reads_the_image(dit, tmp_path, monkeypatch):
    """Annotate on the MM-DiTs: every transformer call's inputs are recorded, the transformer
    is run again on them with processors that keep each joint softmax, and the maps are
    aggregated the slow way, one noise level at a time. Only the levels `capture.steps` names
    are run; each starts from the clean latent noised afresh along the flow: its residual over
    the clean latent's share is a standard normal draw."""
    name, pipe = dit
    batch, layout = _batch(pipe)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        image = np.full((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), 100, np.uint8)
        image[8:20, 10 + i : 24 + i] = rng.integers(0, 255, 3)
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    capture = CaptureConfig(steps=[0, 2])  # the step gate counts annotate's levels too
    generate = Generate(pipe, GenerationConfig(steps=STEPS), capture)
    annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                        AnnotateConfig(steps=STEPS, strength=1.0, guidance_scale=1.0), capture)
    annotate({**batch, "image_path": paths})  # the first batch also reads the pipeline's schedule
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
    assert len(calls) == 1 and len(calls[0]["hidden_states"]) == 2 * 2  # levels 0 and 2 of the batch, in one call
    assert encodes == [2]  # the batch is VAE-encoded once
    captured = annotate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()
    stacked = [k for k, v in calls[0].items() if isinstance(v, torch.Tensor) and v.ndim and len(v) == 4]
    levels = [{**calls[0], **dict(zip(stacked, level))} for level in levels_of([calls[0][k] for k in stacked], 2)]
    schedule = annotate.schedule(None, None)[2]
    scale = 1.0 if name == "sd3" else 1000.0
    assert [float(level["timestep"][0]) * scale for level in levels] == pytest.approx([float(schedule[0]), float(schedule[2])])

    log = []
    transformer = pipe.transformer
    saved = dict(transformer.attn_processors)
    transformer.set_attn_processor({n: _storing(name)(n.removesuffix(".processor"), log) for n in saved})
    try:
        with torch.no_grad():
            for kwargs in levels:
                transformer(**kwargs)
    finally:
        transformer.set_attn_processor(saved)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    monkeypatch.setattr(test_capture, "STEPS", len(levels))  # the slow aggregation over the two levels run
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, {0, 1}, False, [8])
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)

    clean = out["latents"]  # in the transformer's own layout (packed for Flux)
    for kwargs in levels:
        sigma = float(kwargs["timestep"].flatten()[0]) / (1000.0 if name == "sd3" else 1.0)
        residual = (kwargs["hidden_states"] - (1 - sigma) * clean) / sigma
        assert abs(float(residual.mean())) < 0.25 and 0.75 < float(residual.std()) < 1.25, (sigma, float(residual.std()))


DENOISER_INPUTS = {  # name of a recorded input -> where the denoiser's forward takes it (position, keyword)
    "latents": (0, ("sample", "hidden_states")), "timestep": (1, ("timestep",)),
    "states": (2, ("encoder_hidden_states",)), "pooled": (None, ("pooled_projections",)), "guidance": (None, ("guidance",)),
}


def record_denoiser_inputs(denoiser, calls: list):
    """A hook keeping each call's inputs by name, every one with a row per latent (a single
    timestep or guidance value repeated), and SDXL's added conditions as pooled and time_ids."""
    def hook(module, args, kwargs):
        rows = len(args[0] if args else kwargs.get("sample", kwargs.get("hidden_states")))
        call = {}
        for name, (position, keywords) in DENOISER_INPUTS.items():
            value = args[position] if position is not None and len(args) > position else next(
                (kwargs[k] for k in keywords if kwargs.get(k) is not None), None)
            if isinstance(value, torch.Tensor):
                call[name] = value.reshape(-1).expand(rows).clone() if value.ndim < 2 and value.numel() in (1, rows) and name in ("timestep", "guidance") else value.clone()
        added = kwargs.get("added_cond_kwargs") or {}
        if "text_embeds" in added:
            call["pooled"], call["time_ids"] = added["text_embeds"].clone(), added["time_ids"].clone()
        calls.append(call)
    return denoiser.register_forward_pre_hook(hook, with_kwargs=True)


LOOP_CASES = ["sd", "sdxl-euler", "sd3", "flux", "flux-dev"]


@pytest.mark.parametrize("case", LOOP_CASES)
def test_stacked_levels_are_what_diffusers_own_loop_reads_with_each_step_noised_afresh(case, tmp_path):
    """The reference is diffusers' image-to-image pipeline run step by step, a callback written
    here noising the clean latent afresh (the scheduler's own add_noise or scale_noise at its
    next step) from each sample's generator; SDXL runs an Euler scheduler, whose model input is
    scaled by its sigma. Annotate's stacked calls, cut into levels, must give the denoiser the
    same latents, timesteps, text, pooled text, size ids and distilled guidance."""
    from diffusers import EulerDiscreteScheduler

    name = case.split("-")[0]
    extra = {"guidance_embeds": True} if case == "flux-dev" else {}
    pipe = BUILDERS[name](seed=1, image_size=TEST_IMAGE_SIZE, **extra)
    pipe.set_progress_bar_config(disable=True)
    if case == "sdxl-euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    batch = unet_batch(pipe) if name in ("sd", "sdxl") else _batch(pipe)[0]
    paths = []
    for i in range(2):
        save(tmp_path / f"{i}.png", scene(i, TEST_IMAGE_SIZE))
        paths.append(str(tmp_path / f"{i}.png"))
    batch = {**batch, "image_path": paths}
    steps, strength, guidance = 6, 0.7, 2.5
    generate = Generate(pipe, GenerationConfig(steps=STEPS), CaptureConfig())
    annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                        AnnotateConfig(steps=steps, strength=strength, guidance_scale=guidance, steps_per_call=3),
                        CaptureConfig())
    denoiser = generate.family.denoiser(pipe)
    annotate(batch)  # reads the schedule
    stacked = []
    hook = record_denoiser_inputs(denoiser, stacked)
    try:
        out = annotate(batch)
    finally:
        hook.remove()
    read = [{k: v[i * 2 : (i + 1) * 2] for k, v in call.items()} for call in stacked for i in range(len(call["latents"]) // 2)]

    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        encoded = pipe.vae.encode(pixels).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    clean = (encoded - shift) * pipe.vae.config.scaling_factor  # [B, C, h, w]
    generators = [torch.Generator().manual_seed(int(s)) for s in batch["seed"]]
    flow = name in ("sd3", "flux")

    def noise_afresh(p, step, timestep, kwargs):
        schedule = p.scheduler.timesteps
        at = int((schedule == timestep).nonzero()[0, 0])
        if at + 1 < len(schedule):
            noise = torch.stack([torch.randn(clean.shape[1:], generator=g) for g in generators])
            level = schedule[at + 1 : at + 2]
            noised = p.scheduler.scale_noise(clean, level, noise) if flow else p.scheduler.add_noise(clean, noise, level)
            kwargs["latents"] = p._pack_latents(noised, *noised.shape) if name == "flux" else noised
        return kwargs

    loop = []
    hook = record_denoiser_inputs(denoiser, loop)
    try:
        with torch.no_grad():
            annotate.image_to_image(
                prompt=list(batch["prompt"]), image=clean, strength=strength, num_inference_steps=steps,
                guidance_scale=guidance if case == "flux-dev" else 1.0, height=TEST_IMAGE_SIZE, width=TEST_IMAGE_SIZE,
                generator=generators, output_type="latent", callback_on_step_end=noise_afresh,
                **({"max_sequence_length": generate.layout.segments[-1].length} if flow else {}))
    finally:
        hook.remove()

    assert len(loop) == len(read) >= int(steps * strength)  # SD3's pipeline rounds its start down: one more
    assert [len(call["latents"]) // 2 for call in stacked] == [3, len(read) - 3]  # at most three levels a call
    for level, reference in zip(read, loop):
        assert set(level) == set(reference)
        for key in reference:
            torch.testing.assert_close(level[key].float(), reference[key].float(), rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(out["latents"].flatten(1), (clean if name != "flux" else pipe._pack_latents(clean, *clean.shape)).flatten(1))


@pytest.mark.parametrize("variant", ["reference", "projected"])
def test_concept_attention_reads_the_same_whatever_levels_share_a_call(dit, variant, tmp_path):
    """ConceptAttention carries its concept tokens beside each stacked level with that level's
    own time embedding, and folds the levels into the batch: three levels a call, or the
    remainder alone, give the maps of one level a call."""
    name, pipe = dit
    batch, _ = _batch(pipe)
    paths = []
    for i in range(2):
        save(tmp_path / f"{i}.png", scene(i, TEST_IMAGE_SIZE))
        paths.append(str(tmp_path / f"{i}.png"))
    capture = CaptureConfig(recipe="concept_attention", concept_variant=variant)
    maps = []
    for per_call in (1, 3):
        generate = Generate(pipe, GenerationConfig(steps=STEPS), capture)
        annotate = Annotate(pipe, generate.family, generate.layout, generate.store, (TEST_IMAGE_SIZE,) * 2,
                            AnnotateConfig(steps=5, strength=1.0, steps_per_call=per_call), capture)
        maps.append(annotate({**batch, "image_path": paths})["heatmap"])
    assert maps[0].max() > 0
    np.testing.assert_allclose(maps[1], maps[0], rtol=1e-4, atol=1e-5)
