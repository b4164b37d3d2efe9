"""Annotate: a real image in, the same columns generate gives out.

The image is read (EXIF rotation applied; palette, alpha, CMYK, grey and 16-bit converted to
8-bit RGB), fitted to the model's size, and VAE-encoded through its family. Its clean latent
is noised to a level of the schedule and denoised with the caption by the family's
image-to-image pipeline while the capture store reads attention. With `fresh_noise` (the
concept-distillation recipe) each level of that schedule starts again from the clean latent
noised afresh, so every denoiser call reads the image, not the previous step's guess; the
levels are then independent, and `steps_per_call` of them share one denoiser call (the
batch stacked once per level), which saves the fixed cost of the calls. The stored image is
the input as fitted; removal starts from its clean latent.
"""

from __future__ import annotations

import copy
import hashlib
import io
import warnings
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from PIL.ExifTags import Base

from maskmint.schemas.config import AnnotateConfig, CaptureConfig
from maskmint.schemas.inputs import read_source_bytes
from maskmint.schemas.records import IGNORE_INDEX
from maskmint.stages.loading import execution_device, offload_like, vae_precision
from maskmint.stages.tokens import token_slots

ORIENTATION = Base.Orientation.value  # EXIF orientations 5-8 turn the image a quarter

class Source(NamedTuple):
    """A real image as annotate reads it: fitted pixels or the reason it cannot be used, the
    file's sha256, and its size (rows, columns) upright, before fitting."""

    image: np.ndarray | None
    reason: str | None
    sha256: str | None = None
    size: tuple[int, int] | None = None


def as_rgb(image: Image.Image) -> np.ndarray:
    """8-bit RGB of any mode PIL reads: 16-bit grey scaled down, transparency over black."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"))


def fit_geometry(rows: int, cols: int, height: int, width: int, how: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """How `fit` places a rows x cols image in height x width: the resized size (columns, rows)
    and the offset (top, left) of the model's frame inside it (crop) or of it inside the frame
    (pad, negative)."""
    if how == "stretch":
        return (width, height), (0, 0)
    scale = (max if how == "crop" else min)(height / rows, width / cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    return size, ((size[1] - height) // 2, (size[0] - width) // 2)


def fit(image: np.ndarray, height: int, width: int, how: str) -> np.ndarray:
    """The image at (height, width): cover and centre-crop, fit and pad with black, or stretch."""
    rows, cols = image.shape[:2]
    size, (top, left) = fit_geometry(rows, cols, height, width, how)
    shrinks = size[0] * size[1] < rows * cols
    resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_CUBIC)
    if how != "pad":
        return resized[top : top + height, left : left + width]
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[-top : -top + resized.shape[0], -left : -left + resized.shape[1]] = resized
    return canvas


def to_source_grid(frame: np.ndarray, rows: int, cols: int, how: str, outside, interpolation: int) -> np.ndarray:
    """An array made on the fitted image ([H, W] or [H, W, C]) carried back onto the source's
    rows x cols grid, the inverse of `fit`; source pixels the model never saw (cropped away)
    get `outside`. Label maps take cv2.INTER_NEAREST_EXACT (pixel centres, so 255 stays 255)."""
    height, width = frame.shape[:2]
    (resized_cols, resized_rows), (top, left) = fit_geometry(rows, cols, height, width, how)
    if how == "crop":
        canvas = np.full((resized_rows, resized_cols, *frame.shape[2:]), outside, frame.dtype)
        canvas[top : top + height, left : left + width] = frame
    elif how == "pad":
        canvas = frame[-top : -top + resized_rows, -left : -left + resized_cols]
    else:
        canvas = frame
    out = cv2.resize(np.ascontiguousarray(canvas), (cols, rows), interpolation=interpolation)
    return out.reshape(rows, cols, *frame.shape[2:])


def upright_rgb(data: bytes) -> np.ndarray:
    """The whole image as 8-bit RGB, EXIF rotation applied, at its own size."""
    with Image.open(io.BytesIO(data)) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    return as_rgb(image)


def at_source_size(path: str, mask: np.ndarray, background: np.ndarray, heat: np.ndarray, how: str):
    """(image, mask, background, heat) of an annotated sample at its source's own size: the
    source itself, the mask by nearest neighbour (255 where the crop cut away), the removed
    background and the maps resized (the source's own pixels where the model saw nothing)."""
    image = upright_rgb(read_source_bytes(path))
    rows, cols = image.shape[:2]
    seen = to_source_grid(np.ones(mask.shape, np.uint8), rows, cols, how, 0, cv2.INTER_NEAREST_EXACT).astype(bool)
    mask = to_source_grid(mask, rows, cols, how, IGNORE_INDEX, cv2.INTER_NEAREST_EXACT)
    background = to_source_grid(background, rows, cols, how, 0, cv2.INTER_LINEAR)
    background[~seen] = image[~seen]
    heat = to_source_grid(np.moveaxis(heat, 0, -1).astype(np.float32), rows, cols, how, 0.0, cv2.INTER_LINEAR)
    return image, mask, background, np.moveaxis(heat, -1, 0)


def read_source(path: str, height: int, width: int, config: AnnotateConfig) -> Source:
    """The file read once, for the digest and the decode alike."""
    try:
        data = read_source_bytes(path)
    except OSError:
        return Source(None, "unreadable_image")
    image, reason, size = decode_image(data, height, width, config)
    return Source(image, reason, hashlib.sha256(data).hexdigest() if reason is None else None, size)


def read_image(path: str, height: int, width: int, config: AnnotateConfig) -> tuple[np.ndarray | None, str | None]:
    """(uint8 [height, width, 3], None), or (None, the reason it cannot be used)."""
    return read_source(path, height, width, config)[:2]


def decode_image(data: bytes, height: int, width: int, config: AnnotateConfig):
    """(fitted uint8 image, None, upright size) or (None, reason, None). Past PIL's
    decompression-bomb limit (about 89 megapixels) an image is image_too_large, not decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                upright = opened.size if opened.getexif().get(ORIENTATION, 1) < 5 else opened.size[::-1]
                opened.draft("RGB", (width * 2, height * 2))  # a huge JPEG decodes at a fraction of its size
                image = ImageOps.exif_transpose(opened)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "image_too_large", None
    except (OSError, SyntaxError, ValueError):
        return None, "unreadable_image", None  # empty, truncated, or not an image
    if min(image.size) < config.min_side:
        return None, "image_too_small", None
    return fit(as_rgb(image), height, width, config.fit), None, (upright[1], upright[0])


class _Scheduled(Exception):
    """Stops the image-to-image pipeline at its first denoiser call: its schedule is set by then."""


def _stop_at_first_call(module, args, kwargs):
    raise _Scheduled


def scheduler_at(scheduler, index: int):
    """A copy of the running schedule that noises and scales at its level `index`. Euler-type
    and flow-matching schedulers keep the step they are at and read their sigma from it (the
    schedule was read at the first level, so that step is cleared); stateless ones (DDIM,
    PNDM) go by the timestep alone."""
    at = copy.deepcopy(scheduler)
    set_begin_index = getattr(at, "set_begin_index", None)
    if set_begin_index is not None:
        at._step_index = None  # diffusers has no public reset short of set_timesteps
        set_begin_index(index)
    return at


class Annotate:
    """Batch stage: `image_path` -> `image`, `heatmap`, `finite`, `latents` as generate gives
    them, plus `source_drop` (a reason, or None) and `source` (path and digest)."""

    def __init__(self, pipe, family, layout, store, size: tuple[int, int], config: AnnotateConfig,
                 capture: CaptureConfig):
        self.pipe, self.family, self.layout, self.store = pipe, family, layout, store
        self.image_to_image = offload_like(family.load_image_to_image(pipe), pipe)
        self.height, self.width = size
        self.config = config
        self.steps = config.steps or family.annotate_steps
        self.strength = config.strength or family.annotate_strength
        self.capture = capture
        self._schedule = None

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 NHWC -> the VAE's mean latents (unscaled), in the denoiser's dtype."""
        vae = self.pipe.vae
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(execution_device(self.pipe), torch.float32) / 127.5 - 1
        with vae_precision(vae) as dtype:
            encoded = vae.encode(pixels.to(dtype)).latent_dist.mean
        return encoded.to(self.family.denoiser(self.pipe).dtype)

    def image_input(self, images: np.ndarray, scaled: torch.Tensor):
        """What the image-to-image pipeline is given: the latents already encoded where it
        takes them, so that the VAE encodes each image once; otherwise the pixels."""
        if self.family.image_to_image_takes_latents(self.pipe.vae.config):
            return scaled
        return images.astype(np.float32) / 255.0

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        read = [read_source(path, self.height, self.width, self.config) for path in batch["image_path"]]
        images = np.stack([source.image if source.image is not None else np.zeros((self.height, self.width, 3), np.uint8)
                           for source in read])
        device = execution_device(self.pipe)
        encoded = self.encode(images)
        clean = self.family.latents_from_vae(self.pipe, encoded, self.height, self.width)
        generators = [torch.Generator(device).manual_seed(int(seed)) for seed in batch["seed"]]
        index, weights = token_slots(batch["concepts"])
        latent_hw = (self.height // self.pipe.vae_scale_factor, self.width // self.pipe.vae_scale_factor)
        scaled = self.family.scaled_latents(self.pipe, encoded)
        prompts = self.family.prompt_kwargs(self.layout, list(batch["prompt"]), list(batch["negative_prompt"]))
        schedule = self.schedule(prompts, self.image_input(images, scaled)) if self.config.fresh_noise else None
        self.store.begin(batch["concepts"], index.to(device), latent_hw)
        try:
            if schedule is not None:
                self.read_fresh_levels(list(batch["prompt"]), scaled, generators, *schedule)
            else:
                self.image_to_image(
                    **prompts, image=self.image_input(images, scaled), strength=self.strength,
                    num_inference_steps=self.steps, guidance_scale=self.config.guidance_scale,
                    height=self.height, width=self.width, generator=generators, output_type="latent",
                    callback_on_step_end=self.store.on_step_end,
                )
            heat = self.store.heatmaps(weights.to(device))
        finally:
            self.store.end()
        heat = F.interpolate(heat, size=(self.height, self.width), mode="bicubic", align_corners=False).clamp_(min=0)
        reasons = [source.reason for source in read]
        return {
            "image": images,
            "heatmap": torch.nan_to_num(heat).float().cpu().numpy(),
            "finite": torch.isfinite(heat).flatten(1).all(dim=1).cpu().tolist(),
            "latents": clean,
            "source_drop": reasons,
            "source": [{"path": path, "sha256": source.sha256, "size": source.size}
                       for path, source in zip(batch["image_path"], read)],
        }

    def schedule(self, prompts: dict, image) -> tuple:
        """(the scheduler as the image-to-image pipeline set it up, the timesteps its loop runs):
        the pipeline's own schedule (its shift, strength and begin index), read once by starting
        it on one image and stopping it at its first denoiser call."""
        if self._schedule is None:
            one = {k: v[:1] if isinstance(v, list) else v for k, v in prompts.items()}
            hook = self.family.denoiser(self.image_to_image).register_forward_pre_hook(_stop_at_first_call, with_kwargs=True)
            try:
                self.image_to_image(**one, image=image[:1], strength=self.strength, num_inference_steps=self.steps,
                                    guidance_scale=1.0, height=self.height, width=self.width, output_type="latent")
            except _Scheduled:
                pass
            else:
                raise RuntimeError("annotate: the image-to-image pipeline made no denoiser call")
            finally:
                hook.remove()
            scheduler = copy.deepcopy(self.image_to_image.scheduler)
            start = getattr(scheduler, "begin_index", None)
            if start is None:  # a stateless scheduler (DDIM, PNDM): the pipelines' own rule for where strength starts
                start = (self.steps - min(int(self.steps * self.strength), self.steps)) * scheduler.order
            self._schedule = scheduler, start, scheduler.timesteps[start:]
        return self._schedule

    def read_fresh_levels(self, prompts: list[str], clean: torch.Tensor, generators: list[torch.Generator],
                          scheduler, start: int, levels: torch.Tensor) -> None:
        """The denoiser reads the clean latents [B, C, h, w] noised afresh to every level of the
        schedule (those `capture.steps` names), `steps_per_call` levels a call. Each sample draws
        one noise per level, in level order, from its own generator, as the pipeline's loop
        would; what the denoiser predicts is not used."""
        batch = len(prompts)
        noise = [torch.stack([torch.randn(clean.shape[1:], generator=g, device=clean.device, dtype=clean.dtype)
                              for g in generators]) for _ in levels]
        read = [k for k in range(len(levels)) if self.capture.steps is None or k in self.capture.steps]
        states, pooled = self.family.encode_text(self.pipe, self.layout, prompts)
        per_call = self.config.steps_per_call
        for first in range(0, len(read), per_call):
            chunk = read[first : first + per_call]
            inputs = []
            for k in chunk:
                at = scheduler_at(scheduler, start + k)
                timestep = levels[k : k + 1]
                inputs.append(self.family.model_input(at, self.family.renoise(at, clean, noise[k], timestep), timestep))
            self.store.on_step_end(self.pipe, chunk[0] - 1, None, {})  # the next call reads step chunk[0]
            self.store.stack(len(chunk))
            repeat = len(chunk)
            self.family.predict(
                self.pipe, torch.cat(inputs), levels[chunk].repeat_interleave(batch).to(clean.device),
                states.repeat(repeat, *[1] * (states.ndim - 1)),
                None if pooled is None else pooled.repeat(repeat, *[1] * (pooled.ndim - 1)),
                self.config.guidance_scale,
            )
