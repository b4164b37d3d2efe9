"""Attention capture against a plain, slow reference that stores every step's attention."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from maskmint.pipeline.testing.tiny_models import TinyShape, build_tiny_pipeline
from maskmint.schemas.config import CaptureConfig, GenerationConfig, load_config
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.generate import Generate, to_uint8
from maskmint.stages.tokens import token_slots
from tests.conftest import TEST_IMAGE_SIZE

STEPS = 4

class StoringProcessor(AttnProcessor):
    """Classic attention that keeps every call's full probabilities."""

    def __init__(self, layer: str, log: list):
        super().__init__()
        self.layer, self.log = layer, log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is not None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(query, key, None)  # [batch*heads, N, L]
            self.log.append((self.layer, probs.view(-1, attn.heads, *probs.shape[1:]).clone()))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

def reference_heatmaps(log, batch, spans, latent, steps_wanted, include_mid, skip):
    """Every step stored; then DAAM's aggregation done the slow way, one map at a time."""
    layers = list(dict.fromkeys(layer for layer, _ in log))
    calls_per_step = len(log) // STEPS
    per_layer_sums = {}
    for call, (layer, probs) in enumerate(log):
        step = call // calls_per_step
        cond = probs[-batch:]  # conditional half
        downscale = round(math.sqrt(latent * latent / cond.shape[2]))
        if step not in steps_wanted or downscale in skip or (layer.startswith("mid_block") and not include_mid):
            continue
        per_layer_sums[layer] = per_layer_sums.get(layer, 0) + cond
    maps = np.zeros((batch, 1, latent, latent))
    for b in range(batch):
        token_maps = []
        for position in spans[b][0].token_positions:
            head_maps = []
            for layer in layers:
                if layer not in per_layer_sums:
                    continue
                s = per_layer_sums[layer][b]  # [heads, N, L]
                side = int(math.isqrt(s.shape[1]))
                for head in range(s.shape[0]):
                    grid = s[head, :, position].reshape(1, 1, side, side)
                    up = F.interpolate(grid, size=(latent, latent), mode="bicubic", align_corners=False).clamp(min=0)
                    head_maps.append(up[0, 0])
            token_maps.append(torch.stack(head_maps).mean(0))
        maps[b, 0] = torch.stack(token_maps).mean(0).numpy()
    return maps

def _batch(pipe):
    prompts = ["a photo of a dog in a park", "a zebra in a kitchen"]
    tokenize = lambda text: pipe.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    zebra = tokenize("a zebra")
    spans = [
        [ConceptSpan(name="dog", class_id=1, word="dog", char_span=(13, 16), token_positions=[5])],
        [ConceptSpan(name="zebra", class_id=2, word="zebra", char_span=(2, 7), token_positions=list(range(2, 1 + len(zebra))))],
    ]
    assert len(spans[1][0].token_positions) > 1  # a multi-token word is part of the check
    return {"prompt": prompts, "negative_prompt": ["", ""], "seed": [11, 12], "concepts": spans}

def _generate_plain(pipe, batch, processor_factory):
    log = []
    pipe.unet.set_attn_processor(
        {name: processor_factory(name.removesuffix(".processor"), log) for name in pipe.unet.attn_processors}
    )
    generators = [torch.Generator().manual_seed(s) for s in batch["seed"]]
    with torch.inference_mode():
        latents = pipe(
            prompt=batch["prompt"], negative_prompt=batch["negative_prompt"], num_inference_steps=STEPS,
            guidance_scale=5.0, generator=generators, output_type="latent",
        ).images
    return latents, log

@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline(seed=3, image_size=TEST_IMAGE_SIZE, shape=TinyShape(unet_channels=(32, 64, 64)))
    p.set_progress_bar_config(disable=True)
    return p

@pytest.mark.parametrize(
    "capture",
    [CaptureConfig(), CaptureConfig(steps=[0, 2], include_mid_block=True, skip_downscales=[4])],
    ids=["daam-defaults", "some-steps-mid-block"],
)
def test_captured_maps_equal_slow_reference(pipe, capture):
    batch = _batch(pipe)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    _, log = _generate_plain(pipe, batch, lambda layer, log: StoringProcessor(layer, log))
    steps_wanted = set(range(STEPS)) if capture.steps is None else set(capture.steps)
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, steps_wanted, capture.include_mid_block, capture.skip_downscales)

    generate = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), capture)
    generate(batch)

    _, weights = token_slots(batch["concepts"])
    captured = generate.store.heatmaps(weights).numpy()
    assert captured.shape == expected.shape == (2, 1, latent, latent)
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)
    # the two prompts' maps differ: nothing is shared across the batch
    assert not np.allclose(captured[0], captured[1])

def test_capture_leaves_generation_unchanged(pipe):
    batch = _batch(pipe)
    plain, _ = _generate_plain(pipe, batch, lambda layer, log: AttnProcessor2_0())
    generate = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig())
    out = generate(batch)
    decoded = pipe.vae.decode(plain / pipe.vae.config.scaling_factor, return_dict=False)[0]

    np.testing.assert_array_equal(out["image"], to_uint8(decoded))
    assert out["heatmap"].shape == (2, 1, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    assert all(out["finite"])


@pytest.mark.parametrize("runtime", ["compile", "channels_last"])
def test_unet_runtime_options_capture_the_same(runtime, config_dict, write_config, tmp_path, monkeypatch):
    """compile traces capture into the graph and a second batch reuses it (no recompile);
    channels-last only changes the weights' layout. Neither changes the maps or the hash."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from maskmint.stages import generate as generate_module
    from maskmint.pipeline.worker import ShardWorker, as_columns

    monkeypatch.setattr(generate_module, "COMPILE_BACKEND", "eager")  # inductor's codegen is minutes on CPU
    config_dict["generation"]["batch_size"] = 2
    outputs, hashes = {}, set()
    for enabled in (False, True):
        config_dict["generation"][runtime] = enabled
        config = load_config(write_config(config_dict))
        hashes.add(config.config_hash())
        worker = ShardWorker(config, tmp_path / f"scratch-{enabled}")
        if runtime == "channels_last":
            weight = worker.generate.pipe.unet.conv_in.weight
            assert weight.is_contiguous(memory_format=torch.channels_last) == enabled
        torch._dynamo.reset()
        counters.clear()
        graphs = []
        for start in (0, 2):
            batch = as_columns([worker.plan.sample(i) for i in range(start, start + 2)])
            outputs[enabled, start] = worker.model_stages(batch, defaultdict(float))
            graphs.append(counters["stats"]["unique_graphs"])
        worker.close()
        if enabled and runtime == "compile":
            assert graphs[0] > 0 and graphs[1] == graphs[0], graphs  # compiled in the first batch only
    assert len(hashes) == 1  # how the UNet runs does not change what a run writes: resume may toggle it
    for start in (0, 2):
        plain, other = outputs[False, start], outputs[True, start]
        np.testing.assert_allclose(other["heatmap"], plain["heatmap"], rtol=1e-4, atol=1e-5)
        for field in ("image", "background"):
            assert np.abs(other[field].astype(int) - plain[field]).max() <= 1, field


class StoringSelfProcessor(StoringProcessor):
    """Also keeps every self-attention call's full probabilities."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is None:
            query = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(hidden_states))
            probs = attn.get_attention_scores(query, key, None)  # [batch*heads, N, N]
            self.log.append((self.layer + ":self", probs.view(-1, attn.heads, *probs.shape[1:]).clone()))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_self_attention_refinement_equals_slow_reference(pipe):
    """A^k map with A the head-mean self-attention at one resolution, summed over every step
    and layer, the slow way: every call's probabilities stored, then averaged and applied."""
    capture = CaptureConfig(self_attention=True, self_attention_downscale=2, self_attention_power=3)
    batch = _batch(pipe)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    _, log = _generate_plain(pipe, batch, lambda layer, log: StoringSelfProcessor(layer, log))
    cross_log = [(layer, probs) for layer, probs in log if not layer.endswith(":self")]
    cross = reference_heatmaps(cross_log, 2, batch["concepts"], latent, set(range(STEPS)), False, [8])
    side = latent // 2
    terms = [p[-2:].mean(dim=1) for layer, p in log if layer.endswith(":self") and p.shape[-1] == side * side]
    assert len(terms) >= STEPS
    affinity = (torch.stack(terms).sum(0) / len(terms)).double()  # [B, N, N]
    expected = np.zeros_like(cross)
    for b in range(2):
        small = F.interpolate(torch.from_numpy(cross[b : b + 1]), size=(side, side), mode="area").reshape(-1)
        for _ in range(3):
            small = affinity[b] @ small
        up = F.interpolate(small.reshape(1, 1, side, side), size=(latent, latent), mode="bicubic", align_corners=False)
        expected[b] = up.clamp(min=0)[0].numpy()

    generate = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), capture)
    out = generate(batch)
    _, weights = token_slots(batch["concepts"])
    captured = generate.store.heatmaps(weights).numpy()
    np.testing.assert_allclose(captured, expected, rtol=5e-3, atol=1e-6)
    assert not np.allclose(captured, cross)  # the refinement did something

    # the image is the one plain SDPA draws, and the store does not grow with steps
    plain, _ = _generate_plain(pipe, batch, lambda layer, log: AttnProcessor2_0())
    decoded = pipe.vae.decode(plain / pipe.vae.config.scaling_factor, return_dict=False)[0]
    np.testing.assert_array_equal(out["image"], to_uint8(decoded))
    sizes = []
    for steps in (2, 6):
        longer = Generate(pipe, GenerationConfig(steps=steps, guidance_scale=5.0), capture)
        longer(batch)
        sizes.append(longer.store.affinity.numel() + sum(t.numel() for t in longer.store.sums.values()))
    assert sizes[0] == sizes[1] == 2 * side**4 + sum(t.numel() for t in generate.store.sums.values())
