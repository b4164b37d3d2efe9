"""Remove: inpaint the dilated weak mask with the background prompt to get a clean background."""

from __future__ import annotations

import contextlib

import cv2
import numpy as np
import torch

from maskmint.schemas.config import RemovalConfig
from maskmint.schemas.masking import ADAPTER_WEIGHTS
from maskmint.schemas.records import BACKGROUND_ID
from maskmint.stages.loading import ModelLoadError, execution_device
from maskmint.stages.masks import cover_cells, dilate

# Inpainting noise must differ from generation noise drawn from the same seed.
REMOVAL_SEED_OFFSET = 1


def prefill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The region filled from its surroundings: a starting point that holds no object."""
    radius = max(3, int(np.sqrt(region.sum()) / 4))
    return cv2.inpaint(image, region.astype(np.uint8), radius, cv2.INPAINT_TELEA)


ADAPTER_NAME = "maskmint_removal"


def load_adapter(denoiser, folder: str) -> None:
    """The distilled LoRA adapter loaded beside the denoiser's weights, switched off: the
    denoiser computes exactly what it did until removal switches it on."""
    try:
        denoiser.load_lora_adapter(folder, prefix=None, adapter_name=ADAPTER_NAME, weight_name=ADAPTER_WEIGHTS)
    except Exception as error:  # noqa: BLE001 - a file that is not this denoiser's adapter
        raise ModelLoadError(f"removal.adapter: cannot load {folder}: {error}".splitlines()[0]) from error
    denoiser.disable_adapters()


@contextlib.contextmanager
def adapter_on(denoiser):
    if denoiser is None:
        yield
        return
    denoiser.enable_adapters()
    try:
        yield
    finally:
        denoiser.disable_adapters()


class Remove:
    """Batch stage: adds `background` uint8 [B,H,W,3]. `removal_groups` (default: the whole
    batch) lists the samples to remove, one inpainting call per group; samples in no group
    (already dropped), or with an empty weak mask, keep their image at no cost. A kernel's
    rounding can depend on its batch's size, so a sample's bytes are those of its group."""

    def __init__(self, inpaint_pipe, config: RemovalConfig, prompt_kwargs=None, reuse_latents: bool = False,
                 denoiser=None):
        """`prompt_kwargs(prompts, negatives)`: the family's text arguments (default: SD's).
        `reuse_latents`: the inpainting denoiser blends latents, so generation's latents stand
        in for the image's (two VAE encodes skipped; the family says when). `denoiser`: the
        inpainting pipeline's, where `config.adapter` is loaded."""
        self.pipe = inpaint_pipe
        self.config = config
        self.prompt_kwargs = prompt_kwargs or (lambda prompts, negatives: {"prompt": prompts, "negative_prompt": negatives})
        self.reuse_latents = reuse_latents
        self.denoiser = denoiser
        if config.adapter is not None:
            load_adapter(denoiser, config.adapter)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        images, weak = batch["image"], batch["weak_mask"]
        regions = np.stack([dilate(m != BACKGROUND_ID, self.config.dilate_px) for m in weak])
        backgrounds = images.copy()
        for group in batch.get("removal_groups") or [range(len(images))]:
            todo = [i for i in group if regions[i].any()]
            if todo:
                self._remove(batch, todo, regions, backgrounds)
        return {"background": backgrounds}

    def _remove(self, batch: dict, todo: list[int], regions: np.ndarray, backgrounds: np.ndarray) -> None:
        images = batch["image"]
        device = execution_device(self.pipe)
        cell = self.pipe.vae_scale_factor
        cells = np.stack([cover_cells(regions[i], cell) for i in todo])
        height, width = images.shape[1:3]
        latents = batch.get("latents") if self.reuse_latents and not self.config.prefill else None
        if latents is not None:
            image = masked = latents[todo]
        else:
            start = np.stack([prefill(images[i], regions[i]) for i in todo]) if self.config.prefill else images[todo]
            image, masked = start.astype(np.float32) / 255.0, None
        masked_kwargs = {} if masked is None else {"masked_image_latents": masked}
        with adapter_on(self.denoiser if self.config.adapter else None):
            inpainted = self._inpaint(batch, todo, image, masked_kwargs, cells, height, width, device)
        inpainted = (np.nan_to_num(inpainted).clip(0, 1) * 255).round().astype(np.uint8)
        # Outside the region the original pixels are exact; the VAE round trip would blur them.
        for j, i in enumerate(todo):
            backgrounds[i][regions[i]] = inpainted[j][regions[i]]

    def _inpaint(self, batch, todo, image, masked_kwargs, cells, height, width, device):
        return self.pipe(
            **self.prompt_kwargs([batch["background_prompt"][i] for i in todo],
                                 [batch["background_negative_prompt"][i] for i in todo]),
            image=image,
            **masked_kwargs,
            mask_image=cells[:, :, :, None].astype(np.float32),
            height=height,
            width=width,
            strength=self.config.strength,
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance_scale,
            generator=[torch.Generator(device).manual_seed(int(batch["seed"][i]) + REMOVAL_SEED_OFFSET) for i in todo],
            output_type="np",
        ).images
