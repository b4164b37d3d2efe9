"""ConceptAttention on the tiny SD3 and Flux: maskmint's store against the reference code's
math, transcribed here the plain way (every block's inputs taken from the block itself, the
image's joint attention recomputed, every softmax in float64, each sample on its own)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from maskmint.pipeline.testing.tiny_models import BUILDERS
from maskmint.schemas.config import CaptureConfig, GenerationConfig
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.families import family_of_pipeline
from maskmint.stages.generate import Generate
from maskmint.stages.tokens import token_slots
from tests.conftest import TEST_IMAGE_SIZE
from tests.test_capture import STEPS
from tests.test_dit import DEFAULT_PROCESSORS, DIT_FAMILIES, _generate_plain

# what each transformer's forward multiplies its timestep (and guidance) input by
TRANSFORMER_TIMESTEP_SCALE = {"sd3": 1.0, "flux": 1000.0}


@pytest.fixture(scope="module", params=[*DIT_FAMILIES, "flux-dev"])
def dit(request):
    """The tiny SD3, the tiny Flux (schnell-like) and a tiny Flux with dev's guidance embedding."""
    if request.param == "flux-dev":
        pipe = BUILDERS["flux"](seed=1, image_size=TEST_IMAGE_SIZE, guidance_embeds=True)
        assert pipe.transformer.config.guidance_embeds
    else:
        pipe = BUILDERS[request.param](seed=1, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return request.param.removesuffix("-dev"), pipe


def _two_object_batch(pipe):
    """Two objects in the first sample, one in the second (its second slot padded); "zebra"
    is several T5 tokens in the tiny vocabulary."""
    layout = family_of_pipeline(pipe).text_layout(pipe.components)
    prompts = ["a photo of a brown dog and a zebra in a park", "a striped zebra in a kitchen"]

    def span(prompt, word, class_id, phrase):  # phrase: the noun phrase the prompt builder records
        start = prompt.index(word)
        end = start + len(word)
        return ConceptSpan(name=word, class_id=class_id, word=word, char_span=(start, end),
                           token_positions=layout.positions(prompt, (start, end)), phrase=phrase,
                           phrase_positions=layout.positions(prompt, (end - len(phrase), end)))

    spans = [[span(prompts[0], "dog", 1, "brown dog"), span(prompts[0], "zebra", 2, "zebra")],
             [span(prompts[1], "zebra", 2, "striped zebra")]]
    tokenizer = layout.segments[-1].tokenizer
    assert len(tokenizer("zebra", add_special_tokens=False).input_ids) > 1
    return {"prompt": prompts, "negative_prompt": ["", ""], "seed": [11, 12], "concepts": spans}, layout


class ReferenceConceptAttention:
    """What ConceptAttention's own Flux code computes, in its terms: each concept is T5's
    encoding of the word alone; the concept stream is modulated by the step's time (and
    guidance) with a zero pooled vector; per double block, the concept tokens attend to
    themselves and to the image tokens; a concept's scores are its attention output (before
    the text projection) against each image token's attention output (before the image
    projection); softmax over concepts per block and step, then the mean.

    `tokens` (first / mean / each) and `variant="projected"` (after the projections, caption
    pooled vector, one softmax at the end) are maskmint's options, done the same plain way."""

    def __init__(self, pipe, concepts: list[list[str]], background: list[str], tokens="first", variant="reference",
                 prompts: list[str] | None = None):
        self.pipe, self.tokens, self.variant, self.prompts = pipe, tokens, variant, prompts
        self.objects = [len(ws) for ws in concepts]
        self.family = family_of_pipeline(pipe)
        self.layout = self.family.text_layout(pipe.components)
        self.transformer = pipe.transformer
        self.words = [ws + background for ws in concepts]
        self.maps: list[list[torch.Tensor]] = []  # per (step, block): one [words, N] per sample
        self.handles = [self.transformer.register_forward_pre_hook(self.start, with_kwargs=True)]
        for block in self.transformer.transformer_blocks:
            if variant == "reference" or not getattr(block, "context_pre_only", False):
                self.handles.append(block.register_forward_hook(self.block, with_kwargs=True))

    def word_tokens(self, word: str) -> torch.Tensor:
        t5 = self.layout.segments[-1]
        embeds, _ = self.family.encode_text(self.pipe, self.layout, [word])
        count = len(t5.tokenizer(word, add_special_tokens=False).input_ids)
        return embeds[0, t5.offset : t5.offset + (1 if self.tokens == "first" else count)]

    def caption_tokens(self, prompt: str, phrase: str) -> torch.Tensor:
        """A word's or noun phrase's T5 states inside the whole prompt's encoding (concept_text:
        caption, caption_phrase)."""
        t5 = self.layout.segments[-1]
        embeds, _ = self.family.encode_text(self.pipe, self.layout, [prompt])
        start = prompt.index(phrase)
        offsets = t5.tokenizer(prompt, return_offsets_mapping=True).offset_mapping
        hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < start + len(phrase) and b > start]
        return embeds[0, [t5.offset + i for i in (hits[:1] if self.tokens == "first" else hits)]]

    def start(self, module, args, kwargs):
        batch = len(self.words)
        self.state, self.owner = [], []
        for b, ws in enumerate(self.words):
            pieces = [self.caption_tokens(self.prompts[b], w) if self.prompts and k < self.objects[b] else self.word_tokens(w)
                      for k, w in enumerate(ws)]
            self.owner.append([k for k, piece in enumerate(pieces) for _ in range(len(piece))])
            self.state.append(self.transformer.context_embedder(torch.cat(pieces)))
        if self.variant == "reference":
            pooled = torch.zeros(batch, self.transformer.config.pooled_projection_dim)
        else:
            _, pooled = self.family.encode_text(self.pipe, self.layout, [" ".join(ws) for ws in self.words])
        scale = TRANSFORMER_TIMESTEP_SCALE[self.family.name]
        t = kwargs["timestep"][-batch:] * scale
        g = kwargs.get("guidance")
        embed = self.transformer.time_text_embed
        self.temb = embed(t, g[-batch:] * scale, pooled) if g is not None else embed(t, pooled)

    def block(self, block, args, kwargs, output):
        batch, attn = len(self.words), block.attn
        last = getattr(block, "context_pre_only", False)
        temb = kwargs["temb"][-batch:]
        norm_image = block.norm1(kwargs["hidden_states"][-batch:], emb=temb)[0]
        text = kwargs["encoder_hidden_states"][-batch:]
        norm_text = block.norm1_context(text, temb) if last else block.norm1_context(text, emb=temb)[0]
        rotary = kwargs.get("image_rotary_emb")

        def heads(x, norm=None):
            x = x.view(x.shape[0], attn.heads, -1).transpose(0, 1)  # [H, T, d]
            return x if norm is None else norm(x)

        def attend(q, k, v):
            probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            return (probs @ v.double()).transpose(0, 1).reshape(q.shape[1], -1)  # [T, H*d], float64

        maps = []
        for b in range(batch):
            # the image tokens' own joint attention over text and image keys, before its projection
            img_q, img_k, img_v = (heads(attn.to_q(norm_image[b]), attn.norm_q),
                                   heads(attn.to_k(norm_image[b]), attn.norm_k), heads(attn.to_v(norm_image[b])))
            txt_q, txt_k, txt_v = (heads(attn.add_q_proj(norm_text[b]), attn.norm_added_q),
                                   heads(attn.add_k_proj(norm_text[b]), attn.norm_added_k), heads(attn.add_v_proj(norm_text[b])))
            if rotary is not None:  # Flux: text first, one rotation table over the whole sequence
                q, k = torch.cat([txt_q, img_q], 1), torch.cat([txt_k, img_k], 1)
                q = apply_rotary_emb(q[None], rotary, sequence_dim=2)[0]
                k = apply_rotary_emb(k[None], rotary, sequence_dim=2)[0]
                n_txt = txt_q.shape[1]
                img_q, img_k, txt_k = q[:, n_txt:], k[:, n_txt:], k[:, :n_txt]
            image_pre = attend(img_q, torch.cat([txt_k, img_k], 1), torch.cat([txt_v, img_v], 1))
            image_vectors = image_pre if self.variant == "reference" else attn.to_out[0](image_pre.float()).double()

            state = self.state[b][None]
            if last:
                normed = block.norm1_context(state, self.temb[b : b + 1])
            else:
                normed, gate, shift, scale, gate_mlp = block.norm1_context(state, emb=self.temb[b : b + 1])
            c_q, c_k, c_v = (heads(attn.add_q_proj(normed[0]), attn.norm_added_q),
                             heads(attn.add_k_proj(normed[0]), attn.norm_added_k), heads(attn.add_v_proj(normed[0])))
            concept_pre = attend(c_q, torch.cat([c_k, img_k], 1), torch.cat([c_v, img_v], 1))
            concept_vectors = concept_pre if self.variant == "reference" else attn.to_add_out(concept_pre.float()).double()
            maps.append(concept_vectors @ image_vectors.T)  # [tokens, N]
            if not last:
                state = state + gate.unsqueeze(1) * attn.to_add_out(concept_pre.float())[None]
                normed = block.norm2_context(state) * (1 + scale[:, None]) + shift[:, None]
                self.state[b] = (state + gate_mlp.unsqueeze(1) * block.ff_context(normed))[0]
        self.maps.append(maps)

    def shares(self, scores: torch.Tensor, owner: list[int]) -> torch.Tensor:
        """[tokens, N] -> [words, N]."""
        words = max(owner) + 1
        if self.tokens == "each":
            probs = torch.softmax(scores, dim=0)
            return torch.stack([sum(probs[s] for s in range(len(owner)) if owner[s] == k) for k in range(words)])
        logits = torch.stack([scores[[s for s in range(len(owner)) if owner[s] == k]].mean(0) for k in range(words)])
        return torch.softmax(logits, dim=0)

    def heatmaps(self, objects: int, latent: int, background: int = 1) -> np.ndarray:
        for handle in self.handles:
            handle.remove()
        result = np.zeros((len(self.words), objects, latent, latent))
        for b, ws in enumerate(self.words):
            if self.variant == "reference":
                probs = torch.stack([self.shares(step[b], self.owner[b]) for step in self.maps]).mean(0)
            else:
                probs = self.shares(torch.stack([step[b] for step in self.maps]).mean(0), self.owner[b])
            side = int(math.isqrt(probs.shape[1]))
            for k in range(len(ws) - background):  # the background words drop out
                grid = probs[k].float().reshape(1, 1, side, side)
                result[b, k] = F.interpolate(grid, size=(latent, latent), mode="bicubic", align_corners=False).clamp(0, 1)[0, 0]
        return result


def _captured_and_reference(dit, tokens: str, variant: str, text: str = "word"):
    name, pipe = dit
    batch, layout = _two_object_batch(pipe)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    plain, _ = _generate_plain(name, pipe, batch, layout, lambda layer, log: DEFAULT_PROCESSORS[name]())
    concepts = [[s.phrase if text in ("phrase", "caption_phrase") else s.word for s in spans] for spans in batch["concepts"]]
    prompts = batch["prompt"] if text in ("caption", "caption_phrase") else None
    reference = ReferenceConceptAttention(pipe, concepts, ["background"], tokens, variant, prompts)
    reference_image, _ = _generate_plain(name, pipe, batch, layout, lambda layer, log: DEFAULT_PROCESSORS[name]())
    expected = reference.heatmaps(2, latent)
    generate = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig(
        recipe="concept_attention", concept_tokens=tokens, concept_variant=variant, concept_text=text))
    out = generate(batch)
    captured = generate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()
    blocks_read = len(reference.handles) - 1
    assert len(reference.maps) == STEPS * blocks_read
    np.testing.assert_array_equal(out["image"], plain)  # the concept tokens change nothing in the image
    np.testing.assert_array_equal(reference_image, plain)
    return name, captured, expected


@pytest.mark.parametrize("tokens", ["first", "mean", "each"])
def test_concept_attention_is_the_reference_codes_math(dit, tokens):
    name, captured, expected = _captured_and_reference(dit, tokens, "reference")
    assert expected[:, 0].max() - expected[:, 0].min() > 1e-3  # the maps are not flat
    assert np.all(expected[1, 1] == 0) and np.all(captured[1, 1] == 0)  # the padded slot stays empty
    r = np.corrcoef(captured[[0, 0, 1], [0, 1, 0]].ravel(), expected[[0, 0, 1], [0, 1, 0]].ravel())[0, 1]
    assert r >= 0.999, r
    np.testing.assert_allclose(captured, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", ["mean", "each"])
def test_phrase_concepts_are_the_reference_math_over_the_prompts_noun_phrases(dit, tokens):
    """concept_text: phrase: the concept stream carries "brown dog" and "striped zebra", and the
    maps are the reference's over those texts, not the bare words' maps."""
    name, captured, expected = _captured_and_reference(dit, tokens, "reference", "phrase")
    np.testing.assert_allclose(captured, expected, rtol=1e-4, atol=1e-5)
    _, words, _ = _captured_and_reference(dit, tokens, "reference", "word")
    assert np.abs(captured - words).max() > 1e-3


@pytest.mark.parametrize(("tokens", "text"), [("first", "caption"), ("mean", "caption"), ("mean", "caption_phrase")])
def test_caption_concepts_are_the_reference_math_over_the_prompts_own_states(dit, tokens, text):
    """concept_text: caption: the concept stream starts from the prompt's own T5 states at the
    word ("zebra" is several tokens; "dog" is read beside "brown"), caption_phrase at the whole
    noun phrase ("brown dog"), and the maps are the reference's over those states, not those of
    the word encoded alone."""
    name, captured, expected = _captured_and_reference(dit, tokens, "reference", text)
    assert expected[:, 0].max() - expected[:, 0].min() > 1e-3
    np.testing.assert_allclose(captured, expected, rtol=1e-4, atol=1e-5)
    _, words, _ = _captured_and_reference(dit, tokens, "reference", "word")
    assert np.abs(captured - words).max() > 1e-3


def test_caption_concepts_need_no_background_concepts(dit):
    """With `background_concepts: []` nothing is encoded alone: the objects split every pixel
    between them, and a sample's only object takes all of it."""
    name, pipe = dit
    batch, _ = _two_object_batch(pipe)
    generate = Generate(pipe, GenerationConfig(steps=2), CaptureConfig(
        recipe="concept_attention", concept_text="caption", background_concepts=[]))
    generate(batch)
    maps = generate.store.heatmaps(token_slots(batch["concepts"])[1])
    assert maps[0].std() > 1e-3  # two objects compete
    torch.testing.assert_close(maps[1, 0], torch.ones_like(maps[1, 0]))
    assert torch.all(maps[1, 1] == 0)


def test_the_projected_variant_is_its_own_slow_reference(dit):
    name, captured, expected = _captured_and_reference(dit, "mean", "projected")
    assert expected[:, 0].max() - expected[:, 0].min() > 1e-3
    np.testing.assert_allclose(captured, expected, rtol=1e-4, atol=1e-5)


def test_concept_attention_softmax_shares_each_pixel(dit):
    """Objects and background concepts split every pixel: the objects' maps sum to at most 1."""
    name, pipe = dit
    batch, _ = _two_object_batch(pipe)
    for tokens in ("mean", "each"):
        generate = Generate(pipe, GenerationConfig(steps=2), CaptureConfig(
            recipe="concept_attention", concept_tokens=tokens, background_concepts=["background", "scene"]))
        generate(batch)
        maps = generate.store.heatmaps(token_slots(batch["concepts"])[1])
        assert maps.shape[1] == 2
        assert torch.all(maps.sum(1) <= 1 + 1e-3) and torch.all(maps >= 0)
        assert torch.all(maps[1, 1] == 0)  # the second sample has one object: its padded slot is empty
