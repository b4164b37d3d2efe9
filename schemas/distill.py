"""Options of `launch.py distill`: the concept-distillation fine-tune, as a LoRA adapter.

The defaults are the paper's (Dombrowski et al., ICCV 2023, and its public code) where it
fixes them: half the steps learn the image with its own caption over the whole image, half
learn the background caption on a rectangle of background pixels, lr 1e-4, batch 3,
horizontal flips. The paper fine-tunes the whole UNet; maskmint trains a LoRA adapter
instead (rank is ours to choose). The rectangle's sizes are the paper's on a 64 x 64 latent
grid (SD 1.x at 512 px), scaled with the grid of the run's model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from maskmint.schemas.base import Section

# Options that do not change what one step computes: a rerun may change them and continue.
RESUMABLE_CHANGES = {"steps", "checkpoint_every"}


class DistillConfig(Section):
    steps: int = Field(default=1000, ge=1, description="optimizer steps in all (a rerun with more continues)")
    batch_size: int = Field(default=3, ge=1, description="images per step (the paper's per-GPU batch)")
    lr: float = Field(default=1e-4, gt=0.0, description="AdamW learning rate (the paper's)")
    rank: int = Field(default=16, ge=1, le=512, description="LoRA rank of the adapted layers")
    layers: Literal["all", "attention"] = Field(
        default="all",
        description="all: every linear and convolution of the denoiser, nearer the paper's whole-UNet fine-tune "
        "(in the toy world 3x the attention-only adapter's gain on unseen backgrounds, at 1.7x the training "
        "time); attention: the attention projections only",
    )
    concept_share: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="share of images learnt with their own caption over the whole image; the rest learn the "
        "background caption on a rectangle of background",
    )
    rect_min_side: float = Field(default=10.0, ge=0.0, description="rectangle sides must exceed this (latent pixels at 64 x 64)")
    rect_min_area: float = Field(default=256.0, ge=0.0, description="rectangle area at least this (latent pixels at 64 x 64)")
    rect_max_side: float = Field(default=32.0, gt=0.0, description="rectangle at most this square (latent pixels at 64 x 64)")
    rect_background: float = Field(default=2 / 3, gt=0.0, le=1.0, description="least share of background inside it")
    background_margin_px: int = Field(
        default=0, ge=0,
        description="pixels around the weak mask the background task never learns from (0: the paper's cells, "
        "background when most of their pixels are)",
    )
    rect_tries: int = Field(default=100, ge=1, description="rectangles tried before the whole background is used")
    flip: bool = Field(default=True, description="random horizontal flips")
    guidance: float | None = Field(
        default=None, ge=0.0, description="guidance-embedding models (Flux dev): the value trained at; None: removal's"
    )
    seed: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1, description="steps between checkpoints")

    @model_validator(mode="after")
    def _rectangle_possible(self) -> DistillConfig:
        if self.rect_min_side >= self.rect_max_side:
            raise ValueError("rect_min_side must be below rect_max_side")
        if self.rect_min_area > self.rect_max_side**2:
            raise ValueError("rect_min_area must fit in rect_max_side squared")
        return self

    def identity(self) -> dict:
        """What a checkpoint must share with the options to be continued."""
        return self.model_dump(mode="json", exclude=RESUMABLE_CHANGES)
