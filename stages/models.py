"""Loading diffusion models from a folder, a single checkpoint file or a hub id."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from maskmint.schemas.config import CaptureConfig, GenerationConfig, ModelConfig, RunConfig
from maskmint.stages.families import Family, UnsupportedModel, family_of_pipeline, resolve_family
from maskmint.stages.tokens import TextLayout


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says which and why."""


def quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _is_single_file(location: str) -> bool:
    return Path(location).is_file()


FINGERPRINT_EDGE_BYTES = 1 << 16
SMALL_FILE_BYTES = 1 << 20


def _file_fingerprint(path: Path, digest) -> None:
    # Configs and tokenizer files whole; weights by size and their first and last 64 KiB
    # (the safetensors header, the last tensors): cheap on a network mount, and it changes
    # when the weights are replaced or retrained.
    size = path.stat().st_size
    digest.update(f"{size}:".encode())
    with open(path, "rb") as handle:
        if size <= SMALL_FILE_BYTES:
            digest.update(handle.read())
            return
        digest.update(handle.read(FINGERPRINT_EDGE_BYTES))
        handle.seek(size - FINGERPRINT_EDGE_BYTES)
        digest.update(handle.read())


def model_fingerprint(config: ModelConfig) -> str:
    """What the configured weights are, independent of where they sit (hub ids stand for themselves)."""
    digest = hashlib.sha256()
    for role in ("path", "inpaint_path", "single_file_config"):
        location = getattr(config, role)
        digest.update(f"|{role}=".encode())
        if location is None:
            continue
        path = Path(location)
        if path.is_file():
            _file_fingerprint(path, digest)
        elif path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
                digest.update(f"{file.relative_to(path).as_posix()}:".encode())
                _file_fingerprint(file, digest)
        else:
            digest.update(f"hub:{location}".encode())
    return digest.hexdigest()[:16]


def family_of(config: ModelConfig) -> Family:
    try:
        return resolve_family(config)
    except UnsupportedModel as error:
        raise ModelLoadError(str(error)) from None


def check_supported(model: ModelConfig, capture: CaptureConfig) -> Family:
    """The family, once the options it cannot honour are refused: before a run writes anything."""
    family = family_of(model)
    if family.denoiser != "unet" and model.inpaint_path is not None:
        raise ModelLoadError(
            f"model.inpaint_path: a dedicated inpainting checkpoint is not supported for family {family.name}; "
            "leave it out to remove objects with the base model"
        )
    if family.attention != "cross" and capture.self_attention:
        raise ModelLoadError(f"capture.self_attention: not available for family {family.name} (only sd, sdxl)")
    if family.attention == "cross" and capture.recipe == "concept_attention":
        raise ModelLoadError(f"capture.recipe: concept_attention needs an MM-DiT (sd3, flux), not family {family.name}")
    if family.attention == "cross" and capture.blocks is not None:
        raise ModelLoadError(f"capture.blocks: reads MM-DiT blocks (sd3, flux); family {family.name} has none")
    if capture.blocks is not None:
        try:
            blocks = read_model_json(config_source(model), f"{family.denoiser}/config.json").get("num_layers")
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"model.path: cannot read the {family.denoiser} config: {error}".splitlines()[0]) from None
        if blocks is not None:
            check_blocks(capture.blocks, blocks)
    return family


def vae_scale(vae_config) -> int:
    """Image pixels per latent pixel (diffusers' `vae_scale_factor`), from the VAE's config."""
    return 2 ** (len(vae_config.get("block_out_channels", [0])) - 1)


def image_size(generation: GenerationConfig, denoiser_config, vae_config) -> tuple[int, int]:
    """(height, width): the configured size, else the model's own, which is the denoiser's
    latent size where it declares one (UNets, SD3), else the VAE's image size (Flux). Takes
    config mappings: a loaded model's or its config files'."""
    latent = denoiser_config.get("sample_size")
    native = latent * vae_scale(vae_config) if latent else vae_config.get("sample_size")
    return generation.height or native, generation.width or native


def check_before_loading(config: RunConfig) -> Family:
    """Every choice the model's own config files can refute, refused before a run writes
    anything: what its family cannot honour, image sizes its VAE and denoiser cannot tile,
    and capture settings that would read no attention at all. Reads config JSONs only."""
    family = check_supported(config.model, config.capture)
    source = config_source(config.model)
    try:
        vae = read_model_json(source, "vae/config.json")
        denoiser = read_model_json(source, f"{family.denoiser}/config.json")
    except Exception as error:  # noqa: BLE001 - the loader says the same later; say it now
        raise ModelLoadError(f"model.path: cannot read the model's configs: {error}".splitlines()[0]) from None
    factor, levels = vae_scale(vae), denoiser_levels(family, denoiser)
    tile = factor * levels
    for side, size in zip(("height", "width"), image_size(config.generation, denoiser, vae)):
        if size and size % tile:
            raise ModelLoadError(
                f"generation.{side}: {size} is not a multiple of {tile} (the VAE's factor {factor} x the "
                f"{family.denoiser}'s {levels}); e.g. {max(tile, size // tile * tile)}"
            )
    if family.denoiser == "unet":
        check_unet_capture(config.capture, denoiser)
    elif config.capture.recipe == "cross" and levels in config.capture.skip_downscales:
        raise ModelLoadError(f"capture.skip_downscales: {levels} leaves out this model's only attention resolution")
    return family


def denoiser_levels(family: Family, denoiser: dict) -> int:
    """How many times the denoiser's token grid is smaller than the latent at its coarsest:
    a UNet's downsamplings, a transformer's patch (Flux packs 2 x 2 latents per token)."""
    if family.denoiser == "unet":
        return 2 ** (len(denoiser.get("down_block_types", [None])) - 1)
    return (denoiser.get("patch_size") or 1) * (2 if family.packed_latents else 1)


def check_unet_capture(capture: CaptureConfig, unet: dict) -> None:
    """The resolutions a UNet has attention at must include those the capture reads."""
    blocks = unet.get("down_block_types", [])
    with_attention = {2**i for i, kind in enumerate(blocks) if "CrossAttn" in kind}
    mid = 2 ** (len(blocks) - 1) if "CrossAttn" in (unet.get("mid_block_type") or "UNetMidBlock2DCrossAttn") else None
    cross = with_attention | ({mid} if capture.include_mid_block and mid else set())
    if not cross - set(capture.skip_downscales):
        raise ModelLoadError(
            f"capture.skip_downscales: {sorted(capture.skip_downscales)} leaves out every cross-attention resolution "
            f"of this UNet (it has {sorted(cross)}{'' if capture.include_mid_block else ', mid block off'})"
        )
    attended = with_attention | ({mid} if mid else set())  # self-attention sits beside every cross-attention
    if capture.self_attention and capture.self_attention_downscale not in attended:
        raise ModelLoadError(
            f"capture.self_attention_downscale: this UNet has self-attention at {sorted(attended)} times smaller "
            "than the latent, "
            f"not {capture.self_attention_downscale}"
        )


def check_blocks(wanted: list[int] | None, blocks: int) -> None:
    """capture.blocks must name double-stream blocks the model has (checked from its config
    before a run, and again on the loaded model a benchmark hands in)."""
    if wanted is not None and max(wanted) >= blocks:
        raise ModelLoadError(f"capture.blocks: the model has {blocks} double-stream blocks (0..{blocks - 1})")


def read_model_json(source: str, name: str) -> dict:
    """A JSON file of a model folder or hub id (from the hub cache when offline)."""
    path = Path(source) / name
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, name))
    return json.loads(path.read_text())


def load_text_to_image(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The family's text-to-image pipeline on `device`, progress bars off, nothing fetched
    that the family does not need (safety checker, watermarker)."""
    import diffusers

    family = family_of(config)
    pipeline_class = getattr(diffusers, family.text_to_image)
    quiet_libraries()
    try:
        if _is_single_file(config.path):
            pipe = pipeline_class.from_single_file(
                config.path, config=config.single_file_config, dtype=dtype,
                **family.load_kwargs, **family.single_file_kwargs,
            )
        else:
            pipe = pipeline_class.from_pretrained(config.path, dtype=dtype, **family.load_kwargs)
    except Exception as error:  # noqa: BLE001 - any loader failure is reported the same way
        raise ModelLoadError(f"model.path: cannot load '{config.path}': {error}".splitlines()[0]) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_inpainting(base, config: ModelConfig):
    """The family's inpainting pipeline sharing the base model's components (nothing loaded twice).

    With no dedicated checkpoint the base UNet inpaints by latent blending; with one, only
    its 9-channel UNet is loaded and the text encoders, VAE and tokenizers are the base's.
    """
    import diffusers
    from diffusers import UNet2DConditionModel

    family = family_of_pipeline(base)
    components = dict(base.components)
    if config.inpaint_path is not None:
        try:
            if _is_single_file(config.inpaint_path):
                unet = UNet2DConditionModel.from_single_file(config.inpaint_path, dtype=base.unet.dtype)
            else:
                unet = UNet2DConditionModel.from_pretrained(
                    config.inpaint_path, subfolder="unet", dtype=base.unet.dtype
                )
        except Exception as error:  # noqa: BLE001
            raise ModelLoadError(f"model.inpaint_path: cannot load '{config.inpaint_path}': {error}".splitlines()[0]) from error
        components["unet"] = unet.to(base.device)
    pipe = getattr(diffusers, family.inpainting)(**components, **family.inpainting_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def config_source(config: ModelConfig) -> str:
    """Where the configs and tokenizer are: the model folder or hub id, or for a single-file
    checkpoint its single_file_config."""
    source = config.single_file_config if _is_single_file(config.path) else config.path
    if source is None:
        raise ModelLoadError("model.single_file_config: needed to find the configs and tokenizer of a single-file checkpoint")
    return source


def load_text_layout(config: ModelConfig) -> TextLayout:
    """Where concept tokens sit, from the tokenizers alone: planning needs no network. The
    family is resolved first, so a pipeline maskmint does not run is refused before a run
    writes anything."""
    family = family_of(config)
    source = config_source(config)
    return family.text_layout({name: _tokenizer_at(source, name) for name, _ in family.text_tokenizers})


@functools.lru_cache(maxsize=8)
def _tokenizer_at(source: str, subfolder: str):
    # Cached: `plan`, the run's preflight and the in-process worker all ask for it.
    from transformers import AutoTokenizer

    quiet_libraries()
    try:
        return AutoTokenizer.from_pretrained(source, subfolder=subfolder)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(
            f"model.path: cannot load the tokenizer ({subfolder}) of '{source}': {error}".splitlines()[0]
        ) from error
