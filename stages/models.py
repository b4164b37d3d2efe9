"""The configured model: its family, the checks its config files allow before any weights
load, and loading it (what differs per family is the family's)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from maskmint.schemas.config import CaptureConfig, GenerationConfig, ModelConfig, RunConfig
from maskmint.schemas.masking import ADAPTER_PROVENANCE, ADAPTER_WEIGHTS
from maskmint.stages.families import Family, family_of_pipeline, resolve_family
from maskmint.stages.loading import ModelLoadError, config_source, quiet_libraries, read_model_json
from maskmint.stages.tokens import TextLayout


def check_supported(model: ModelConfig, capture: CaptureConfig) -> Family:
    """The family, once the options it cannot honour are refused: before a run writes anything."""
    family = resolve_family(model)
    family.refuse(model, capture)
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


def pipeline_image_size(pipe, generation: GenerationConfig) -> tuple[int, int]:
    return image_size(generation, family_of_pipeline(pipe).denoiser(pipe).config, pipe.vae.config)


def check_before_loading(config: RunConfig) -> Family:
    """Every choice the model's own config files can refute, refused before a run writes
    anything: what its family cannot honour, image sizes its VAE and denoiser cannot tile,
    and capture settings that would read no attention at all. Reads config JSONs only."""
    family = check_supported(config.model, config.capture)
    source = config_source(config.model)
    name = family.denoiser_component
    try:
        vae = read_model_json(source, "vae/config.json")
        denoiser = read_model_json(source, f"{name}/config.json")
    except Exception as error:  # noqa: BLE001 - the loader says the same later; say it now
        raise ModelLoadError(f"model.path: cannot read the model's configs: {error}".splitlines()[0]) from None
    factor, levels = vae_scale(vae), family.denoiser_levels(denoiser)
    tile = factor * levels
    for side, size in zip(("height", "width"), image_size(config.generation, denoiser, vae)):
        if size and size % tile:
            raise ModelLoadError(
                f"generation.{side}: {size} is not a multiple of {tile} (the VAE's factor {factor} x the "
                f"{name}'s {levels}); e.g. {max(tile, size // tile * tile)}"
            )
    family.check_capture_against(config.capture, denoiser)
    if config.removal.adapter is not None:
        check_adapter(config.removal.adapter, family, config.model)
    return family


def check_adapter(folder: str, family: Family, model: ModelConfig) -> None:
    """A removal adapter must have been trained on this family's base denoiser."""
    try:
        trained = json.loads((Path(folder) / ADAPTER_PROVENANCE).read_text())
    except (OSError, ValueError):
        raise ModelLoadError(f"removal.adapter: {folder}/{ADAPTER_PROVENANCE} is unreadable") from None
    if trained.get("family") != family.name:
        raise ModelLoadError(f"removal.adapter: trained for family {trained.get('family')}, this model is {family.name}")
    if model.inpaint_path is not None:
        raise ModelLoadError("removal.adapter: the adapter was trained on the base denoiser; it cannot be used with "
                             "model.inpaint_path's dedicated inpainting model")
    if not (Path(folder) / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"removal.adapter: {folder} has no {ADAPTER_WEIGHTS}")


def load_text_to_image(config: ModelConfig, device: torch.device, dtype: torch.dtype):
    """The family's text-to-image pipeline on `device`, progress bars off, nothing fetched
    that the family does not need (safety checker, watermarker)."""
    return resolve_family(config).load(config, device, dtype)


def load_inpainting(base, config: ModelConfig):
    """The family's inpainting pipeline sharing the base model's components (nothing loaded twice)."""
    return family_of_pipeline(base).load_inpainting(base, config)


def load_text_layout(config: ModelConfig) -> TextLayout:
    """Where concept tokens sit, from the tokenizers alone: planning needs no network. The
    family is resolved first, so a pipeline maskmint does not run is refused before a run
    writes anything."""
    family = resolve_family(config)
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
