"""Train a Flux- or SD3-shaped MM-DiT on the toy world, so the DiT recipes are scored, not assumed.

    python -m bench.train_toy_dit --vae assets/tiny-sd --out assets/toy-flux     # about an hour on 2 CPU cores
    python -m bench.train_toy_dit --family sd3 --double-blocks 6 --out DIR/toy-sd3

The model is a standard diffusers pipeline folder, so maskmint runs it by the code path the
real family takes. `flux` (FluxPipeline, Flux.1-schnell shaped: no guidance embedding, no
unconditional batch): joint attention with the T5 text tokens first, 2x2-packed latents,
FluxInpaintPipeline for removal. `sd3` (StableDiffusion3Pipeline): two CLIP encoders and T5,
image tokens first, the last block's text stream attention-only, and SD3's 16 latent
channels (the toy VAE widened with channels that stay zero). Both reuse the VAE of a trained
toy SD folder (frozen; given a zero shift, as the MM-DiT VAEs have one) and train the text
encoders and the transformer jointly by rectified flow: x_t = (1 - s) x0 + s e, the
transformer predicting e - x0 at s drawn logit-normally, as SD3 and Flux are trained.
Captions name every object of the multi-object toy world; a share of object-free scenes
teaches the background prompts that removal asks for. Checkpoints (OUT.ckpt.pt) let an
interrupted run continue; OUT/training.json records how the weights were made.

--word-attention W adds W x two cross-entropies on the joint attention of every joint block
(head means, each softmax renormalised over one side's keys): each image token's attention
over the text should fall on its own object's colour and shape words (or the background's
words), split by the exact mask's area shares; and each such word's attention over the image
should fall on its object's tokens, by area. Both are weighted by how clean the input is (1 - s). The
raw diffusion loss alone left this small model's attention unrelated to where objects are;
this is the toy's stand-in for what scale teaches real MM-DiTs. --scene-pool N encodes N
scenes once and draws from them: the frozen VAE's encoder otherwise costs more per step
than the transformer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from bench.toyworld import BACKGROUND_KINDS, BACKGROUND_TONES, SHAPES, SIZE, WORDS, render_scene
from bench.train_toy_model import MAX_TOKENS, build_text_encoder, caption_ids, train_denoiser
from bench.training import Checkpoint, log, open_checkpoint, parse_with_run_arguments, read_provenance, write_provenance
from maskmint.pipeline.testing.tiny_models import _t5_encoder, _text_config, build_t5_tokenizer, build_tokenizer


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # the MM-DiT pipelines subtract a shift; the toy VAE's is zero
    return vae.eval().requires_grad_(False)


def widen_vae(vae, channels: int):
    """The same autoencoder with `channels` latent channels: the trained ones first, the rest
    always zero (mean zero, posterior spread e^-15), so decoding ignores them. SD3's
    pipelines, its inpainting one above all, accept only SD3's 16-channel latents."""
    from diffusers import AutoencoderKL

    old, narrow = vae.state_dict(), vae.config.latent_channels
    wide = AutoencoderKL.from_config({**vae.config, "latent_channels": channels})
    state = {k: torch.zeros_like(v) for k, v in wide.state_dict().items()}
    moments = [*range(narrow), *range(channels, channels + narrow)]  # where (mean, log-variance) rows go
    for name, tensor in old.items():
        if name.startswith(("encoder.conv_out", "quant_conv")):  # outputs are (mean, log-variance)
            rows = state[name][moments]
            if name.startswith("quant_conv") and tensor.dim() > 1:
                rows[:, moments] = tensor
            else:
                rows[:] = tensor
            state[name][moments] = rows
        elif name.startswith("post_quant_conv"):
            state[name][tuple(slice(0, narrow) for _ in range(min(tensor.dim(), 2)))] = tensor
        elif name == "decoder.conv_in.weight":
            state[name][:, :narrow] = tensor
        else:
            state[name] = tensor
    last = "quant_conv.bias" if "quant_conv.bias" in state else "encoder.conv_out.bias"
    state[last][channels + narrow:] = -30.0  # the padding channels' log-variance
    wide.load_state_dict(state)
    return wide.eval().requires_grad_(False)


def make_pooled_constant(text_encoder) -> None:
    """Zero the CLIP encoder's final norm gain, so its pooled vector is the same for every caption.

    The pooled vector modulates every block; when it carries the caption, the transformer can
    draw the right objects without its joint attention ever tying a word to a place. Made
    constant in the weights, the shipped folder keeps that property under any pipeline.
    """
    norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
    with torch.no_grad():
        norm.weight.zero_()
    norm.weight.requires_grad_(False)


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents as Flux's token sequence (2x2 patches) and the tokens' (t, y, x) position ids."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    tokens = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return tokens, ids


PATCH_PIXELS = 8  # one packed token: 2 x 2 latents of the 4x VAE
BACKGROUND_WORDS = {"background", *BACKGROUND_KINDS, *BACKGROUND_TONES}


def token_words(tokenizer, token_ids: list[int]) -> list[str]:
    """The words a text sequence's tokens spell (T5's and CLIP's word markers dropped); every
    toy-world word is one token in both tokenizers."""
    return [t.removeprefix("\u2581").removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(token_ids)]


def word_shares(scene, words: list[str]) -> torch.Tensor:
    """[image tokens, text] each image token's area share of every object (and of the
    background), spread evenly over that object's own words (colour and shape) in the caption."""
    grid = scene.mask.shape[0] // PATCH_PIXELS
    shares = torch.zeros(grid * grid, len(words))
    owners = [(0, BACKGROUND_WORDS)] + [(SHAPES[shape], {colour, shape}) for colour, shape in scene.objects]
    for class_id, names in owners:
        share = (scene.mask == class_id).reshape(grid, PATCH_PIXELS, grid, PATCH_PIXELS).mean(axis=(1, 3))
        slots = [i for i, w in enumerate(words) if w in names]
        if slots:
            shares[:, slots] += torch.from_numpy(share.reshape(-1)).float()[:, None] / len(slots)
    return shares


def word_targets(scene, words: list[str]) -> torch.Tensor:
    """[image tokens, text]: where each image token's attention over the text should fall."""
    shares = word_shares(scene, words)
    return shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-6)


def place_targets(scene, words: list[str]) -> torch.Tensor:
    """[text, image tokens]: where each object word's attention over the image should fall (its
    object's tokens, by area); rows of words that name nothing in view are zero."""
    shares = word_shares(scene, words).T
    return shares / shares.sum(dim=1, keepdim=True).clamp_min(1e-6)


def keep_word_attention(kept: list, query, key, text_query, text_key) -> None:
    """Head means of the image-to-text and text-to-image attention ([B, tokens, heads, dim]
    inputs), each softmax over one side's keys: [B, image, text] and [B, text, image]."""
    scale = query.shape[-1] ** -0.5
    image_to_text = torch.einsum("bihd,bthd->bhit", query, text_key) * scale
    text_to_image = torch.einsum("bthd,bihd->bhti", text_query, key) * scale
    kept.append((image_to_text.softmax(dim=-1).mean(dim=1), text_to_image.softmax(dim=-1).mean(dim=1)))


class FluxWordAttentionProbe(FluxAttnProcessor):
    """Flux's own joint attention that also keeps the image-text scores (with their gradient),
    so the training loss can ask each image token to attend to its object's words."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            query, key, _, text_query, text_key, _ = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
            query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
            key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
            text_query = attn.norm_added_q(text_query.unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(text_key.unflatten(-1, (-1, attn.head_dim)))
            text = encoder_hidden_states.shape[1]
            cos, sin = image_rotary_emb
            image_rope, text_rope = (cos[text:], sin[text:]), (cos[:text], sin[:text])
            query, key = (apply_rotary_emb(x, image_rope, sequence_dim=1) for x in (query, key))
            text_query, text_key = (apply_rotary_emb(x, text_rope, sequence_dim=1) for x in (text_query, text_key))
            keep_word_attention(self.kept, query, key, text_query, text_key)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


class SD3WordAttentionProbe(JointAttnProcessor2_0):
    """SD3's own joint attention (no rotary embedding; image tokens first) that also keeps the
    image-text scores, as the Flux probe does."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is not None:
            def heads(projection, states, norm):
                x = projection(states).unflatten(-1, (attn.heads, -1))
                return norm(x) if norm is not None else x

            keep_word_attention(self.kept, heads(attn.to_q, hidden_states, attn.norm_q),
                                heads(attn.to_k, hidden_states, attn.norm_k),
                                heads(attn.add_q_proj, encoder_hidden_states, attn.norm_added_q),
                                heads(attn.add_k_proj, encoder_hidden_states, attn.norm_added_k))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def draw_scenes(rng: np.random.Generator, size: int, empty_share: float) -> list:
    """Toy-world scenes; a share of them without any object."""
    return [render_scene(rng, n_objects=0 if rng.random() < empty_share else None) for _ in range(size)]


def encode_scenes(vae, scenes, generator: torch.Generator | None = None) -> torch.Tensor:
    """The VAE's latents of the scenes (a sample of each one's posterior, or its mean without a generator)."""
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    return posterior.sample(generator) if generator is not None else torch.cat([posterior.mean, posterior.std], dim=1)


class ScenePool:
    """A fixed set of scenes encoded once (posterior mean and spread), drawn from with a fresh
    posterior sample each time: the frozen VAE's encoder otherwise costs more than the
    transformer's whole step. Built from its own seed, so a resumed run draws the same pool."""

    def __init__(self, vae, size: int, empty_share: float, seed: int, handle):
        self.scenes = draw_scenes(np.random.default_rng([seed, 1]), size, empty_share)
        self.moments = torch.cat([encode_scenes(vae, self.scenes[i:i + 256]) for i in range(0, size, 256)])
        log(f"scene pool: {size} scenes encoded", handle)

    def draw(self, rng: np.random.Generator, batch: int, generator: torch.Generator):
        chosen = rng.integers(len(self.scenes), size=batch)
        mean, std = self.moments[chosen].chunk(2, dim=1)
        return [self.scenes[i] for i in chosen], mean + std * torch.randn(mean.shape, generator=generator)


class ToyFlux:
    """Flux.1-schnell shaped: CLIP gives the pooled vector, T5 the text tokens, which come
    first in the joint sequence; latents are packed 2x2 into tokens with rotary positions."""

    name, pipeline = "toy Flux", "FluxPipeline"

    def tokenizers(self) -> tuple:
        return build_tokenizer(WORDS, MAX_TOKENS), build_t5_tokenizer(WORDS, MAX_TOKENS)

    def build(self, tokenizers, args, vae) -> dict:
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(args.seed)
        head_dim = args.width // args.heads
        rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)  # (t, y, x), even, summing to head_dim
        text_encoder = build_text_encoder(tokenizers[0])
        text_encoder_2 = _t5_encoder(tokenizers[1], 64, 4)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=args.double_blocks, num_single_layers=args.single_blocks,
            attention_head_dim=head_dim, num_attention_heads=args.heads, joint_attention_dim=64,
            pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=rope,
        )
        return {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "transformer": transformer, "vae": vae}

    def vae(self, folder: Path):
        return load_vae(folder)

    def pooled_encoders(self, models: dict) -> list:
        return [models["text_encoder"]]

    def load(self, folder: Path) -> tuple[tuple, dict]:
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
        return (pipe.tokenizer, pipe.tokenizer_2), {k: getattr(pipe, k) for k in ("text_encoder", "text_encoder_2", "transformer", "vae")}

    def encode(self, models: dict, tokenizers, captions: list[str]):
        pooled = models["text_encoder"](caption_ids(tokenizers[0], captions)).pooler_output
        states = models["text_encoder_2"](caption_ids(tokenizers[1], captions)).last_hidden_state
        return states, pooled

    def text_words(self, tokenizers, captions: list[str]) -> list[list[str]]:
        return [token_words(tokenizers[1], row) for row in caption_ids(tokenizers[1], captions).tolist()]

    def tokens(self, latents: torch.Tensor):
        return pack(latents)

    def predict(self, transformer, noisy, sigmas, states, pooled, image_ids):
        return transformer(hidden_states=noisy, timestep=sigmas, pooled_projections=pooled, encoder_hidden_states=states,
                           txt_ids=torch.zeros(states.shape[1], 3), img_ids=image_ids).sample

    def probe(self, kept: list):
        return FluxWordAttentionProbe(kept)

    def plain_processor(self):
        return FluxAttnProcessor()

    def save(self, out: Path, models: dict, tokenizers) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(
            transformer=models["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=models["vae"],
            text_encoder=models["text_encoder"], tokenizer=tokenizers[0],
            text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizers[1],
        )
        pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)  # small files; loading upcasts
        pipe.to(torch.float32)


class ToySD3(ToyFlux):
    """SD3 shaped: two CLIP encoders (penultimate states side by side, pooled vectors
    concatenated) and T5, the CLIP tokens then T5's after the image tokens in the joint
    sequence; 16-channel latents in 2x2 patches with learned positions; the last block's text
    stream only feeds attention (`context_pre_only`). The text goes through the pipeline's own
    `encode_prompt`, so training conditions the model exactly as maskmint will."""

    name, pipeline = "toy SD3", "StableDiffusion3Pipeline"
    TEXT_WIDTH = 64  # each CLIP encoder; T5 is twice as wide, the two CLIPs' states side by side

    def tokenizers(self) -> tuple:
        return build_tokenizer(WORDS, MAX_TOKENS), build_tokenizer(WORDS, MAX_TOKENS), build_t5_tokenizer(WORDS, MAX_TOKENS)

    def build(self, tokenizers, args, vae) -> dict:
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        torch.manual_seed(args.seed)
        clip = [CLIPTextModelWithProjection(_text_config(tokenizers[0], self.TEXT_WIDTH, 4, MAX_TOKENS)) for _ in range(2)]
        latent = SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
        transformer = SD3Transformer2DModel(
            sample_size=latent, patch_size=2, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, num_layers=args.double_blocks,
            attention_head_dim=args.width // args.heads, num_attention_heads=args.heads,
            joint_attention_dim=2 * self.TEXT_WIDTH, caption_projection_dim=args.width,
            pooled_projection_dim=2 * self.TEXT_WIDTH, pos_embed_max_size=latent // 2,
        )
        return {"text_encoder": clip[0], "text_encoder_2": clip[1],
                "text_encoder_3": _t5_encoder(tokenizers[2], 2 * self.TEXT_WIDTH, 4), "transformer": transformer, "vae": vae}

    def vae(self, folder: Path):
        return widen_vae(load_vae(folder), 16)

    def pooled_encoders(self, models: dict) -> list:
        return [models["text_encoder"], models["text_encoder_2"]]

    def load(self, folder: Path) -> tuple[tuple, dict]:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
        names = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
        return (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), {k: getattr(pipe, k) for k in names}

    def pipe(self, models: dict, tokenizers):
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=models["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=models["vae"],
            text_encoder=models["text_encoder"], tokenizer=tokenizers[0],
            text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizers[1],
            text_encoder_3=models["text_encoder_3"], tokenizer_3=tokenizers[2],
        )

    def encode(self, models: dict, tokenizers, captions: list[str]):
        states, _, pooled, _ = self.pipe(models, tokenizers).encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=tokenizers[2].model_max_length)
        return states, pooled

    def text_words(self, tokenizers, captions: list[str]) -> list[list[str]]:
        clip, t5 = (caption_ids(tokenizers[i], captions).tolist() for i in (0, 2))
        return [token_words(tokenizers[0], a) + token_words(tokenizers[2], b) for a, b in zip(clip, t5)]

    def tokens(self, latents: torch.Tensor):
        return latents, None

    def predict(self, transformer, noisy, sigmas, states, pooled, image_ids):
        # SD3's pipelines give the transformer the scheduler's timesteps: sigma x 1000
        return transformer(hidden_states=noisy, timestep=sigmas * 1000, encoder_hidden_states=states,
                           pooled_projections=pooled).sample

    def probe(self, kept: list):
        return SD3WordAttentionProbe(kept)

    def plain_processor(self):
        return JointAttnProcessor2_0()

    def save(self, out: Path, models: dict, tokenizers) -> None:
        pipe = self.pipe(models, tokenizers)
        pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
        pipe.to(torch.float32)


FAMILIES = {"flux": ToyFlux(), "sd3": ToySD3()}


def load_models(folder: Path):
    """(tokenizers, models) of a saved toy folder, whichever family it is."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return next(f for f in FAMILIES.values() if f.pipeline == index["_class_name"]).load(Path(folder))


def train(family, models: dict, tokenizers, args, rng, handle, checkpoint: Checkpoint) -> None:
    transformer, vae = models["transformer"], models["vae"]
    kept: list[torch.Tensor] = []
    word_losses: list[float] = []
    if args.word_attention:
        transformer.set_attn_processor(family.probe(kept))

    pool = ScenePool(vae, args.scene_pool, args.empty_share, args.seed, handle) if args.scene_pool else None

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        if pool is not None:
            scenes, latents = pool.draw(rng, args.batch, generator)
        else:
            scenes = draw_scenes(rng, args.batch, args.empty_share)
            latents = encode_scenes(vae, scenes, generator)
        captions = [s.caption for s in scenes]
        latents = latents * vae.config.scaling_factor
        tokens, image_ids = family.tokens(latents)
        noise = torch.randn(tokens.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(args.batch, generator=generator)).view(-1, *[1] * (tokens.dim() - 1))
        noisy = (1 - sigmas) * tokens + sigmas * noise
        states, pooled = family.encode(models, tokenizers, captions)
        prediction = family.predict(transformer, noisy, sigmas.flatten(), states, pooled, image_ids)
        loss = F.mse_loss(prediction, noise - tokens)
        if kept:
            words = family.text_words(tokenizers, captions)
            to_words = torch.stack([word_targets(s, w) for s, w in zip(scenes, words)])
            to_places = torch.stack([place_targets(s, w) for s, w in zip(scenes, words)])
            named = to_places.sum(-1)  # 1 for a word that names something in view, else 0
            # where the image is mostly noise its layout is not yet decided: ask less there
            clean = (1 - sigmas.flatten())[:, None]

            def cross_entropy(targets, probs, weight):
                return -(targets * probs.clamp_min(1e-6).log()).sum(-1).mul(weight).sum() / weight.sum().clamp_min(1e-6)

            attended = sum(cross_entropy(to_words, words_of, clean.expand(-1, to_words.shape[1]))
                           + cross_entropy(to_places, places_of, clean * named) for words_of, places_of in kept) / len(kept)
            kept.clear()
            loss = loss + args.word_attention * attended
            word_losses.append(attended.item())
            if len(word_losses) == 100:
                log(f"word-attention loss {np.mean(word_losses):.4f} (last 100 batches)", handle)
                word_losses.clear()
        return loss

    trained = [m for name, m in models.items() if name != "vae"]
    train_denoiser("transformer", trained, args.steps, args.lr, rng, handle, checkpoint, batch_loss)
    transformer.set_attn_processor(family.plain_processor())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="flux")
    parser.add_argument("--out", type=Path, default=Path("assets/toy-flux"))
    parser.add_argument("--vae", type=Path, default=Path("assets/tiny-sd"),
                        help="a trained toy SD folder whose VAE is reused, frozen")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=128, help="transformer hidden size")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double-blocks", type=int, default=4, help="Flux's double-stream blocks, or SD3's joint blocks")
    parser.add_argument("--single-blocks", type=int, default=2, help="Flux's single-stream blocks (SD3 has none)")
    parser.add_argument("--empty-share", type=float, default=0.25,
                        help="share of object-free scenes: removal asks the model for exactly those")
    parser.add_argument("--pooled", choices=("caption", "constant"), default="constant",
                        help="constant: the CLIP pooled vector is the same for every caption, so only the "
                             "joint attention can carry the words")
    parser.add_argument("--scene-pool", type=int, default=0,
                        help="draw from this many scenes encoded once (0: fresh scenes every step)")
    parser.add_argument("--word-attention", type=float, default=0.0,
                        help="weight of a loss asking each image token's attention over the text (joint "
                             "blocks, head mean) to fall on its own object's words, from the exact masks")
    parser.add_argument("--resume", type=Path, default=None, help="continue from a saved toy folder of the same family")
    args = parse_with_run_arguments(parser, argv)
    family = FAMILIES[args.family]
    rng = np.random.default_rng(args.seed)
    if args.resume:
        tokenizers, models = family.load(args.resume)
    else:
        tokenizers = family.tokenizers()
        models = family.build(tokenizers, args, family.vae(args.vae))
    if args.pooled == "constant":
        for encoder in family.pooled_encoders(models):
            make_pooled_constant(encoder)
    checkpoint, log_path = open_checkpoint(args, models, rng)
    with open(log_path, "a" if checkpoint.state else "w") as handle:
        if checkpoint.state:
            log(f"continuing from {checkpoint.path}: step {checkpoint.state['step']}", handle)
        log(f"training {family.name}: {json.dumps({k: str(v) for k, v in vars(args).items()})}", handle)
        text = [p for name, m in models.items() if name.startswith("text_encoder") for p in m.parameters()]
        log(f"parameters: transformer {sum(p.numel() for p in models['transformer'].parameters()) / 1e6:.2f}M, "
            f"text {sum(p.numel() for p in text) / 1e6:.2f}M", handle)
        if args.steps and not checkpoint.reached("unet"):
            train(family, models, tokenizers, args, rng, handle, checkpoint)
        family.save(args.out, models, tokenizers)
        minutes = checkpoint.minutes()
        write_provenance(args.out, vars(args), minutes, log_path, read_provenance(args.resume),
                         trained_by="bench/train_toy_dit.py", vae_from=read_provenance(args.vae))
        checkpoint.path.unlink(missing_ok=True)
        log(f"saved {args.out} after {minutes:.1f} min", handle)


if __name__ == "__main__":
    main()
