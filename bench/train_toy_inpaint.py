"""Train a 9-channel inpainting UNet for the toy world, starting from the base model's UNet.

    python -m bench.train_toy_inpaint --base assets/tiny-sd --out assets/tiny-sd-inpaint

Input channels are SD-inpainting's: noisy latents, the mask at latent size, the masked
image's latents; the new channels start at zero, so training begins at the base UNet.
By default three quarters of each batch is the removal task with the world's exact
answer (the object's dilated mask grown to whole latent cells as maskmint's remove stage
does, the object-free background as target, the background caption); the rest is
ordinary inpainting of a random box with the full caption. The text encoder and VAE stay
the base model's (maskmint shares them), so only the UNet is saved, in OUT/unet, which
`model.inpaint_path: OUT` loads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.toyworld import SIZE, caption_for, render_scene
from bench.train_toy_model import caption_ids, load_models, noise_schedule
from bench.training import log
from maskmint.stages.masks import cover_cells, dilate


def removal_or_box_batch(rng: np.random.Generator, size: int, removal_share: float, cell: int):
    """(target, image, mask, captions): images in [-1, 1] NCHW, masks 0/1 N1HW."""
    targets, images, masks, captions = [], [], [], []
    for i in range(size):
        scene = render_scene(rng, n_objects=1 if rng.random() < 0.7 else 2)
        if rng.random() < removal_share and scene.objects:  # removal: fill the object's place with background
            grow = int(rng.integers(1, 6))
            region = cover_cells(dilate(scene.mask > 0, grow), cell).astype(np.uint8)
            targets.append(scene.background)
            kind, tone = scene.caption.rsplit(" on a ", 1)[-1].split()[:2] if " on a " in scene.caption else ("flat", "gray")
            captions.append(caption_for([], kind, tone))
        else:  # ordinary inpainting of a random box
            region = np.zeros((SIZE, SIZE), np.uint8)
            h, w = rng.integers(8, SIZE // 2, size=2)
            y, x = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
            region[y : y + h, x : x + w] = 1
            targets.append(scene.image)
            captions.append("" if rng.random() < 0.1 else scene.caption)
        images.append(scene.image)
        masks.append(region)

    def to_tensor(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1

    mask = torch.from_numpy(np.stack(masks)).float()[:, None]
    return to_tensor(targets), to_tensor(images), mask, captions


def inpainting_unet(base_unet):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config({**base_unet.config, "in_channels": 9})
    state = base_unet.state_dict()
    weight = torch.zeros_like(unet.conv_in.weight)
    weight[:, :4] = state["conv_in.weight"]
    state["conv_in.weight"] = weight
    unet.load_state_dict(state)
    return unet


def main(argv: list[str] | None = None) -> None:
    from diffusers.training_utils import EMAModel

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=Path("assets/tiny-sd"))
    parser.add_argument("--out", type=Path, default=Path("assets/tiny-sd-inpaint"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--removal-share", type=float, default=0.75,
                        help="share of each batch given the exact removal task; the rest inpaints random boxes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    tokenizer, text_encoder, vae, base_unet = load_models(args.base)
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    unet = inpainting_unet(base_unet)
    del base_unet
    scheduler = noise_schedule()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100))
    ema = EMAModel(unet.parameters(), decay=0.9995, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    generator = torch.Generator().manual_seed(args.seed)
    scale = vae.config.scaling_factor
    cell = 2 ** (len(vae.config.block_out_channels) - 1)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train.log"
    start, running = time.time(), 0.0
    with open(log_path, "w") as handle:
        log(f"training toy inpainting UNet: {json.dumps({k: str(v) for k, v in vars(args).items()})}", handle)
        unet.train()
        for step in range(1, args.steps + 1):
            target, image, mask, captions = removal_or_box_batch(rng, args.batch, args.removal_share, cell)
            with torch.no_grad():
                latents = vae.encode(target).latent_dist.sample(generator) * scale
                masked = vae.encode(image * (mask < 0.5)).latent_dist.sample(generator) * scale
                context = text_encoder(caption_ids(tokenizer, captions))[0]
            small_mask = F.interpolate(mask, size=latents.shape[-2:])  # nearest, as the pipeline does
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(torch.cat([noisy, small_mask, masked], dim=1), timesteps, context).sample
            loss = F.mse_loss(prediction, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            warmup.step()
            ema.step(unet.parameters())
            running += loss.item()
            if step % 100 == 0:
                rate = step / (time.time() - start)
                log(f"step {step}/{args.steps} loss {running / 100:.5f} ({rate:.2f} steps/s)", handle)
                running = 0.0
        ema.copy_to(unet.parameters())
        unet.eval().to(torch.float16).save_pretrained(args.out / "unet", safe_serialization=True)
        minutes = (time.time() - start) / 60
        log(f"saved {args.out / 'unet'} after {minutes:.1f} min", handle)
    (args.out / "training.json").write_text(json.dumps({
        "trained_by": "bench/train_toy_inpaint.py", "arguments": {k: str(v) for k, v in vars(args).items()},
        "wall_minutes": round(minutes, 1), "device": f"cpu, {torch.get_num_threads()} threads", "torch": torch.__version__,
    }, indent=1))


if __name__ == "__main__":
    main()
