"""Tiny Stable-Diffusion-shaped pipelines built locally, for tests and CPU benchmarks.

Nothing here downloads: the CLIP tokenizer is made from a vocabulary and merges written
from a word list, and every network is initialised from a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

DEFAULT_WORDS = (
    "a an the of on in and with photo picture scene image "
    "dog cat bird car tree house cup chair ball flower horse boat apple "
    "red green blue yellow orange purple white black gray pink "
    "circle square triangle star cross ring "
    "flat gradient striped noise background park kitchen street beach room field table"
).split()


def _byte_symbols() -> list[str]:
    """CLIP's reversible byte -> printable unicode table (same as GPT-2's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def clip_vocab_and_merges(words: list[str] | tuple[str, ...] = DEFAULT_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-format BPE vocabulary in which every listed word is one token.

    Each word gets a left-to-right chain of merges. BPE applies the best-ranked pair first,
    so one word's early merge can cut into another ("t r" of triangle inside "striped");
    such words get merges joining the pieces they end up in, ranked last, until every
    word is whole.
    """
    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []

    def chain(pieces: list[str]) -> None:
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]

    unique = list(dict.fromkeys(w.lower() for w in words))
    for word in unique:
        chain(list(word[:-1]) + [word[-1] + "</w>"])
    for _ in range(len(unique)):
        broken = [(w, p) for w in unique if len(p := _bpe(w, merges)) > 1]
        if not broken:
            break
        for _word, pieces in broken:
            chain(pieces)
    vocab_list += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def _bpe(word: str, merges: list[str]) -> list[str]:
    """CLIP's BPE of one word: repeatedly merge the best-ranked adjacent pair."""
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        first, second = pieces[i], pieces[i + 1]
        merged, j = [], 0
        while j < len(pieces):  # merge every occurrence of the pair, as CLIP does
            if j < len(pieces) - 1 and pieces[j] == first and pieces[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(pieces[j])
                j += 1
        pieces = merged
    return pieces


def build_tokenizer(words=DEFAULT_WORDS, max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(words)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=max_length)


def save_tokenizer_files(folder: Path, words=DEFAULT_WORDS) -> None:
    """vocab.json / merges.txt in the layout CLIPTokenizer.from_pretrained reads."""
    vocab, merges = clip_vocab_and_merges(words)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


# Stable Diffusion 1.x's noise schedule: models here train on it and sample it with DDIM.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def sd_ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _text_config(tokenizer, text_dim: int, heads: int, max_length: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=text_dim * 2, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=max_length, projection_dim=text_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(vae_channels: tuple[int, ...], image_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=min(32, vae_channels[0]), sample_size=image_size,
    )


@dataclass(frozen=True)
class TinyShape:
    """The sizes of a tiny pipeline (each builder reads the ones its architecture has)."""

    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    text_dim: int = 32
    heads: int = 2
    max_length: int = 77  # CLIP
    t5_length: int = 32
    layers: int = 2  # double-stream blocks (Flux: and as many single-stream ones)


def build_tiny_pipeline(seed: int = 0, image_size: int = 32, words=DEFAULT_WORDS, shape: TinyShape = TinyShape()):
    """A randomly initialised StableDiffusionPipeline; every UNet level has cross-attention."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet_channels, vae_channels, text_dim, heads = shape.unet_channels, shape.vae_channels, shape.text_dim, shape.heads
    max_length = shape.max_length
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, max_length)
    text_encoder = CLIPTextModel(_text_config(tokenizer, text_dim, heads, max_length))
    vae = _vae(vae_channels, image_size)
    latent_size = image_size // 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels),
        cross_attention_dim=text_dim,
        attention_head_dim=heads,
        norm_num_groups=min(32, unet_channels[0]),
    )
    scheduler = sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, image_size: int = 32, words=DEFAULT_WORDS, shape: TinyShape = TinyShape()):
    """A randomly initialised StableDiffusionXLPipeline: two CLIP encoders (the second with a
    projection, for the pooled embedding), their states concatenated for cross-attention,
    and the UNet's size/crop micro-conditioning, as SDXL has them."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet_channels, vae_channels, text_dim, heads = shape.unet_channels, shape.vae_channels, shape.text_dim, shape.heads
    max_length = shape.max_length

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(words, max_length), build_tokenizer(words, max_length)
    # the second encoder is the wider one, as OpenCLIP bigG is beside CLIP-L (single-file
    # loading tells them apart by width)
    text_config, text_config_2 = (_text_config(tokenizer, text_dim, heads, max_length),
                                  _text_config(tokenizer_2, 2 * text_dim, heads, max_length))
    vae = _vae(vae_channels, image_size)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(vae_channels) - 1), in_channels=4, out_channels=4,
        block_out_channels=unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * len(unet_channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(unet_channels),
        cross_attention_dim=3 * text_dim, attention_head_dim=heads, use_linear_projection=True,
        norm_num_groups=min(32, unet_channels[0]),
        # deeper levels hold more transformer layers, as in SDXL (there: 0, 2, 10)
        transformer_layers_per_block=tuple(range(1, len(unet_channels) + 1)),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + 2 * text_dim,  # 6 size/crop numbers + pooled text
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(text_config), text_encoder_2=CLIPTextModelWithProjection(text_config_2),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=sd_ddim_scheduler(),
        force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def build_t5_tokenizer(words=DEFAULT_WORDS, max_length: int = 32):
    """A T5 (SentencePiece unigram) tokenizer in which every listed word is one piece; other
    text falls back to single characters."""
    from transformers import T5Tokenizer

    words = list(dict.fromkeys(w.lower() for w in words))
    characters = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789,.'-"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in characters] + [("\u2581" + c, -5.0) for c in characters if "\u2581" + c not in dict(vocab)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _t5_encoder(tokenizer, dim: int, heads: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=dim, d_kv=dim // heads, d_ff=dim * 2, num_layers=2, num_heads=heads,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=0.0,
    )).eval()  # built, not loaded: in training mode until told


def _flow_vae(vae_channels: tuple[int, ...], image_size: int, latent_channels: int):
    """The MM-DiT families' VAE: no quant convs, a shift as well as a scale."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        norm_num_groups=min(32, vae_channels[0]), sample_size=image_size,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5,
    )


def build_tiny_sd3_pipeline(seed: int = 0, image_size: int = 32, words=DEFAULT_WORDS, shape: TinyShape = TinyShape()):
    """A randomly initialised StableDiffusion3Pipeline: two CLIP encoders with projections and
    a T5 encoder; the joint transformer sees the CLIP states (concatenated on the feature
    axis, zero-padded to T5's width) followed by T5's, as SD3 has them."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    vae_channels, text_dim, heads, layers = shape.vae_channels, shape.text_dim, shape.heads, shape.layers
    max_length, t5_length = shape.max_length, shape.t5_length
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(words, max_length), build_tokenizer(words, max_length)
    tokenizer_3 = build_t5_tokenizer(words, t5_length)
    text_config = _text_config(tokenizer, text_dim, heads, max_length)
    joint_dim = 2 * text_dim
    transformer = SD3Transformer2DModel(
        # 16 latent channels as SD3's VAE has: its inpainting pipeline accepts no other
        sample_size=image_size // 2 ** (len(vae_channels) - 1), patch_size=2, in_channels=16, out_channels=16,
        num_layers=layers, attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=16 * heads, pooled_projection_dim=2 * text_dim, pos_embed_max_size=32,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(vae_channels, image_size, 16),
        text_encoder=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tokenizer_3, joint_dim, heads), tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline(seed: int = 0, image_size: int = 32, words=DEFAULT_WORDS, shape: TinyShape = TinyShape(),
                             guidance_embeds: bool = False):
    """A randomly initialised FluxPipeline: CLIP gives the pooled vector, T5 the token states the
    joint transformer attends to; latents are packed 2x2 into tokens. `guidance_embeds`
    makes it Flux-dev shaped (distilled guidance), else Flux-schnell shaped."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    vae_channels, text_dim, heads, layers = shape.vae_channels, shape.text_dim, shape.heads, shape.layers
    max_length, t5_length = shape.max_length, shape.t5_length
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(words, max_length), build_t5_tokenizer(words, t5_length)
    latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=layers,
        attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=_flow_vae(vae_channels, image_size, latent_channels),
        text_encoder=CLIPTextModel(_text_config(tokenizer, text_dim, heads, max_length)), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, text_dim, heads), tokenizer_2=tokenizer_2,
    )


BUILDERS = {
    "sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl_pipeline, "sd3": build_tiny_sd3_pipeline,
    "flux": build_tiny_flux_pipeline,
}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-init pipeline folder of a model family.")
    parser.add_argument("--family", choices=sorted(BUILDERS), default="sd")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (save_pretrained layout)")
    parser.add_argument("--size", type=int, default=32, help="native image size (default 32)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from maskmint.stages.loading import quiet_libraries

    quiet_libraries()
    BUILDERS[args.family](seed=args.seed, image_size=args.size).save_pretrained(args.out)
    print(f"{args.out}: a tiny {args.family} pipeline, {args.size} px")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
