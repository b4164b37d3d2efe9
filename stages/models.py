"""Loading diffusion models from a folder, a single checkpoint file or a hub id."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

from schemas.config import ModelConfig
from stages.families import Family, UnsupportedModel, resolve_family


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

    family = family_of(config)
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


def load_tokenizer(config: ModelConfig):
    """Just the tokenizer: planning needs token positions without loading any network. The
    family is resolved first, so a pipeline maskmint does not run is refused before a run
    writes anything. (SDXL's second tokenizer has the same vocabulary and positions.)"""
    family_of(config)
    return _tokenizer_at(config_source(config))


@functools.lru_cache(maxsize=8)
def _tokenizer_at(source: str):
    # Cached: `plan`, the run's preflight and the in-process worker all ask for it.
    from transformers import CLIPTokenizer

    quiet_libraries()
    try:
        return CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"model.path: cannot load the tokenizer of '{source}': {error}".splitlines()[0]) from error
