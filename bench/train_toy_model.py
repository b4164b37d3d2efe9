"""Train a complete Stable-Diffusion-shaped model on the toy world, from scratch.

Tokenizer (CLIP vocab/merges from the world's words), CLIP text encoder, VAE and a
cross-attention UNet are trained here and saved as a standard diffusers
StableDiffusionPipeline folder, so maskmint runs it by the same code path as real SD.

    python -m bench.train_toy_model --out assets/tiny-sd            # defaults: 70-100 min on 2 CPU cores
    python -m bench.train_toy_model --resume assets/tiny-sd --out DIR --vae-steps 0 --unet-steps 1000
    python -m bench.train_toy_model --init FOLDER --out DIR --vae-steps 0 --unet-steps 2500 --lr 2e-4 \
        --decoder-steps 300 --empty-share 0.25                         # new vocabulary, same image networks

Stage 1 trains the VAE on renders (reconstruction + small KL); stage 2 freezes it and
trains the text encoder and UNet jointly on epsilon prediction, with 10% empty captions
for classifier-free guidance, a share of object-free scenes (captioned "a striped gray
background": the removal stage asks for exactly those) and an EMA of the weights.
Stage 3 fine-tunes the VAE decoder alone on the UNet's own x0 estimates (from renders
noised to t < 600, 30% clean latents): the small decoder otherwise turns the UNet's
near-misses of a plain light scene (latents within ~0.2 of the truth) into dark smears, so
object-free scenes, which removal asks for, came out wrong. The latent space, and so the
UNet's task, stays the same. --resume continues from a saved folder; --init starts from one
with a new one-token-per-word tokenizer, its text encoder carried over; OUT/training.json
records the whole chain. Every scene comes from a seeded generator, so a run is
reproducible up to floating-point non-determinism.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.toyworld import BACKGROUND_KINDS, SIZE, UNSEEN_CAPTIONS, WORDS, render_scene
from bench.training import (
    Checkpoint,
    log,
    open_checkpoint,
    optimise,
    parse_with_run_arguments,
    read_provenance,
    write_provenance,
)
from maskmint.pipeline.testing.tiny_models import SD_BETAS, _text_config, build_tokenizer, sd_ddim_scheduler

MAX_TOKENS = 24  # the longest caption (three objects) is 18 tokens with BOS/EOS
DECODER_EMPTY_SHARE = 0.4  # the decoder stage leans on the object-free scenes it was failing


def scenes_batch(rng: np.random.Generator, size: int, empty_share: float = 0.1,
                 kinds: tuple[str, ...] = BACKGROUND_KINDS):
    """Images in [-1, 1] NCHW and their captions; some scenes have no object at all."""
    scenes = [render_scene(rng, n_objects=0 if rng.random() < empty_share else None, kinds=kinds) for _ in range(size)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in scenes]


def build_text_encoder(tokenizer):
    """The toy world's CLIP text encoder (64 wide, 2 layers), for the UNet or the DiT."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_text_config(tokenizer, 64, 4, MAX_TOKENS))


def _position_table(encoder) -> torch.Tensor:
    return next(m for name, m in encoder.named_modules() if name.endswith("position_embedding")).weight


def carry_text_encoder(old_tokenizer, old_encoder, tokenizer, encoder) -> None:
    """Start a new vocabulary's encoder from a trained one, so the UNet's conditioning stays put.

    The layers come over as they are; a token the old vocabulary spelled in pieces starts as
    the mean of those pieces; positions past the old limit start as its last one. A prompt
    of words the old vocabulary held whole then encodes exactly as before (CLIP's attention
    is causal), and fine-tuning starts from the trained model instead of from noise.
    """
    layers = {k: v for k, v in old_encoder.state_dict().items() if "embeddings." not in k}
    missing = encoder.load_state_dict(layers, strict=False).missing_keys
    assert all("embeddings." in key for key in missing), missing
    old_vocab = old_tokenizer.get_vocab()
    old_table, old_positions = old_encoder.get_input_embeddings().weight, _position_table(old_encoder)
    with torch.no_grad():
        table = encoder.get_input_embeddings().weight
        for token, index in tokenizer.get_vocab().items():
            if token in old_vocab:
                table[index] = old_table[old_vocab[token]]
            elif token.endswith("</w>"):
                pieces = old_tokenizer(token[: -len("</w>")], add_special_tokens=False).input_ids
                table[index] = old_table[pieces].mean(0)
        positions = _position_table(encoder)
        kept = min(len(positions), len(old_positions))
        positions[:kept] = old_positions[:kept]
        positions[kept:] = old_positions[kept - 1]


def build_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    text_encoder = build_text_encoder(tokenizer)
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(48, 96, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    return text_encoder, vae, unet


def noise_schedule():
    """The DDPM schedule every toy model trains on (SD 1.x's; they sample it with DDIM)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_BETAS)


def caption_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def load_models(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    return pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(recon, images) + 0.1 * F.l1_loss(recon, images)


def train_vae(vae, steps: int, batch: int, rng, handle, checkpoint: Checkpoint) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    first = checkpoint.resume("vae", optimizer=optimizer)
    vae.train()
    start, running = time.time(), 0.0
    for step in range(first + 1, steps + 1):
        images, _ = scenes_batch(rng, batch, empty_share=0.0)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        running += optimise(optimizer, reconstruction_loss(recon, images) + 1e-6 * posterior.kl().mean())
        if step % 50 == 0:
            log(f"vae step {step}/{steps} loss {running / 50:.5f} ({time.time() - start:.0f}s)", handle)
            running = 0.0
        checkpoint.save("vae", step, optimizer=optimizer)
    vae.eval()
    with torch.no_grad():
        images, _ = scenes_batch(rng, 256, empty_share=0.0)
        std = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"vae latent std {std:.4f} -> scaling_factor {1.0 / std:.4f}", handle)
    return std


def train_denoiser(
    name: str, modules: list, steps: int, lr: float, rng, handle, checkpoint: Checkpoint, batch_loss,
) -> None:
    """The denoising stage every toy model shares: AdamW with warm-up, clipping and an EMA that
    ends in place, resumable from the checkpoint. `batch_loss(generator)` draws a batch and
    returns its loss."""
    from diffusers.training_utils import EMAModel

    params = [p for module in modules for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 200))
    ema = EMAModel(params, decay=0.9995, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    for module in modules:
        module.train()
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    first = checkpoint.resume("unet", generator, optimizer=optimizer, schedule=schedule, ema=ema)
    start, running = time.time(), 0.0
    for step in range(first + 1, steps + 1):
        loss = batch_loss(generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        running += loss.item()
        if step % 100 == 0:
            rate = (step - first) / (time.time() - start)
            log(f"{name} step {step}/{steps} loss {running / 100:.5f} ({rate:.2f} steps/s, "
                f"eta {(steps - step) / rate / 60:.1f} min)", handle)
            running = 0.0
        checkpoint.save("unet", step, generator, optimizer=optimizer, schedule=schedule, ema=ema)
    ema.copy_to(params)
    for module in modules:
        module.eval()


def train_unet(
    text_encoder, vae, unet, tokenizer, steps: int, batch: int, lr: float, rng, handle, empty_share: float,
    offset_noise: float, checkpoint: Checkpoint,
) -> None:
    noise_scheduler = noise_schedule()

    def batch_loss(generator: torch.Generator) -> torch.Tensor:
        images, captions = scenes_batch(rng, batch, empty_share)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
        ids = caption_ids(tokenizer, captions)
        noise = torch.randn(latents.shape, generator=generator)
        if offset_noise:  # lets the model move a whole image's mean: plain white or black scenes
            noise += offset_noise * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        return F.mse_loss(unet(noisy, timesteps, text_encoder(ids)[0]).sample, noise)

    train_denoiser("unet", [unet, text_encoder], steps, lr, rng, handle, checkpoint, batch_loss)


def train_decoder(
    text_encoder, vae, unet, tokenizer, steps: int, batch: int, rng, handle, empty_share: float, checkpoint: Checkpoint,
    kinds: tuple[str, ...] = BACKGROUND_KINDS,
) -> None:
    noise_scheduler = noise_schedule()
    alphas = noise_scheduler.alphas_cumprod
    scale = vae.config.scaling_factor
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    first = checkpoint.resume("decoder", generator, optimizer=optimizer)
    vae.decoder.train()
    start, running = time.time(), 0.0
    for step in range(first + 1, steps + 1):
        images, captions = scenes_batch(rng, batch, empty_share, kinds)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * scale
            ids = caption_ids(tokenizer, captions)
            timesteps = torch.randint(0, 600, (batch,), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            alpha = alphas[timesteps].view(-1, 1, 1, 1)
            estimate = (noisy - (1 - alpha).sqrt() * unet(noisy, timesteps, text_encoder(ids)[0]).sample) / alpha.sqrt()
            clean = torch.rand(batch, generator=generator) < 0.3
            estimate[clean] = latents[clean]
        running += optimise(optimizer, reconstruction_loss(vae.decode(estimate / scale).sample, images))
        if step % 50 == 0:
            log(f"decoder step {step}/{steps} loss {running / 50:.5f} ({time.time() - start:.0f}s)", handle)
            running = 0.0
        checkpoint.save("decoder", step, generator, optimizer=optimizer)
    vae.eval()
    vae.requires_grad_(False)


def save_pipeline(out: Path, text_encoder, vae, unet, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # fp16 files keep the shipped model small; loading upcasts to the dtype asked for.
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets/toy-sd"))
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--decoder-batch", type=int, default=32)
    parser.add_argument("--decoder-kinds", nargs="+", default=list(BACKGROUND_KINDS),
                        choices=[*BACKGROUND_KINDS, *UNSEEN_CAPTIONS],
                        help="background kinds of the decoder stage's scenes: a decoder that can draw a pattern the "
                             "UNet never learnt, as a real VAE can")
    parser.add_argument("--empty-share", type=float, default=0.1,
                        help="share of object-free scenes: removal asks the model for exactly those")
    parser.add_argument("--offset-noise", type=float, default=0.0,
                        help="per-channel noise offset (tried for plain light scenes; the decoder stage is what fixed them)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from a saved pipeline folder (its tokenizer, VAE, text encoder, UNet)")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from a trained toy folder with a new one-token-per-word tokenizer: its VAE and "
                             "UNet as they are, its text encoder carried over to the new vocabulary")
    args = parse_with_run_arguments(parser, argv)
    rng = np.random.default_rng(args.seed)
    if args.resume and args.init:
        raise SystemExit("--resume and --init: give one")
    if args.resume:
        tokenizer, text_encoder, vae, unet = load_models(args.resume)
    else:
        tokenizer = build_tokenizer(WORDS, max_length=MAX_TOKENS)
        if args.init:  # new words, same image networks
            torch.manual_seed(args.seed)
            text_encoder = build_text_encoder(tokenizer)
            old_tokenizer, old_text_encoder, vae, unet = load_models(args.init)
            carry_text_encoder(old_tokenizer, old_text_encoder, tokenizer, text_encoder)
        else:
            text_encoder, vae, unet = build_models(tokenizer, args.seed)
    checkpoint, log_path = open_checkpoint(args, {"text_encoder": text_encoder, "vae": vae, "unet": unet}, rng)
    with open(log_path, "a" if checkpoint.state else "w") as handle:
        if checkpoint.state:
            log(f"continuing from {checkpoint.path}: {checkpoint.state['stage']} step {checkpoint.state['step']}", handle)
        log(f"training toy model: {json.dumps({k: str(v) for k, v in vars(args).items()})}", handle)
        log(f"parameters: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
            f"vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
            f"text {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M", handle)
        if args.vae_steps and not checkpoint.reached("vae"):
            train_vae(vae, args.vae_steps, args.vae_batch, rng, handle, checkpoint)
        vae.requires_grad_(False)
        if args.unet_steps and not checkpoint.reached("unet"):
            train_unet(text_encoder, vae, unet, tokenizer, args.unet_steps, args.unet_batch, args.lr, rng, handle,
                       args.empty_share, args.offset_noise, checkpoint)
            checkpoint.save("decoder", 0, force=True)  # the EMA weights are in place: the UNet stage is over
        if args.decoder_steps and not checkpoint.reached("decoder"):
            train_decoder(text_encoder, vae, unet, tokenizer, args.decoder_steps, args.decoder_batch, rng, handle,
                          DECODER_EMPTY_SHARE, checkpoint, tuple(args.decoder_kinds))
        save_pipeline(args.out, text_encoder, vae, unet, tokenizer)
        minutes = checkpoint.minutes()
        write_provenance(args.out, vars(args), minutes, log_path, read_provenance(args.resume),
                         **({"initialised_from": read_provenance(args.init)} if args.init else {}))
        checkpoint.path.unlink(missing_ok=True)
        log(f"saved {args.out} after {minutes:.1f} min", handle)


if __name__ == "__main__":
    main()
