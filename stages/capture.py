"""DAAM-style cross-attention capture through diffusers' attention-processor API.

Each cross-attention layer still computes its output with scaled_dot_product_attention;
when a step is captured it also takes, for the conditional half of the guidance batch
only, the softmax probabilities of the concept tokens' columns and adds them in place to
one fp32 accumulator per layer. Nothing per step is stored, and nothing syncs to the host.

MM-DiT families (SD3, Flux) have no cross-attention: text tokens are keys beside the image
tokens in one joint softmax. There the captured block is the image queries x concept-text
keys of that joint softmax (normalised over every key, text and image), from the joint
layers of the double-stream blocks.

Optionally (Dataset Diffusion's refinement) the self-attention layers at one resolution add
their head-mean attention probabilities [N, N] to one more accumulator, the affinity A; the
concept maps are then refined as A^k times the map at that resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from maskmint.schemas.config import CaptureConfig


QUERY_CHUNK_ELEMENTS = 1 << 26  # fp32 scores held at once by `add` (256 MiB)


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

    def begin(self, concepts, token_index: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        """Start a batch: token_index is [B, T] positions into the prompt tokens (padding repeats one);
        the concept spans themselves are not needed here."""
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

    def held_bytes(self) -> int:
        """What the accumulators hold: constant in the number of steps."""
        held = [*self.sums.values(), *([self.affinity] if self.affinity is not None else [])]
        return sum(t.numel() * t.element_size() for t in held)

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

    def add(self, layer: str, query: torch.Tensor, key: torch.Tensor, scale: float, text_start: int = 0) -> None:
        """query [2B or B, heads, N, d] (image tokens), key [2B or B, heads, L, d] (every key the
        softmax runs over; the text tokens from `text_start`): add this step's concept probabilities."""
        batch = self.token_index.shape[0]
        query, key = query[-batch:], key[-batch:]  # the conditional half comes last
        heads, tokens = query.shape[1], query.shape[2]
        # bounded memory: the full score matrix of a large joint layer would not fit at once
        rows = max(1, QUERY_CHUNK_ELEMENTS // (batch * heads * key.shape[2]))
        parts = []
        for start in range(0, tokens, rows):
            scores = torch.matmul(query[:, :, start : start + rows], key.transpose(-1, -2)).float().mul_(scale)
            log_norm = torch.logsumexp(scores, dim=-1, keepdim=True)
            index = (self.token_index + text_start)[:, None, None, :].expand(batch, heads, scores.shape[2], -1)
            parts.append(scores.gather(-1, index).sub_(log_norm).exp_())
        probs = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
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


class SD3CaptureProcessor(JointAttnProcessor2_0):
    """SD3's joint attention (image tokens first, then text), computed as its own processor
    does; the image-query x concept-key block goes to the store."""

    def __init__(self, store: ConceptAttentionStore, layer: str):
        super().__init__()
        self.store = store
        self.layer = layer

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch, image_tokens = hidden_states.shape[:2]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = heads(attn.add_q_proj(encoder_hidden_states))
        text_key = heads(attn.add_k_proj(encoder_hidden_states))
        text_value = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, text_value], dim=2)
        if self.store.wants(self.layer, image_tokens):
            self.store.add(self.layer, query[:, :, :image_tokens], key, query.shape[-1] ** -0.5, text_start=image_tokens)

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


class FluxCaptureProcessor(FluxAttnProcessor):
    """Flux's joint attention of a double-stream block (text tokens first, then image), as its
    own processor computes it; the image-query x concept-key block goes to the store."""

    def __init__(self, store: ConceptAttentionStore, layer: str):
        super().__init__()
        self.store = store
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        text_query, text_key, text_value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value))
        text_query, text_key = attn.norm_added_q(text_query), attn.norm_added_k(text_key)
        text_tokens = encoder_hidden_states.shape[1]
        query = torch.cat([text_query, query], dim=1)
        key = torch.cat([text_key, key], dim=1)
        value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if self.store.wants(self.layer, hidden_states.shape[1]):
            self.store.add(self.layer, query[:, text_tokens:].transpose(1, 2), key.transpose(1, 2), query.shape[-1] ** -0.5)

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        encoder_hidden_states, hidden_states = out.split_with_sizes([text_tokens, out.shape[1] - text_tokens], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


def install_capture(denoiser, config: CaptureConfig, attention: str = "cross") -> ConceptAttentionStore:
    """Put capturing processors on the layers that read concept attention, keeping every
    other layer's own computation: a UNet's cross-attention (attn2), and self-attention
    (attn1) when it refines the maps; an MM-DiT's joint layers in its double-stream blocks."""
    store = ConceptAttentionStore(config)
    processors = {}
    if attention == "cross":
        captured = ("attn2", "attn1") if config.self_attention else ("attn2",)
        for name in denoiser.attn_processors:
            layer = name.removesuffix(".processor")
            processors[name] = CapturingAttnProcessor(store, layer) if layer.endswith(captured) else AttnProcessor2_0()
    else:
        joint = SD3CaptureProcessor if attention == "joint_image_first" else FluxCaptureProcessor
        for name, processor in denoiser.attn_processors.items():
            layer = name.removesuffix(".processor")
            parts = layer.split(".")
            read = parts[0] == "transformer_blocks" and parts[-1] == "attn" and \
                (config.blocks is None or int(parts[1]) in config.blocks)
            processors[name] = joint(store, layer) if read else processor
    denoiser.set_attn_processor(processors)
    return store
