"""Recipe `cross`: DAAM-style attention probabilities of the concept tokens.

Each layer read hands its queries and keys to the store; for the conditional half of the
guidance batch only, the softmax probabilities of the concept tokens' columns are added in
place to one fp32 accumulator per layer. Nothing per step is stored, and nothing syncs to
the host. A UNet's cross-attention gives them directly; an MM-DiT's joint attention gives
the image-query x concept-key block of its one softmax (normalised over every key).

Optionally (Dataset Diffusion's refinement) self-attention at one resolution adds its
head-mean attention probabilities [N, N] to one more accumulator, the affinity A; the maps
are then refined as A^k times the map at that resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskmint.schemas.config import CaptureConfig
from maskmint.stages.capture.store import StepGate, as_grid, downscale_of, fold, tensor_bytes, upsample

QUERY_CHUNK_ELEMENTS = 1 << 26  # fp32 scores held at once by `add` (256 MiB)


class CrossAttentionStore:
    """Accumulators of the concept tokens' attention for the batch being generated."""

    def __init__(self, config: CaptureConfig):
        self.config = config
        self.gate = StepGate(config)
        self.on_step_end = self.gate.on_step_end
        self.sums: dict[str, torch.Tensor] = {}
        self.token_index: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] = (0, 0)
        self.affinity: torch.Tensor | None = None  # [B, N, N]: head-mean self-attention, summed
        self.affinity_terms = 0
        self.copies = 1

    def begin(self, concepts, token_index: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        self.sums = {}
        self.affinity, self.affinity_terms = None, 0
        self.token_index = token_index
        self.latent_hw = latent_hw
        self.copies = 1
        self.gate.start()

    def stack(self, copies: int) -> None:
        self.copies = copies

    def end(self) -> None:
        self.gate.stop()
        self.token_index = None

    @property
    def reading(self) -> bool:
        return self.gate.active and self.token_index is not None

    def wants(self, layer: str, query_tokens: int) -> bool:
        if not self.reading:
            return False
        if layer.startswith("mid_block") and not self.config.include_mid_block:
            return False
        return downscale_of(self.latent_hw, query_tokens) not in self.config.skip_downscales

    def wants_self(self, query_tokens: int) -> bool:
        if not (self.config.self_attention and self.reading):
            return False
        return downscale_of(self.latent_hw, query_tokens) == self.config.self_attention_downscale

    def add_self(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query, key [2B or B (x copies), heads, N, d] of a self-attention layer: add the
        conditional half's head-mean attention probabilities."""
        rows = self.token_index.shape[0] * self.copies
        query, key = query[-rows:], key[-rows:]
        probs = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale).softmax(dim=-1).mean(dim=1)
        probs = fold(probs, self.copies)
        if self.affinity is None:
            self.affinity = probs
        else:
            self.affinity.add_(probs)
        self.affinity_terms += self.copies

    def add(self, layer: str, query: torch.Tensor, key: torch.Tensor, scale: float, text_start: int = 0) -> None:
        """query [2B or B (x copies), heads, N, d] (image tokens), key [same rows, heads, L, d]
        (every key the softmax runs over; the text tokens from `text_start`): add this call's
        concept probabilities."""
        token_index = self.token_index.repeat(self.copies, 1)
        batch = token_index.shape[0]
        query, key = query[-batch:], key[-batch:]  # the conditional half comes last
        heads, tokens = query.shape[1], query.shape[2]
        # bounded memory: the full score matrix of a large joint layer would not fit at once
        rows = max(1, QUERY_CHUNK_ELEMENTS // (batch * heads * key.shape[2]))
        parts = []
        for start in range(0, tokens, rows):
            scores = torch.matmul(query[:, :, start : start + rows], key.transpose(-1, -2)).float().mul_(scale)
            log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
            index = (token_index + text_start)[:, None, None, :].expand(batch, heads, scores.shape[2], -1)
            parts.append(scores.gather(-1, index).sub_(log_norm).exp_())
        probs = fold(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2), self.copies)
        if layer in self.sums:
            self.sums[layer].add_(probs)
        else:
            self.sums[layer] = probs

    def held_bytes(self) -> int:
        return tensor_bytes(*self.sums.values(), self.affinity)

    def refine(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [B, C, h, w] at latent size -> A^k maps, A the mean affinity (rows sum to 1)."""
        height, width = self.latent_hw
        side = self.config.self_attention_downscale
        rows, cols = height // side, width // side
        affinity = self.affinity / self.affinity_terms
        flat = F.interpolate(maps, size=(rows, cols), mode="area").flatten(2)  # [B, C, N]
        for _ in range(self.config.self_attention_power):
            flat = torch.einsum("bij,bcj->bci", affinity, flat)
        return upsample(flat.view(*maps.shape[:2], rows, cols), self.latent_hw)

    def heatmaps(self, token_weights: torch.Tensor) -> torch.Tensor:
        """Every head's step-summed map is upsampled bicubically and clamped at 0, heads and
        layers are averaged (every map alike, or each resolution alike: `weighting`), and
        token_weights [B, C, T] (rows summing to 1) average a word's tokens."""
        if not self.sums:
            raise RuntimeError("no attention was captured: check capture.steps and capture.skip_downscales")
        height, width = self.latent_hw
        totals: dict[int, torch.Tensor] = {}  # query tokens (resolution) -> sum over its layers and heads
        heads_seen: dict[int, int] = {}
        for probs in self.sums.values():
            batch, heads, tokens, slots = probs.shape
            grid = as_grid(probs.transpose(2, 3), self.latent_hw).flatten(1, 2)  # [B, heads x slots, r, c]
            layer_sum = upsample(grid, self.latent_hw).view(batch, heads, slots, height, width).sum(dim=1)
            totals[tokens] = layer_sum if tokens not in totals else totals[tokens].add_(layer_sum)
            heads_seen[tokens] = heads_seen.get(tokens, 0) + heads
        if self.config.weighting == "per_map":  # every (layer, head) map counts once (DAAM)
            per_token = sum(totals.values()) / sum(heads_seen.values())
        else:  # each resolution counts once, however many layers it has
            per_token = sum(totals[t] / heads_seen[t] for t in totals) / len(totals)
        maps = torch.einsum("bct,bthw->bchw", token_weights.to(per_token), per_token)
        if self.config.self_attention:
            if self.affinity is None:
                raise RuntimeError(
                    "no self-attention was captured: no layer at capture.self_attention_downscale "
                    f"{self.config.self_attention_downscale} of the latent"
                )
            maps = self.refine(maps)
        return maps
