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

--caption-dropout P trains a share of captions as the empty one, which a classifier-free
guided teacher needs. --guidance-teacher DIR then makes a Flux.1-dev shaped student: the
teacher's weights plus a guidance embedding starting at zero, trained (text encoders frozen)
to give in one call the teacher's guided prediction u + g (c - u) at a scale g drawn from
--guidance-range, as Flux.1-dev's guidance is distilled:

    python -m bench.train_toy_dit --resume assets/toy-flux --out DIR/teacher --caption-dropout 0.15 ...
    python -m bench.train_toy_dit --guidance-teacher DIR/teacher --out DIR/toy-flux-dev ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.toy_dit_families import (  # noqa: F401  (the trainer's public names, as tests and users reach them)
    FAMILIES,
    SD3WordAttentionProbe,
    load_models,
    load_vae,
    make_pooled_constant,
    token_words,
    widen_vae,
)
from bench.toyworld import BACKGROUND_KINDS, BACKGROUND_TONES, SHAPES, render_scene
from bench.train_toy_model import train_denoiser
from bench.training import Checkpoint, log, open_checkpoint, parse_with_run_arguments, read_provenance, write_provenance


PATCH_PIXELS = 8  # one packed token: 2 x 2 latents of the 4x VAE
BACKGROUND_WORDS = {"background", *BACKGROUND_KINDS, *BACKGROUND_TONES}


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


def guided_target(family, models, tokenizers, teacher, noisy, sigmas, states, pooled, image_ids, scale):
    """The teacher's classifier-free guided prediction at each sample's scale: what a
    guidance-distilled (Flux.1-dev shaped) student learns to give in one call."""
    with torch.no_grad():
        empty_states, empty_pooled = family.encode(models, tokenizers, [""] * len(noisy))
        both = family.predict(teacher, torch.cat([noisy, noisy]), sigmas.flatten().repeat(2),
                              torch.cat([states, empty_states]), torch.cat([pooled, empty_pooled]), image_ids)
        conditional, unconditional = both.chunk(2)
        return unconditional + scale.view(-1, *[1] * (noisy.dim() - 1)) * (conditional - unconditional)


def train(family, models: dict, tokenizers, args, rng, handle, checkpoint: Checkpoint, teacher=None) -> None:
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
        if args.caption_dropout:  # drawn only when asked, so earlier runs' streams are unchanged
            captions = ["" if rng.random() < args.caption_dropout else c for c in captions]
        latents = latents * vae.config.scaling_factor
        tokens, image_ids = family.tokens(latents)
        noise = torch.randn(tokens.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(args.batch, generator=generator)).view(-1, *[1] * (tokens.dim() - 1))
        noisy = (1 - sigmas) * tokens + sigmas * noise
        states, pooled = family.encode(models, tokenizers, captions)
        if teacher is None:
            prediction = family.predict(transformer, noisy, sigmas.flatten(), states, pooled, image_ids)
            loss = F.mse_loss(prediction, noise - tokens)
        else:
            scale = torch.empty(args.batch).uniform_(*args.guidance_range, generator=generator)
            prediction = family.predict(transformer, noisy, sigmas.flatten(), states, pooled, image_ids, guidance=scale)
            loss = F.mse_loss(prediction, guided_target(family, models, tokenizers, teacher, noisy, sigmas, states,
                                                        pooled, image_ids, scale))
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
    parser.add_argument("--caption-dropout", type=float, default=0.0,
                        help="share of captions replaced by the empty one, so the model also learns the "
                             "unconditional prediction classifier-free guidance needs")
    parser.add_argument("--guidance-teacher", type=Path, default=None,
                        help="a toy Flux trained with --caption-dropout: train a Flux.1-dev shaped student "
                             "(guidance embedding) to give its classifier-free guided prediction in one call")
    parser.add_argument("--guidance-range", type=float, nargs=2, default=(1.0, 6.0), metavar=("LOW", "HIGH"),
                        help="the guidance scales the student learns, drawn uniformly")
    parser.add_argument("--resume", type=Path, default=None, help="continue from a saved toy folder of the same family")
    args = parse_with_run_arguments(parser, argv)
    family = FAMILIES[args.family]
    rng = np.random.default_rng(args.seed)
    teacher = None
    if args.guidance_teacher:
        if args.family != "flux" or args.resume:
            parser.error("--guidance-teacher makes a Flux.1-dev shaped student of a toy Flux; it takes no --resume")
        tokenizers, models = family.load(args.guidance_teacher)
        teacher = models["transformer"].eval().requires_grad_(False)
        models["transformer"] = family.dev_shaped(teacher, args.seed)
        for name in models:
            if name.startswith("text_encoder"):
                models[name].requires_grad_(False)  # shared with the teacher, so its captions mean the same
    elif args.resume:
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
            train(family, models, tokenizers, args, rng, handle, checkpoint, teacher)
        family.save(args.out, models, tokenizers)
        minutes = checkpoint.minutes()
        # with --resume or --guidance-teacher the loaded model fixes the shape, not --width and the like
        shape = {k: v for k, v in models["transformer"].config.items() if not k.startswith("_")}
        write_provenance(args.out, vars(args), minutes, log_path, read_provenance(args.resume),
                         trained_by="bench/train_toy_dit.py", vae_from=read_provenance(args.vae),
                         transformer=shape, distilled_from=read_provenance(args.guidance_teacher))
        checkpoint.path.unlink(missing_ok=True)
        log(f"saved {args.out} after {minutes:.1f} min", handle)


if __name__ == "__main__":
    main()
