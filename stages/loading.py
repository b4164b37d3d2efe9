"""What every family's loading shares: device and dtype choice, quiet libraries, reading a
model's config files (folder, single file's config, or hub id), and the weights' fingerprint."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from maskmint.schemas.config import ModelConfig


class ModelLoadError(RuntimeError):
    """The configured model could not be loaded; the message says which and why."""


@contextmanager
def vae_precision(vae):
    """The dtype to run the VAE in, for the length of the block: fp32 for a VAE that overflows in
    fp16 (SDXL's, `force_upcast`), as diffusers' own pipelines do; its own dtype otherwise."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield vae.dtype
    finally:
        if upcast:
            vae.to(torch.float16)


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


def execution_device(pipe) -> torch.device:
    """Where a pipeline computes. Under CPU offload its weights sit on the CPU (or the meta
    device), so `pipe.device` names the wrong place; diffusers finds the place from the hooks."""
    return pipe._execution_device


OFFLOAD_METHODS = {"model": "enable_model_cpu_offload", "sequential": "enable_sequential_cpu_offload"}


def offload(pipe, mode: str | None, device: torch.device):
    """`model.offload` on one pipeline, after its networks are final (processors, adapter):
    diffusers' hooks move each network (model) or layer (sequential) to `device` when it runs.
    Every pipeline maskmint builds on shared networks is offloaded alike (`offload_like`)."""
    if mode == "sequential" and device.type == "cpu":
        # accelerate's layer hooks break on CPU-to-CPU moves, and there is nothing to save there
        raise ModelLoadError("model.offload: sequential moves layers onto an accelerator; this run's device is the "
                             "CPU, where the weights are in memory already (use none or model)")
    pipe._maskmint_offload = (mode, device)
    if mode is not None:
        getattr(pipe, OFFLOAD_METHODS[mode])(device=device)
    return pipe


def offload_like(pipe, base):
    """The base pipeline's offload, on a pipeline built on its networks."""
    mode, device = getattr(base, "_maskmint_offload", (None, None))
    return offload(pipe, mode, device)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def is_single_file(location: str) -> bool:
    return Path(location).is_file()


def config_source(config: ModelConfig) -> str:
    """Where the configs and tokenizer are: the model folder or hub id, or for a single-file
    checkpoint its single_file_config."""
    source = config.single_file_config if is_single_file(config.path) else config.path
    if source is None:
        raise ModelLoadError("model.single_file_config: needed to find the configs and tokenizer of a single-file checkpoint")
    return source


def read_model_json(source: str, name: str) -> dict:
    """A JSON file of a model folder or hub id (from the hub cache when offline)."""
    path = Path(source) / name
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, name))
    return json.loads(path.read_text())


def load_failure(role: str, location: str, error: BaseException) -> ModelLoadError:
    """One line naming the config field, the location and the loader's own first line."""
    return ModelLoadError(f"model.{role}: cannot load '{location}': {error}".splitlines()[0])


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
