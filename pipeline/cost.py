"""What a run will cost, from the model's architecture alone.

Each network is built from its config on the `meta` device (shapes, no weights, no
arithmetic) and run once under torch's FLOP counter at the run's real shapes; the run's
step counts, guidance and removal settings then say how often each runs per triple.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from schemas.config import RunConfig
from stages.models import ModelLoadError, config_source


def _count(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=4)
def _meta_networks(source: str, inpaint_source: str | None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        unet_config = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae_config = AutoencoderKL.load_config(source, subfolder="vae")
        text_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")
        inpaint_config = UNet2DConditionModel.load_config(inpaint_source, subfolder="unet") if inpaint_source else None
    except Exception as error:  # noqa: BLE001 - any config that cannot be read is reported the same way
        raise ModelLoadError(f"model.path: cannot read the model's configs from '{source}': {error}".splitlines()[0]) from None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        inpaint = UNet2DConditionModel.from_config(inpaint_config) if inpaint_config else unet
        return unet, inpaint, AutoencoderKL.from_config(vae_config), CLIPTextModel(text_config)


def flops_per_triple(config: RunConfig) -> dict[str, float]:
    """FLOPs of one image / mask / background triple, by part (attention capture, the masks
    and encoding are left out: they are a small share and not matrix work)."""
    source = config_source(config.model)
    inpaint_source = config.model.inpaint_path
    if inpaint_source is not None and Path(inpaint_source).is_file():
        inpaint_source = None  # a single-file inpainting UNet: counted with the base UNet's shape
    unet, inpaint, vae, text = _meta_networks(source, inpaint_source)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    height = config.generation.height or unet.config.sample_size * scale
    width = config.generation.width or unet.config.sample_size * scale
    latent = (height // scale, width // scale)
    tokens = text.config.max_position_embeddings
    meta = dict(device="meta")
    states = torch.zeros(1, tokens, unet.config.cross_attention_dim, **meta)

    def unet_step(network) -> int:
        sample = torch.zeros(1, network.config.in_channels, *latent, **meta)
        return _count(lambda: network(sample, torch.zeros(1, **meta), encoder_hidden_states=states))

    text_pass = _count(lambda: text(torch.zeros(1, tokens, dtype=torch.long, **meta)))
    decode = _count(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, *latent, **meta)))
    encode = _count(lambda: vae.encode(torch.zeros(1, 3, height, width, **meta)))

    generation, removal = config.generation, config.removal
    generation_batch = 2 if generation.guidance_scale > 1 else 1  # diffusers' classifier-free guidance
    removal_batch = 2 if removal.guidance_scale > 1 else 1
    removal_steps = min(int(removal.steps * removal.strength), removal.steps)
    # Latent blending reuses generation's latents; otherwise (a prefill, a 9-channel UNet)
    # diffusers' inpainting encodes the image and the masked image.
    encodes = 0 if inpaint.config.in_channels == 4 and not removal.prefill else 2
    parts = {
        "generate_unet": generation_batch * generation.steps * unet_step(unet),
        "remove_unet": removal_batch * removal_steps * unet_step(inpaint),
        "text_encoder": (generation_batch + removal_batch) * text_pass,
        "vae": 2 * decode + encodes * encode,
    }
    return {**parts, "total": sum(parts.values()), "height": height, "width": width}


def _figure(value: float) -> float:
    return float(f"{value:.6g}")


def estimate(config: RunConfig, peak_tflops: float | None, utilisation: float) -> dict:
    flops = flops_per_triple(config)
    run_flops = flops["total"] * config.output.samples
    report = {
        "tflop_per_triple": _figure(flops["total"] / 1e12),
        "by_part_tflop": {k: _figure(v / 1e12) for k, v in flops.items() if k not in ("total", "height", "width")},
        "size": [flops["height"], flops["width"]],
        "run_pflop": _figure(run_flops / 1e15),
        "peak_tflops": peak_tflops,
        "utilisation": utilisation,
    }
    if peak_tflops:
        seconds = run_flops / (peak_tflops * 1e12 * utilisation)
        report["device_seconds"] = _figure(seconds)
        report["device_hours"] = _figure(seconds / 3600)
    return report
