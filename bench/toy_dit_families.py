"""The toy MM-DiT families bench/train_toy_dit.py trains: how each builds, encodes, calls and
saves its pipeline (Flux.1-schnell shaped, SD3 shaped), the VAE they share, and the probes
that let the word-attention loss read each one's joint attention."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

from bench.toyworld import SIZE, WORDS
from bench.train_toy_model import MAX_TOKENS, build_text_encoder, caption_ids
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


def token_words(tokenizer, token_ids: list[int]) -> list[str]:
    """The words a text sequence's tokens spell (T5's and CLIP's word markers dropped); every
    toy-world word is one token in both tokenizers."""
    return [t.removeprefix("\u2581").removesuffix("</w>") for t in tokenizer.convert_ids_to_tokens(token_ids)]


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

    def predict(self, transformer, noisy, sigmas, states, pooled, image_ids, guidance=None):
        # as FluxPipeline calls it: sigmas as timesteps / 1000, dev's guidance scale as is
        return transformer(hidden_states=noisy, timestep=sigmas, pooled_projections=pooled, encoder_hidden_states=states,
                           txt_ids=torch.zeros(states.shape[1], 3), img_ids=image_ids, guidance=guidance).sample

    def dev_shaped(self, teacher, seed: int = 0):
        """A Flux.1-dev shaped copy of a schnell-shaped transformer: the same weights plus a
        guidance embedding whose output layer starts at zero, so it first predicts exactly as
        the teacher does and guidance distillation teaches it what the scale means."""
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(seed)  # the guidance embedding's first layer starts random: seeded
        student = FluxTransformer2DModel.from_config({**teacher.config, "guidance_embeds": True})
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected and all(".guidance_embedder." in name for name in missing), (missing, unexpected)
        with torch.no_grad():
            student.time_text_embed.guidance_embedder.linear_2.weight.zero_()
            student.time_text_embed.guidance_embedder.linear_2.bias.zero_()
        return student

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
