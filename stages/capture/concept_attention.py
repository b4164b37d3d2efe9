"""ConceptAttention (Helbling et al., ICML 2025): concept maps in an MM-DiT's output space.

Each concept word is encoded on its own (the first T5 token of the word), projected like the
prompt's tokens, and carried through the double-stream blocks with the text stream's own
weights (context norm and modulation, its q/k/v and output projections, its feed-forward).
Concept queries attend to the concept and image keys; nothing attends to the concepts, so
the image is what it would have been without them. In each block read, the map of a concept
is the dot product of its attention output with every image token's attention output; the
maps are summed over the blocks and steps read, averaged, and a softmax across the sample's
concepts (its objects plus `capture.background_concepts`) makes them compete per pixel.

PyTorch forward hooks on the transformer (for the step's timestep and guidance) and on each
double-stream block's attention module (for its normalised image input and its output) see
what the block computes; they change nothing it returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from maskmint.schemas.config import CaptureConfig
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.capture.store import StepGate, as_grid, tensor_bytes, upsample


class ConceptAttentionStore:
    """The store of recipe `concept_attention`. `family` says where the double-stream blocks
    are and how a step's time (and distilled guidance) conditions them."""

    def __init__(self, pipe, family, layout, config: CaptureConfig):
        self.pipe, self.family, self.layout, self.config = pipe, family, layout, config
        self.transformer = family.denoiser(pipe)
        self.blocks = family.double_stream_blocks(self.transformer)
        self.read = set(range(len(self.blocks)) if config.blocks is None else config.blocks)
        self.gate = StepGate(config)
        self.on_step_end = self.gate.on_step_end
        self.sums: torch.Tensor | None = None  # [B, K, N]: concept x image-token dot products, summed
        self.initial: torch.Tensor | None = None
        self.terms = 0
        self.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)
        for index, block in enumerate(self.blocks):
            block.attn.register_forward_hook(self._block_hook(index, block), with_kwargs=True)

    # -- per batch -------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, concepts: list[list[ConceptSpan]], token_index, latent_hw: tuple[int, int]) -> None:
        """Encode each sample's concepts (its objects, then the background concepts); token
        positions in the prompt are not needed here."""
        self.latent_hw = latent_hw
        self.objects = max(len(spans) for spans in concepts)
        background = list(self.config.background_concepts)
        words = [[s.word for s in spans] for spans in concepts]
        kinds = self.objects + len(background)
        unique = sorted({w for ws in words for w in ws} | set(background))
        embeds, _ = self.family.encode_text(self.pipe, self.layout, unique)
        first_t5 = self.layout.segments[-1].offset
        token_of = dict(zip(unique, embeds[:, first_t5]))
        width = embeds.shape[-1]
        tokens = torch.zeros(len(concepts), kinds, width, dtype=embeds.dtype, device=embeds.device)
        self.valid = torch.zeros(len(concepts), kinds, dtype=torch.bool, device=embeds.device)
        for b, ws in enumerate(words):
            for k, word in enumerate(ws + [None] * (self.objects - len(ws)) + background):
                if word is not None:
                    tokens[b, k], self.valid[b, k] = token_of[word], True
        _, self.pooled = self.family.encode_text(self.pipe, self.layout, [" ".join(ws + background) for ws in words])
        self.initial = self.transformer.context_embedder(tokens)
        self.sums, self.terms = None, 0
        self.gate.start()

    def end(self) -> None:
        self.gate.stop()
        self.state = None

    # -- hooks -----------------------------------------------------------------------------
    def _on_transformer(self, module, args, kwargs):
        """A denoiser call begins: the concepts start again from their embedding, with this step's
        time (and distilled guidance) conditioning and the concepts' own pooled text."""
        self.state = None
        if not self.gate.active:
            return None
        batch = self.initial.shape[0]
        guidance = kwargs.get("guidance")
        self.temb = self.family.time_embedding(
            self.transformer, kwargs["timestep"][-batch:].to(self.initial.dtype), self.pooled,
            None if guidance is None else guidance[-batch:].to(self.initial.dtype),
        )
        self.state = self.initial
        return None

    def _block_hook(self, index: int, block):
        def hook(attn, args, kwargs, output):
            if self.state is not None:
                self._advance(index, block, attn, kwargs, output)
            return None

        return hook

    def _advance(self, index: int, block, attn, kwargs: dict, output) -> None:
        batch = self.state.shape[0]
        image_in = kwargs["hidden_states"][-batch:]  # the block's normalised image tokens, conditional half
        image_out = output[0][-batch:]
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(self.state, emb=self.temb)
        heads = attn.heads

        def split(x, norm=None):
            x = x.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, T, d]
            return x if norm is None else norm(x)

        query = split(attn.add_q_proj(normed), attn.norm_added_q)
        concept_key, concept_value = split(attn.add_k_proj(normed), attn.norm_added_k), split(attn.add_v_proj(normed))
        image_key, image_value = split(attn.to_k(image_in), attn.norm_k), split(attn.to_v(image_in))
        rotary = kwargs.get("image_rotary_emb")
        if rotary is not None:  # image tokens keep their positions; concepts sit at position 0 (no rotation)
            tokens = image_key.shape[2]
            image_key = apply_rotary_emb(image_key, tuple(r[-tokens:] for r in rotary), sequence_dim=2)
        key, value = torch.cat([concept_key, image_key], 2), torch.cat([concept_value, image_value], 2)
        keep = torch.cat([self.valid, torch.ones(batch, image_key.shape[2], dtype=torch.bool, device=key.device)], 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep[:, None, None, :])
        concept_out = attn.to_add_out(out.transpose(1, 2).flatten(2).to(query.dtype))
        if self.gate.active and index in self.read:
            dots = torch.einsum("bkd,bnd->bkn", concept_out.float(), image_out.float())
            self.sums = dots if self.sums is None else self.sums.add_(dots)
            self.terms += 1
        # the concept tokens' residual stream, as the block updates its text tokens
        state = self.state + gate_msa.unsqueeze(1) * concept_out
        normed = block.norm2_context(state) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        self.state = state + gate_mlp.unsqueeze(1) * block.ff_context(normed)

    def held_bytes(self) -> int:
        """The map accumulator and the concept tokens: constant in the number of steps."""
        return tensor_bytes(self.sums, self.initial)

    # -- result ----------------------------------------------------------------------------
    def heatmaps(self, token_weights: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] at latent size: each object's share of the softmax over the sample's
        concepts (a concept is one token here, so token_weights are not needed)."""
        if self.sums is None:
            raise RuntimeError("no concept attention was read: check capture.steps and capture.blocks")
        logits = (self.sums / self.terms).masked_fill(~self.valid[..., None], float("-inf"))
        probs = logits.softmax(dim=1)[:, : self.objects]  # background concepts compete, then drop out
        return upsample(as_grid(probs, self.latent_hw), self.latent_hw).clamp_(max=1)
