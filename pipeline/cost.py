"""What a run will cost, from the model's architecture alone.

Each network is built from its config on the `meta` device (shapes, no weights, no
arithmetic) and run once under torch's FLOP counter at the run's real shapes; the run's
step counts, guidance and removal settings then say how often each runs per triple.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from maskmint.schemas.config import RunConfig
from maskmint.schemas.prompts import scan_prompts_file
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


def _config_networks(config: RunConfig):
    """The run's family and its meta-device networks (denoiser, inpainting denoiser, VAE, text encoders)."""
    family = check_supported(config.model, config.capture)
    inpaint_source = config.model.inpaint_path
    if inpaint_source is not None and Path(inpaint_source).is_file():
        inpaint_source = None  # a single-file inpainting UNet: counted with the base UNet's shape
    return family, *_meta_networks(config_source(config.model), inpaint_source, family.name)


def flops_per_triple(config: RunConfig) -> dict[str, float]:
    """FLOPs of one image / mask / background triple, by part (attention capture, the masks
    and encoding are left out: they are a small share and not matrix work)."""
    family, denoiser, inpaint, vae, texts = _config_networks(config)
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
    # with fresh noise annotate discards each prediction, so it never runs the unconditional batch
    annotate_batch = 2 if guided and annotate.guidance_scale > 1 and not annotate.fresh_noise else 1
    removal_batch = 2 if guided and removal.guidance_scale > 1 else 1
    removal_steps = min(int(removal.steps * removal.strength), removal.steps)
    annotate_steps_total = annotate.steps or family.annotate_steps
    annotated_steps = min(int(annotate_steps_total * (annotate.strength or family.annotate_strength)), annotate_steps_total)
    encodes = family.removal_encodes(inpaint.config, removal.prefill)
    step = _denoiser_step(family, denoiser, latent, text_tokens)
    real = annotated_share(config)  # the rest are generated
    text_for = (1 - real) * generation_batch + real * annotate_batch
    parts = {
        "generate_denoiser": (1 - real) * generation_batch * generation.steps * step,
        "annotate_denoiser": real * annotate_batch * annotated_steps * step,
        "text_encoder": text_for * text_passes,
        # generated: the image decoded; annotated: encoded by annotate (and again by the
        # image-to-image pipeline, where it does not take the latents)
        "vae": (1 - real) * decode + real * (1 if family.image_to_image_takes_latents(vae.config) else 2) * encode,
        # removal, which a sample dropped before it does not pay: its denoiser, its prompts,
        # its encodes and its decode
        "remove_denoiser": removal_batch * removal_steps * _denoiser_step(family, inpaint, latent, text_tokens),
        "remove_text_encoder": removal_batch * text_passes,
        "remove_vae": decode + encodes * encode,
    }
    if not real:
        del parts["annotate_denoiser"]
    if real == 1:
        del parts["generate_denoiser"]
    removal_part = sum(v for k, v in parts.items() if k.startswith("remove_"))
    return {**parts, "total": sum(parts.values()), "removal": removal_part, "height": height, "width": width}


def annotated_share(config: RunConfig) -> float:
    """The share of the run's samples that annotate an image rather than generate one."""
    if config.input.images is not None:
        return 1.0
    if config.prompts.file is None:
        return 0.0
    scan = scan_prompts_file(config.prompts.file)
    return scan.image_lines / max(scan.lines, 1)


def weight_memory(config: RunConfig) -> dict[str, dict[str, float]]:
    """GB of weights per component under each `model.quantize` choice ("none" for none), from the networks'
    parameters (built on the meta device): the run's dtype (fp16 for auto, as on a GPU); int8
    stores the quantized components' linear weights in one byte each plus a scale per output
    channel, as optimum-quanto does."""
    networks, width, quantized = _weighed_networks(config)
    # transformers keeps a model's `_keep_in_fp32_modules` in fp32 when it loads in fp16
    keeps_full = config.model.dtype in ("auto", "float16")
    return components_memory(networks, width, quantized, keeps_full)


def device_weight_memory(config: RunConfig) -> dict[str, dict[str, float]]:
    """GB of weights on the device at once under each `model.offload`, per `model.quantize` choice."""
    networks, width, quantized = _weighed_networks(config)
    return offloaded_memory(networks, weight_memory(config), width, quantized)


def _weighed_networks(config: RunConfig) -> tuple[dict, int, set[str]]:
    family, denoiser, inpaint, vae, texts = _config_networks(config)
    networks = {family.denoiser_component: denoiser, "vae": vae, **dict(texts)}
    if inpaint is not denoiser:
        networks["inpaint_" + family.denoiser_component] = inpaint
    return networks, 4 if config.model.dtype == "float32" else 2, set(family.quantized_components())


def offloaded_memory(networks: dict, memory: dict, width: int, quantized: set[str]) -> dict[str, dict[str, float]]:
    """none holds every network; model the largest one (the hooks move one network at a time and
    send the last one back first); sequential the largest layer's own weights (one at a time).
    Activations come on top of each."""
    layer = {"none": 0, "int8": 0}
    for name, network in networks.items():
        for module in network.modules():
            own = sum(p.numel() for p in module.parameters(recurse=False))
            layer["none"] = max(layer["none"], own * width)
            if name in quantized and isinstance(module, torch.nn.Linear):  # one byte a weight, a scale per row
                own = module.weight.numel() + (own - module.weight.numel() + module.out_features + 2) * width
            else:
                own *= width
            layer["int8"] = max(layer["int8"], own)
    return {choice: {"none": parts["total"], "model": max(v for k, v in parts.items() if k != "total"),
                     "sequential": _figure(layer[choice] / 1e9)} for choice, parts in memory.items()}


def components_memory(networks: dict, width: int, quantized: set[str], keeps_full: bool = True) -> dict[str, dict[str, float]]:
    """GB per network under "none" and "int8", `width` bytes per unquantized value."""
    choices: dict[str, dict[str, float]] = {"none": {}, "int8": {}}
    for name, network in networks.items():
        total = sum(p.numel() for p in network.parameters()) + sum(b.numel() for b in network.buffers())
        kept = getattr(network, "_keep_in_fp32_modules", None) or ()  # quanto leaves these as they are
        held = kept if keeps_full else ()
        linear = [m for path, m in network.named_modules()
                  if isinstance(m, torch.nn.Linear) and not any(part in kept for part in path.split("."))]
        weights = sum(m.weight.numel() for m in linear)
        scales = sum(m.out_features + 2 for m in linear)  # per output channel, and its input/output scales
        # modules a model keeps in full precision (T5's `wo`) stay fp32 whatever the dtype
        full = sum(p.numel() for path, p in network.named_parameters() if any(part in held for part in path.split(".")))
        rest = (total - full) * width + full * 4
        choices["none"][name] = rest / 1e9
        choices["int8"][name] = (rest - weights * width + weights + scales * width) / 1e9 if name in quantized \
            else rest / 1e9
    return {choice: {**{k: _figure(v) for k, v in parts.items()}, "total": _figure(sum(parts.values()))}
            for choice, parts in choices.items()}


def _figure(value: float) -> float:
    return float(f"{value:.6g}")


def drop_rates(root: Path | str) -> dict[str, float]:
    """Shares of a finished (or partial) run's planned samples, from its shard stats: dropped
    before removal (the weak mask decided), dropped after it, and with no weak region at all
    (never inpainted, early drops or not)."""
    from maskmint.pipeline.rundir import RunDir, RunDirError

    stats = RunDir(root).shard_stats()
    planned = sum(s.planned for s in stats)
    if not planned:
        raise RunDirError(f"{root}: no whole shard yet to take drop rates from")
    before = sum(len(s.decided_before_removal) for s in stats)
    dropped = sum(len(s.dropped) for s in stats)
    empty = sum(reason == "empty_weak_mask" for s in stats for reason in s.dropped.values())
    return {"before_removal": before / planned, "after_removal": (dropped - before) / planned,
            "no_weak_region": empty / planned, "from_samples": planned}


def estimate(config: RunConfig, peak_tflops: float | None, utilisation: float,
             drops: dict[str, float] | None = None) -> dict:
    """FLOPs of the run. `drops` (from `drop_rates`) makes it the cost of what is kept: removal is
    paid only by the samples that reach it, and the run's FLOPs are shared by its kept triples."""
    flops = flops_per_triple(config)
    removal_share = 1.0
    if drops is not None:
        removal_share = 1 - (drops["before_removal"] if config.execution.early_drops else drops["no_weak_region"])
    run_flops = (flops["total"] - (1 - removal_share) * flops["removal"]) * config.output.samples
    report = {
        "tflop_per_triple": _figure(flops["total"] / 1e12),
        "by_part_tflop": {k: _figure(v / 1e12) for k, v in flops.items()
                          if k not in ("total", "removal", "height", "width")},
        "size": [flops["height"], flops["width"]],
        "run_pflop": _figure(run_flops / 1e15),
        "peak_tflops": peak_tflops,
        "utilisation": utilisation,
        "weight_gb": weight_memory(config),
        "device_weight_gb": device_weight_memory(config),
    }
    if drops is not None:
        kept = 1 - drops["before_removal"] - drops["after_removal"]
        report["drop_rates"] = {k: _figure(v) for k, v in drops.items()}
        report["early_drops"] = config.execution.early_drops
        report["expected_kept"] = _figure(kept * config.output.samples)
        report["tflop_per_kept_triple"] = _figure(run_flops / max(kept * config.output.samples, 1e-9) / 1e12) \
            if kept > 0 else None
    if peak_tflops:
        seconds = run_flops / (peak_tflops * 1e12 * utilisation)
        report["device_seconds"] = _figure(seconds)
        report["device_hours"] = _figure(seconds / 3600)
    return report
