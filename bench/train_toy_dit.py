"""Train a Flux-shaped MM-DiT on the toy world, so the DiT recipes are scored, not assumed.

    python -m bench.train_toy_dit --vae assets/tiny-sd --out assets/toy-flux     # about an hour on 2 CPU cores

The model is a standard diffusers FluxPipeline folder (Flux.1-schnell shaped: no guidance
embedding, no unconditional batch), so maskmint runs it by the code path real Flux takes:
joint attention with the T5 text tokens first, 2x2-packed latents, FluxInpaintPipeline for
removal. It reuses the VAE of a trained toy SD folder (frozen; given a zero shift, as Flux's
VAE has one) and trains a CLIP encoder (pooled vector), a T5 encoder (the token states the
transformer attends to) and the transformer jointly by rectified flow: x_t = (1 - s) x0 + s e,
the transformer predicting e - x0 at s drawn logit-normally, as SD3 and Flux are trained.
Captions name every object of the multi-object toy world; a share of object-free scenes
teaches the background prompts that removal asks for. Checkpoints (OUT.ckpt.pt) let an
interrupted run continue; OUT/training.json records how the weights were made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.toyworld import WORDS
from bench.train_toy_model import MAX_TOKENS, build_text_encoder, caption_ids, scenes_batch, train_denoiser
from bench.training import Checkpoint, log, open_checkpoint, parse_with_run_arguments, read_provenance, write_provenance
from maskmint.pipeline.testing.tiny_models import _t5_encoder, build_t5_tokenizer, build_tokenizer


def build_models(tokenizer, tokenizer_2, width: int, heads: int, double_blocks: int, single_blocks: int, seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    head_dim = width // heads
    rope = (head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8)  # (t, y, x), even, summing to head_dim
    text_encoder = build_text_encoder(tokenizer)
    text_encoder_2 = _t5_encoder(tokenizer_2, 64, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double_blocks, num_single_layers=single_blocks,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
        pooled_projection_dim=64, guidance_embeds=False, axes_dims_rope=rope,
    )
    return text_encoder, text_encoder_2, transformer


def load_vae(folder: Path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # Flux's pipelines subtract a shift; the toy VAE's is zero
    return vae.eval().requires_grad_(False)


def make_pooled_constant(text_encoder) -> None:
    """Zero the CLIP encoder's final norm gain, so its pooled vector is the same for every caption.

    The pooled vector modulates every block; when it carries the caption, the transformer can
    draw the right objects without its joint attention ever tying a word to a place. Made
    constant in the weights, the shipped folder keeps that property under any pipeline.
    """
    norm = text_encoder.final_layer_norm
    with torch.no_grad():
        norm.weight.zero_()
    norm.weight.requires_grad_(False)


def load_models(folder: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32)
    return pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer, pipe.vae


def pack(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents as Flux's token sequence (2x2 patches) and the tokens' (t, y, x) position ids."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    tokens = FluxPipeline._pack_latents(latents, b, c, h, w)
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return tokens, ids


def encode(text_encoder, text_encoder_2, tokenizer, tokenizer_2, captions: list[str]):
    pooled = text_encoder(caption_ids(tokenizer, captions)).pooler_output
    states = text_encoder_2(caption_ids(tokenizer_2, captions)).last_hidden_state
    return states, pooled


def train(models: dict, tokenizers, args, rng, handle, checkpoint: Checkpoint) -> None:
    text_encoder, text_encoder_2, transformer, vae = (models[k] for k in ("text_encoder", "text_encoder_2", "transformer", "vae"))

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        images, captions = scenes_batch(rng, args.batch, args.empty_share)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
        tokens, image_ids = pack(latents)
        noise = torch.randn(tokens.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(args.batch, generator=generator)).view(-1, 1, 1)
        noisy = (1 - sigmas) * tokens + sigmas * noise
        states, pooled = encode(text_encoder, text_encoder_2, *tokenizers, captions)
        prediction = transformer(hidden_states=noisy, timestep=sigmas.flatten(), pooled_projections=pooled,
                                 encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3),
                                 img_ids=image_ids).sample
        return F.mse_loss(prediction, noise - tokens)

    train_denoiser("transformer", [text_encoder, text_encoder_2, transformer], args.steps, args.lr, rng, handle,
                   checkpoint, batch_loss)


def save_pipeline(out: Path, models: dict, tokenizer, tokenizer_2) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    pipe = FluxPipeline(
        transformer=models["transformer"], scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=models["vae"],
        text_encoder=models["text_encoder"], tokenizer=tokenizer,
        text_encoder_2=models["text_encoder_2"], tokenizer_2=tokenizer_2,
    )
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)  # small files; loading upcasts
    pipe.to(torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/toy-flux"))
    parser.add_argument("--vae", type=Path, default=Path("assets/tiny-sd"),
                        help="a trained toy SD folder whose VAE is reused, frozen")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--width", type=int, default=128, help="transformer hidden size")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--double-blocks", type=int, default=4)
    parser.add_argument("--single-blocks", type=int, default=2)
    parser.add_argument("--empty-share", type=float, default=0.25,
                        help="share of object-free scenes: removal asks the model for exactly those")
    parser.add_argument("--pooled", choices=("caption", "constant"), default="constant",
                        help="constant: the CLIP pooled vector is the same for every caption, so only the "
                             "joint attention can carry the words")
    parser.add_argument("--resume", type=Path, default=None, help="continue from a saved toy Flux folder")
    args = parse_with_run_arguments(parser, argv)
    rng = np.random.default_rng(args.seed)
    if args.resume:
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, transformer, vae = load_models(args.resume)
    else:
        tokenizer, tokenizer_2 = build_tokenizer(WORDS, MAX_TOKENS), build_t5_tokenizer(WORDS, MAX_TOKENS)
        text_encoder, text_encoder_2, transformer = build_models(
            tokenizer, tokenizer_2, args.width, args.heads, args.double_blocks, args.single_blocks, args.seed)
        vae = load_vae(args.vae)
    if args.pooled == "constant":
        make_pooled_constant(text_encoder)
    models = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "transformer": transformer, "vae": vae}
    checkpoint, log_path = open_checkpoint(args, models, rng)
    with open(log_path, "a" if checkpoint.state else "w") as handle:
        if checkpoint.state:
            log(f"continuing from {checkpoint.path}: step {checkpoint.state['step']}", handle)
        log(f"training toy Flux: {json.dumps({k: str(v) for k, v in vars(args).items()})}", handle)
        log(f"parameters: transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M, "
            f"text {sum(p.numel() for p in [*text_encoder.parameters(), *text_encoder_2.parameters()]) / 1e6:.2f}M", handle)
        if args.steps and not checkpoint.reached("unet"):
            train(models, (tokenizer, tokenizer_2), args, rng, handle, checkpoint)
        save_pipeline(args.out, models, tokenizer, tokenizer_2)
        minutes = checkpoint.minutes()
        write_provenance(args.out, vars(args), minutes, log_path, read_provenance(args.resume),
                         trained_by="bench/train_toy_dit.py", vae_from=read_provenance(args.vae))
        checkpoint.path.unlink(missing_ok=True)
        log(f"saved {args.out} after {minutes:.1f} min", handle)


if __name__ == "__main__":
    main()
