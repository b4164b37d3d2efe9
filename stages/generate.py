"""Generate: text-to-image in batches with concept attention captured on the way."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from maskmint.schemas.config import CaptureConfig, GenerationConfig
from maskmint.stages.families import family_of_pipeline
from maskmint.stages.loading import execution_device, vae_precision
from maskmint.stages.models import pipeline_image_size
from maskmint.stages.tokens import TextLayout, token_slots

# Inductor generates kernels; tests swap in "eager" to check tracing without the codegen wait.
COMPILE_BACKEND = "inductor"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC (non-finite pixels become 0; the filter sees `finite`)."""
    images = torch.nan_to_num((images / 2 + 0.5).clamp(0, 1), nan=0.0)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def decode(vae, scaled: torch.Tensor) -> torch.Tensor:
    """VAE-space latents -> images in [-1, 1], in the VAE's safe precision."""
    with vae_precision(vae) as dtype:
        return vae.decode(scaled.to(dtype), return_dict=False)[0]


class Generate:
    """Batch stage: prompts -> `image` uint8 [B,H,W,3], `heatmap` float32 [B,C,H,W], `finite` bools,
    and `latents` (as the pipeline returns them, on the model's device) so removal need not encode the image again."""

    def __init__(self, pipe, generation: GenerationConfig, capture: CaptureConfig):
        self.pipe = pipe
        self.family = family = family_of_pipeline(pipe)
        self.layout: TextLayout = family.text_layout(pipe.components)
        self.config = generation
        family.check_loaded(pipe, capture)
        self.store = family.capture_store(pipe, self.layout, capture)
        denoiser = family.denoiser(pipe)
        if generation.channels_last:
            denoiser.to(memory_format=torch.channels_last)
        if generation.compile:
            # After the processors are in, so capture is traced into the graph. Removal by latent
            # blending shares this denoiser and gets graphs of its own for the uncaptured path.
            setattr(pipe, family.denoiser_component, torch.compile(denoiser, backend=COMPILE_BACKEND))
        self.height, self.width = pipeline_image_size(pipe, generation)

    @torch.inference_mode()
    def __call__(self, batch: dict) -> dict:
        pipe = self.pipe
        device = execution_device(pipe)
        generators = [torch.Generator(device).manual_seed(int(seed)) for seed in batch["seed"]]
        index, weights = token_slots(batch["concepts"])
        latent_hw = (self.height // pipe.vae_scale_factor, self.width // pipe.vae_scale_factor)
        self.store.begin(batch["concepts"], index.to(device), latent_hw)
        try:
            latents = pipe(
                **self.family.prompt_kwargs(self.layout, list(batch["prompt"]), list(batch["negative_prompt"])),
                num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance_scale,
                height=self.height,
                width=self.width,
                generator=generators,
                output_type="latent",
                callback_on_step_end=self.store.on_step_end,
            ).images
            heat = self.store.heatmaps(weights.to(device))
        finally:
            self.store.end()
        heat = F.interpolate(heat, size=(self.height, self.width), mode="bicubic", align_corners=False).clamp_(min=0)
        decoded = decode(pipe.vae, self.family.latents_for_vae(pipe, latents, self.height, self.width))
        finite = torch.isfinite(decoded).flatten(1).all(dim=1) & torch.isfinite(heat).flatten(1).all(dim=1)
        return {
            "image": to_uint8(decoded),
            "heatmap": torch.nan_to_num(heat).float().cpu().numpy(),
            "finite": finite.cpu().tolist(),
            "latents": latents,
        }
