"""Attention processors that feed the `cross` recipe's store, each computing its layer's
output as diffusers' own processor does (scaled_dot_product_attention), so what the model
makes does not change. Which one a denoiser gets is its family's choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from maskmint.stages.capture.cross import CrossAttentionStore


class UNetCaptureProcessor(AttnProcessor2_0):
    """SDPA attention that also hands the concept columns of cross-attention (or, on a
    self-attention layer, its affinity) to the store."""

    def __init__(self, store: CrossAttentionStore, layer: str):
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


class SD3JointCaptureProcessor(JointAttnProcessor2_0):
    """SD3's joint attention (image tokens first, then text), computed as its own processor
    does; the image-query x concept-key block goes to the store."""

    def __init__(self, store: CrossAttentionStore, layer: str):
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


class FluxJointCaptureProcessor(FluxAttnProcessor):
    """Flux's joint attention of a double-stream block (text tokens first, then image), as its
    own processor computes it; the image-query x concept-key block goes to the store."""

    def __init__(self, store: CrossAttentionStore, layer: str):
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


def install(denoiser, processor_for) -> None:
    """Set every attention layer's processor: `processor_for(layer, current)` returns the
    capturing one for a layer that is read, and the layer's own otherwise."""
    denoiser.set_attn_processor({
        name: processor_for(name.removesuffix(".processor"), processor)
        for name, processor in denoiser.attn_processors.items()
    })
