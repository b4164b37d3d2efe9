"""What a run will cost, from the model's architecture alone.

Each network is built from its config on the `meta` device (shapes, no weights, no
arithmetic) and run once under torch's FLOP counter at the run's real shapes; the run's
step counts, guidance and removal settings then say how often each runs per triple.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from maskmint.schemas.config import RunConfig
from maskmint.stages.families import FAMILIES
from maskmint.stages.loading import ModelLoadError, config_source, read_model_json
from maskmint.stages.models import check_supported, image_size, load_text_layout, vae_scale


def _count(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        run()
    return counter.get_total_flops()


def _model_index(source: str) -> dict:
    try:
        return read_model_json(source, "model_index.json")
    except Exception:  # noqa: BLE001 - no index: the family's usual classes
        return {}


@functools.lru_cache(maxsize=4)
def _meta_networks(source: str, inpaint_source: str | None, family_name: str):
    """The denoiser, the inpainting denoiser, the VAE and the text encoders, built from their
    configs on the meta device; the classes are the ones model_index.json names."""
    import diffusers
    import transformers

    family = FAMILIES[family_name]
    try:
        index = _model_index(source)
        name = family.denoiser_component
        denoiser_class = getattr(diffusers, index.get(name, [None, family.denoiser_class])[1])
        denoiser_config = denoiser_class.load_config(source, subfolder=name)
        vae_config = diffusers.AutoencoderKL.load_config(source, subfolder="vae")
        inpaint_config = denoiser_class.load_config(inpaint_source, subfolder=name) if inpaint_source else None
        encoders = []
        for name in sorted(k for k in index if k.startswith("text_encoder") and index[k][1]) or ["text_encoder"]:
            encoder_class = getattr(transformers, index.get(name, [None, "CLIPTextModel"])[1])
            encoders.append((name, encoder_class, encoder_class.config_class.from_pretrained(source, subfolder=name)))
    except Exception as error:  # noqa: BLE001 - any config that cannot be read is reported the same way
        raise ModelLoadError(f"model.path: cannot read the model's configs from '{source}': {error}".splitlines()[0]) from None
    with torch.device("meta"):
        denoiser = denoiser_class.from_config(denoiser_config)
        inpaint = denoiser_class.from_config(inpaint_config) if inpaint_config else denoiser
        texts = [(name, encoder_class(config)) for name, encoder_class, config in encoders]
        return denoiser, inpaint, diffusers.AutoencoderKL.from_config(vae_config), texts


def _denoiser_step(family, network, latent: tuple[int, int], text_tokens: int) -> int:
    """FLOPs of one denoiser call at batch 1, its inputs shaped as the family's architecture takes them."""
    args, kwargs = family.denoiser_call(network.config, latent, text_tokens)
    return _count(lambda: network(*args, **kwargs))


def flops_per_triple(config: RunConfig) -> dict[str, float]:
    """FLOPs of one image / mask / background triple, by part (attention capture, the masks
    and encoding are left out: they are a small share and not matrix work)."""
    source = config_source(config.model)
    family = check_supported(config.model, config.capture)
    inpaint_source = config.model.inpaint_path
    if inpaint_source is not None and Path(inpaint_source).is_file():
        inpaint_source = None  # a single-file inpainting UNet: counted with the base UNet's shape
    denoiser, inpaint, vae, texts = _meta_networks(source, inpaint_source, family.name)
    layout = load_text_layout(config.model)
    scale = vae_scale(vae.config)
    height, width = image_size(config.generation, denoiser.config, vae.config)
    latent = (height // scale, width // scale)
    meta = dict(device="meta")
    text_tokens = sum(segment.length for segment in layout.segments)

    def text_pass(network) -> int:
        length = getattr(network.config, "max_position_embeddings", None) or layout.segments[-1].length
        return _count(lambda: network(torch.zeros(1, length, dtype=torch.long, **meta)))

    text_passes = sum(text_pass(network) for _, network in texts)
    decode = _count(lambda: vae.decode(torch.zeros(1, vae.config.latent_channels, *latent, **meta)))
    encode = _count(lambda: vae.encode(torch.zeros(1, 3, height, width, **meta)))

    generation, removal, annotate = config.generation, config.removal, config.annotate
    # classifier-free guidance doubles the batch; a guidance-distilled family has none
    guided = family.takes_negative_prompt
    generation_batch = 2 if guided and generation.guidance_scale > 1 else 1
    annotate_batch = 2 if guided and annotate.guidance_scale > 1 else 1
    removal_batch = 2 if guided and removal.guidance_scale > 1 else 1
    removal_steps = min(int(removal.steps * removal.strength), removal.steps)
    annotate_steps_total = annotate.steps or family.annotate_steps
    annotated_steps = min(int(annotate_steps_total * (annotate.strength or family.annotate_strength)), annotate_steps_total)
    encodes = family.removal_encodes(inpaint.config, removal.prefill)
    step = _denoiser_step(family, denoiser, latent, text_tokens)
    real = annotated_share(config)  # the rest are generated
    parts = {
        "generate_denoiser": (1 - real) * generation_batch * generation.steps * step,
        "annotate_denoiser": real * annotate_batch * annotated_steps * step,
        "remove_denoiser": removal_batch * removal_steps * _denoiser_step(family, inpaint, latent, text_tokens),
        "text_encoder": ((1 - real) * generation_batch + real * annotate_batch + removal_batch) * text_passes,
        # generated: the image decoded; annotated: encoded by annotate and again by the
        # image-to-image pipeline; then removal's encodes and its decode
        "vae": (1 - real) * decode + real * 2 * encode + decode + encodes * encode,
    }
    if not real:
        del parts["annotate_denoiser"]
    if real == 1:
        del parts["generate_denoiser"]
    return {**parts, "total": sum(parts.values()), "height": height, "width": width}


def annotated_share(config: RunConfig) -> float:
    """The share of the run's samples that annotate an image rather than generate one."""
    if config.input.images is not None:
        return 1.0
    if config.prompts.file is None:
        return 0.0
    lines = images = 0
    with open(config.prompts.file, "rb") as handle:
        for raw in handle:
            if raw.strip():
                lines += 1
                images += b'"image"' in raw and json.loads(raw).get("image") is not None
    return images / lines


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
