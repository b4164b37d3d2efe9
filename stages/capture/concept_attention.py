"""ConceptAttention (Helbling et al., ICML 2025): concept maps in an MM-DiT's output space.

Each concept word is encoded on its own by T5 and its tokens are carried, beside the prompt,
through the double-stream blocks with the text stream's own weights (context norm and
modulation, its q/k/v and output projections, its feed-forward). Concept queries attend to
the concept and image keys; nothing attends to the concepts, so the image is what it would
have been without them.

`capture.concept_variant: reference` (the default) computes what the paper's own code does:
in each block read, a concept's map is the dot product of its attention output with every
image token's attention output, both *before* the output projections; a softmax across the
sample's concepts (its objects plus `capture.background_concepts`) is taken per block and
step, and those shares are averaged; the concept stream is modulated by the step's time
(and distilled guidance) with a zero pooled text vector. `projected` is the variant of the
paper's diffusers port: the outputs after their projections, summed over blocks and steps
before one softmax, and the concepts' own pooled text in the modulation.

`capture.concept_text: phrase` encodes a concept as its noun phrase in the prompt ("red circle")
instead of the bare word, so that objects told apart by their modifiers get apart queries.
`caption` takes the concept word's own states from the prompt's encoding, where the text encoder
has already read it beside its modifiers, instead of encoding anything again; `caption_phrase`
takes the states of its whole noun phrase there ("red" and "circle" as the prompt put them).

`capture.concept_tokens` says how a word of several T5 tokens counts: `mean` averages its
tokens' dot products into the word's logit, `each` lets every token compete in the softmax
and sums the word's shares, `first` keeps only its first token (the reference code's way).

PyTorch hooks on the transformer (for the step's timestep and guidance), on each block's
attention module (its normalised image input and its output) and on its image output
projection (that projection's input) see what the block computes; they change nothing it
returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from maskmint.schemas.config import CaptureConfig
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.capture.store import StepGate, as_grid, fold, tensor_bytes, upsample


FROM_PROMPT = ("caption", "caption_phrase")  # concept texts read from the prompt's own encoding


def word_token_positions(layout, word: str) -> list[int]:
    """Where a word encoded alone puts its own T5 tokens (specials and empty pieces left out)."""
    segment = layout.segments[-1]
    offsets = segment.tokenizer(word, return_offsets_mapping=True).offset_mapping
    return [segment.offset + i for i, (start, end) in enumerate(offsets) if end > start]


class ConceptAttentionStore:
    """The store of recipe `concept_attention`. `family` says where the double-stream blocks
    are and how a step's time (and distilled guidance) conditions them."""

    def __init__(self, pipe, family, layout, config: CaptureConfig):
        self.pipe, self.family, self.layout, self.config = pipe, family, layout, config
        self.reference = config.concept_variant == "reference"
        self.transformer = family.denoiser(pipe)
        self.blocks = family.double_stream_blocks(self.transformer)
        self.read = set(range(len(self.blocks)) if config.blocks is None else config.blocks)
        if not self.reference:  # the projected variant needs the text output projection a last SD3 block lacks
            self.read = {i for i in self.read if not getattr(self.blocks[i], "context_pre_only", False)}
        self.gate = StepGate(config)
        self.on_step_end = self.gate.on_step_end
        self.sums: torch.Tensor | None = None  # [B, K, N]: per-block shares (reference) or slot logits, summed
        self.initial: torch.Tensor | None = None
        self.state = self._image_vectors = None
        self.terms = 0
        self.copies = 1
        self.transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True)
        for index, block in enumerate(self.blocks):
            block.attn.to_out[0].register_forward_pre_hook(self._keep_image_vectors)
            block.attn.register_forward_hook(self._block_hook(index, block), with_kwargs=True)

    # -- per batch -------------------------------------------------------------------------
    @torch.no_grad()
    def begin(self, concepts: list[list[ConceptSpan]], token_index, latent_hw: tuple[int, int]) -> None:
        """Note each sample's concepts (its objects, then the background concepts). Their token
        slots are built here, or at the first denoiser call when they come from the prompt's states."""
        self.latent_hw = latent_hw
        self.concepts = concepts
        self.objects = max(len(spans) for spans in concepts)
        text = self.config.concept_text
        words = [[(s.phrase or s.word) if text == "phrase" else s.word for s in spans] for spans in concepts]
        self.pooled = None  # the reference's: zeros, made beside the concept tokens
        if not self.reference:
            background = list(self.config.background_concepts)
            _, self.pooled = self.family.encode_text(self.pipe, self.layout, [" ".join(ws + background) for ws in words])
        self.initial = None if text in FROM_PROMPT else self._concept_embeddings(words, None)
        self.sums, self.terms, self.copies = None, 0, 1
        self.gate.start()

    def _concept_embeddings(self, words: list[list[str]], prompt_states: torch.Tensor | None) -> torch.Tensor:
        """The concepts' token slots [B, S, width] after the context embedder, each slot owned by
        one concept. An object's tokens are its word encoded alone, or (prompt_states given) the
        prompt's own states at the word's (or its noun phrase's) positions; background concepts are always
        encoded alone."""
        background = list(self.config.background_concepts)
        kinds = self.objects + len(background)
        first = self.config.concept_tokens == "first"
        alone = sorted(set(background) | (set() if prompt_states is not None else {w for ws in words for w in ws}))
        embeds = self.family.encode_text(self.pipe, self.layout, alone)[0] if alone else prompt_states
        tokens_of = {}
        for row, word in enumerate(alone):
            positions = word_token_positions(self.layout, word) or [self.layout.segments[-1].offset]
            tokens_of[word] = embeds[row, positions[:1] if first else positions]
        t5 = self.layout.segments[-1].offset
        phrase = self.config.concept_text == "caption_phrase"
        per_sample = []
        for b, ws in enumerate(words):
            if prompt_states is None:
                own = [tokens_of[w] for w in ws]
            else:  # the word's (or phrase's) T5 positions, as a text encoded alone has T5 tokens only
                positions = [[i for i in ((phrase and span.phrase_positions) or span.token_positions) if i >= t5]
                             for span in self.concepts[b]]
                own = [prompt_states[b, p[:1] if first else p] for p in positions]
            per_sample.append(own + [None] * (self.objects - len(own)) + [tokens_of[w] for w in background])
        slots = max(sum(len(t) for t in ts if t is not None) for ts in per_sample)
        tokens = torch.zeros(len(words), slots, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
        self.owner = torch.zeros(len(words), slots, kinds, device=embeds.device)  # slot -> its concept
        for b, ts in enumerate(per_sample):
            s = 0
            for k, t in enumerate(ts):
                if t is not None:
                    tokens[b, s : s + len(t)], self.owner[b, s : s + len(t), k] = t, 1
                    s += len(t)
        self.valid_slot = self.owner.sum(2) > 0
        self.valid = self.owner.sum(1) > 0  # [B, K]: a padded object slot takes no part
        return self.transformer.context_embedder(tokens)

    def stack(self, copies: int) -> None:
        self.copies = copies

    def end(self) -> None:
        self.gate.stop()
        self.state = self._image_vectors = None

    # -- hooks -----------------------------------------------------------------------------
    def _on_transformer(self, module, args, kwargs):
        """A denoiser call begins: the concepts start again from their embedding, with this step's
        time (and distilled guidance) conditioning."""
        self.state = None
        if not self.gate.active:
            return None
        copies = self.copies
        if self.initial is None:  # concepts from the prompt: its states are the conditional rows' last copy
            states = kwargs["encoder_hidden_states"][-len(self.concepts):]
            words = [[s.word for s in spans] for spans in self.concepts]
            self.initial = self._concept_embeddings(words, states)
        if self.pooled is None:
            self.pooled = self.initial.new_zeros(self.initial.shape[0], self.transformer.config.pooled_projection_dim)
        rows = self.initial.shape[0] * copies
        guidance = kwargs.get("guidance")
        self.temb = self.family.time_embedding(
            self.transformer, kwargs["timestep"][-rows:].to(self.initial.dtype), self.pooled.repeat(copies, 1),
            None if guidance is None else guidance[-rows:].to(self.initial.dtype),
        )
        self.state = self.initial.repeat(copies, 1, 1)
        return None

    def _keep_image_vectors(self, projection, args):
        if self.state is not None:
            self._image_vectors = args[0]
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
        last = getattr(block, "context_pre_only", False)  # SD3's last block: its text stream ends here
        if last:
            normed = block.norm1_context(self.state, self.temb)
        else:
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
        keep = torch.cat([self.valid_slot.repeat(self.copies, 1), torch.ones(batch, image_key.shape[2], dtype=torch.bool, device=key.device)], 1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=keep[:, None, None, :])
        concept_pre = out.transpose(1, 2).flatten(2).to(query.dtype)
        if self.gate.active and index in self.read:
            if self.reference:
                dots = torch.einsum("bsd,bnd->bsn", concept_pre.float(), self._image_vectors[-batch:].float())
                shares = fold(self._shares(dots, self.copies), self.copies)
                self.sums = shares if self.sums is None else self.sums.add_(shares)
            else:
                dots = torch.einsum("bsd,bnd->bsn", attn.to_add_out(concept_pre).float(), output[0][-batch:].float())
                dots = fold(dots, self.copies)
                self.sums = dots if self.sums is None else self.sums.add_(dots)
            self.terms += self.copies
        if last:
            self.state = None
            return
        # the concept tokens' residual stream, as the block updates its text tokens
        state = self.state + gate_msa.unsqueeze(1) * attn.to_add_out(concept_pre)
        normed = block.norm2_context(state) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        self.state = state + gate_mlp.unsqueeze(1) * block.ff_context(normed)

    def _shares(self, dots: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """[B (x copies), S, N] slot logits -> [same rows, K, N]: each concept's share of every image token."""
        owner = self.owner.repeat(copies, 1, 1)
        if self.config.concept_tokens == "each":
            probs = dots.masked_fill(~self.valid_slot.repeat(copies, 1)[..., None], float("-inf")).softmax(dim=1)
            return torch.einsum("bsk,bsn->bkn", owner, probs)
        logits = torch.einsum("bsk,bsn->bkn", owner, dots) / owner.sum(1).clamp(min=1)[..., None]
        return logits.masked_fill(~self.valid.repeat(copies, 1)[..., None], float("-inf")).softmax(dim=1)

    def held_bytes(self) -> int:
        """The map accumulator and the concept tokens: constant in the number of steps."""
        return tensor_bytes(self.sums, self.initial)

    # -- result ----------------------------------------------------------------------------
    def heatmaps(self, token_weights: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] at latent size: each object's share of the sample's concepts (a concept
        carries its own tokens here, so token_weights are not needed)."""
        if self.sums is None:
            raise RuntimeError("no concept attention was read: check capture.steps and capture.blocks")
        mean = self.sums / self.terms
        probs = (mean if self.reference else self._shares(mean))[:, : self.objects]  # background concepts drop out
        return upsample(as_grid(probs, self.latent_hw), self.latent_hw).clamp_(max=1)
