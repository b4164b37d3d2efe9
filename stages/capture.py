"""DAAM-style cross-attention capture through diffusers' attention-processor API.

Each cross-attention layer still computes its output with scaled_dot_product_attention;
when a step is captured it also takes, for the conditional half of the guidance batch
only, the softmax probabilities of the concept tokens' columns and adds them in place to
one fp32 accumulator per layer. Nothing per step is stored, and nothing syncs to the host.

Optionally (Dataset Diffusion's refinement) the self-attention layers at one resolution add
their head-mean attention probabilities [N, N] to one more accumulator, the affinity A; the
concept maps are then refined as A^k times the map at that resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from schemas.config import CaptureConfig


class ConceptAttentionStore:
    """Accumulators of the concept tokens' attention for the batch being generated."""

    def __init__(self, config: CaptureConfig):
        self.config = config
        self.sums: dict[str, torch.Tensor] = {}
        self.token_index: torch.Tensor | None = None
        self.latent_hw: tuple[int, int] = (0, 0)
        self.step = 0
        self.active = False
        self._wanted_steps = None if config.steps is None else set(config.steps)
        self.affinity: torch.Tensor | None = None  # [B, N, N]: head-mean self-attention, summed
        self.affinity_terms = 0

    def begin(self, token_index: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        """Start a batch: token_index is [B, T] positions into the prompt tokens (padding repeats one)."""
        self.sums = {}
        self.affinity, self.affinity_terms = None, 0
        self.token_index = token_index
        self.latent_hw = latent_hw
        self._set_step(0)

    def _set_step(self, step: int) -> None:
        self.step = step
        self.active = self._wanted_steps is None or step in self._wanted_steps

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """diffusers' callback_on_step_end hook: the next UNet call is step + 1."""
        self._set_step(step + 1)
        return callback_kwargs

    def end(self) -> None:
        self.active = False
        self.token_index = None

    def wants(self, layer: str, query_tokens: int) -> bool:
        if not self.active or self.token_index is None:
            return False
        if layer.startswith("mid_block") and not self.config.include_mid_block:
            return False
        downscale = round(math.sqrt(self.latent_hw[0] * self.latent_hw[1] / query_tokens))
        return downscale not in self.config.skip_downscales

    def wants_self(self, query_tokens: int) -> bool:
        if not (self.config.self_attention and self.active and self.token_index is not None):
            return False
        return round(math.sqrt(self.latent_hw[0] * self.latent_hw[1] / query_tokens)) == self.config.self_attention_downscale

    def add_self(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query, key [2B or B, heads, N, d] of a self-attention layer: add the conditional
        half's head-mean attention probabilities."""
        batch = self.token_index.shape[0]
        query, key = query[-batch:], key[-batch:]
        probs = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale).softmax(dim=-1).mean(dim=1)
        if self.affinity is None:
            self.affinity = probs
        else:
            self.affinity.add_(probs)
        self.affinity_terms += 1

    def refine(self, maps: torch.Tensor) -> torch.Tensor:
        """maps [B, C, h, w] at latent size -> A^k maps, A the mean affinity (rows sum to 1)."""
        height, width = self.latent_hw
        side = self.config.self_attention_downscale
        rows, cols = height // side, width // side
        affinity = self.affinity / self.affinity_terms
        flat = F.interpolate(maps, size=(rows, cols), mode="area").flatten(2)  # [B, C, N]
        for _ in range(self.config.self_attention_power):
            flat = torch.einsum("bij,bcj->bci", affinity, flat)
        grid = flat.view(*maps.shape[:2], rows, cols)
        return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).clamp_(min=0)

    def add(self, layer: str, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query [2B or B, heads, N, d], key [2B or B, heads, L, d]: add this step's concept probabilities."""
        batch = self.token_index.shape[0]
        query, key = query[-batch:], key[-batch:]  # the conditional half comes last
        scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
        log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
        heads, tokens = scores.shape[1], scores.shape[2]
        index = self.token_index[:, None, None, :].expand(batch, heads, tokens, -1)
        probs = scores.gather(-1, index).sub_(log_norm).exp_()
        if layer in self.sums:
            self.sums[layer].add_(probs)
        else:
            self.sums[layer] = probs

    def heatmaps(self, token_weights: torch.Tensor) -> torch.Tensor:
        """Per-concept maps [B, C, h, w] at latent size.

        Every head's step-summed map is upsampled bicubically and clamped at 0, heads and
        layers are averaged (every map alike, or each resolution alike: `weighting`), and
        token_weights [B, C, T] (rows summing to 1) average a word's tokens.
        """
        if not self.sums:
            raise RuntimeError("no attention was captured: check capture.steps and capture.skip_downscales")
        height, width = self.latent_hw
        totals: dict[int, torch.Tensor] = {}  # query tokens (resolution) -> sum over its layers and heads
        heads_seen: dict[int, int] = {}
        for probs in self.sums.values():
            batch, heads, tokens, slots = probs.shape
            downscale = math.sqrt(height * width / tokens)
            rows = round(height / downscale)
            grid = probs.permute(0, 1, 3, 2).reshape(batch, heads * slots, rows, tokens // rows)
            up = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).clamp_(min=0)
            layer_sum = up.view(batch, heads, slots, height, width).sum(dim=1)
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


class CapturingAttnProcessor(AttnProcessor2_0):
    """SDPA attention that also hands the concept columns of cross-attention (or, on a
    self-attention layer, its affinity) to the store."""

    def __init__(self, store: ConceptAttentionStore, layer: str):
        super().__init__()
        self.store = store
        self.layer = layer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if attn.spatial_norm is not None or attn.group_norm is not None or not (is_cross or self.store.wants_self(tokens)):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if not is_cross:
            encoder_hidden_states = hidden_states
        batch, _, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if is_cross and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None and is_cross and self.store.wants(self.layer, query.shape[2]):
            self.store.add(self.layer, query, key, attn.scale)
        elif attention_mask is None and not is_cross:
            self.store.add_self(query, key, attn.scale)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_capture(unet, config: CaptureConfig) -> ConceptAttentionStore:
    """Put capturing processors on every cross-attention layer (attn2), and on self-attention
    (attn1) when it refines the maps; plain SDPA elsewhere."""
    store = ConceptAttentionStore(config)
    captured = ("attn2", "attn1") if config.self_attention else ("attn2",)
    processors = {}
    for name in unet.attn_processors:
        layer = name.removesuffix(".processor")
        processors[name] = CapturingAttnProcessor(store, layer) if layer.endswith(captured) else AttnProcessor2_0()
    unet.set_attn_processor(processors)
    return store
