"""What every capture recipe shares: the protocol generate drives, the step gate, and the
reshape of per-image-token values into a latent-sized grid."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from maskmint.schemas.config import CaptureConfig
from maskmint.schemas.records import ConceptSpan


@runtime_checkable
class CaptureStore(Protocol):
    """One batch at a time: begin, the denoiser runs (the store reads what it needs), end."""

    def begin(self, concepts: list[list[ConceptSpan]], token_index: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        """concepts: each sample's spans; token_index [B, T]: their token positions in the prompt."""

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' callback_on_step_end."""

    def stack(self, copies: int) -> None:
        """The next denoiser calls carry `copies` noise levels of the batch, stacked level-major
        (annotate with fresh noise: its levels are independent); each is read and folded into
        the batch's own accumulators. `begin` resets it to 1."""

    def end(self) -> None: ...

    def heatmaps(self, token_weights: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] at latent size; token_weights [B, C, T] average a word's tokens."""

    def held_bytes(self) -> int:
        """What the store holds between steps: constant in the number of steps."""


class StepGate:
    """Which denoiser calls are read: `capture.steps` (None: all). Step 0 is the first call."""

    def __init__(self, config: CaptureConfig):
        self._wanted = None if config.steps is None else set(config.steps)
        self.step = 0
        self.active = False

    def start(self) -> None:
        self.at(0)

    def at(self, step: int) -> None:
        self.step = step
        self.active = self._wanted is None or step in self._wanted

    def stop(self) -> None:
        self.active = False

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' callback_on_step_end: the next denoiser call is step + 1."""
        self.at(step + 1)
        return callback_kwargs


def grid_rows(latent_hw: tuple[int, int], tokens: int) -> int:
    """Rows of the token grid that `tokens` image tokens form over a latent of `latent_hw`."""
    height, width = latent_hw
    return round(height / math.sqrt(height * width / tokens))


def downscale_of(latent_hw: tuple[int, int], tokens: int) -> int:
    """How many times smaller than the latent a layer with `tokens` image tokens is."""
    return round(math.sqrt(latent_hw[0] * latent_hw[1] / tokens))


def as_grid(values: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[..., N] per image token (row-major) -> [..., rows, N // rows]."""
    tokens = values.shape[-1]
    rows = grid_rows(latent_hw, tokens)
    return values.reshape(*values.shape[:-1], rows, tokens // rows)


def upsample(grid: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[B, K, r, c] -> [B, K, h, w], bicubic and clamped at 0 (bicubic overshoots below)."""
    return F.interpolate(grid, size=latent_hw, mode="bicubic", align_corners=False).clamp_(min=0)


def fold(values: torch.Tensor, copies: int) -> torch.Tensor:
    """[copies x B, ...] stacked level-major -> [B, ...], the levels summed."""
    return values if copies == 1 else values.unflatten(0, (copies, -1)).sum(0)


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
