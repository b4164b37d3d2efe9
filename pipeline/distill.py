"""distill: the concept-distillation fine-tune over a finished run, kept as a LoRA adapter
that only removal loads (`removal.adapter`).

It reads the run's own kept samples (image, heat maps, captions); the weak masks are
recomputed from the stored maps with the run's mask settings. No truth is read. Every
random choice of step s is drawn from (seed, s) alone and the data order from (seed,
epoch), so a run stopped at a checkpoint and continued ends with the weights of one that
never stopped. One shard is in memory at a time.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from maskmint import __version__
from maskmint.pipeline.dataset import read_samples
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.config import GenerationConfig, MaskConfig, ModelConfig, RemovalConfig
from maskmint.schemas.distill import DistillConfig
from maskmint.schemas.masking import ADAPTER_PROVENANCE
from maskmint.schemas.records import BACKGROUND_ID
from maskmint.stages.distill import background_rectangle, latent_foreground, masked_mse
from maskmint.stages.durable import atomic_write_bytes, write_temp
from maskmint.stages.families import family_of_pipeline
from maskmint.stages.remove import ADAPTER_NAME
from maskmint.stages.loading import pick_device, vae_precision
from maskmint.stages.annotate import fit
from maskmint.stages.models import load_text_layout, load_text_to_image, pipeline_image_size
from maskmint.stages.weak_mask import weak_mask

CHECKPOINT = "checkpoint.pt"


class DistillError(RuntimeError):
    """A run distill cannot learn from, or an output folder it cannot use: one line."""


class RunSamples:
    """The run's kept samples as one sequence per epoch: shards in a seeded order, samples
    in a seeded order within each; at most two shards decoded at a time."""

    def __init__(self, root: Path, mask: MaskConfig, seed: int, fit_how: str):
        rundir = RunDir(root)
        if "heatmap" not in rundir.manifest().fields:
            raise DistillError(f"{root}: the run stores no heat maps, so it has no weak masks to learn from")
        scan = rundir.scan()
        planned = rundir.planned_shards()
        if len(scan.complete) < planned:
            raise DistillError(f"{root}: the run is partial ({len(scan.complete)} of {planned} shards); finish it "
                               "with launch.py run first")
        self.shards = [(rundir.tar_path(s), len(stats.written)) for s, stats in sorted(scan.complete.items()) if stats.written]
        self.count = sum(n for _, n in self.shards)
        if self.count == 0:
            raise DistillError(f"{root}: the run kept no samples to learn from")
        self.mask, self.seed, self.fit_how = mask, seed, fit_how
        self.size: tuple[int, int] | None = None  # the model's (height, width), once it is loaded
        self._decoded: OrderedDict[int, list] = OrderedDict()

    @functools.lru_cache(maxsize=2)  # a batch reads one epoch's order, or two at its turn
    def _epoch(self, epoch: int) -> list[tuple[int, int]]:
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards))
        return [(int(s), int(i)) for s in order
                for i in np.random.default_rng([self.seed, epoch, 1, int(s)]).permutation(self.shards[s][1])]

    def _shard(self, shard: int) -> list:
        if shard not in self._decoded:
            self._decoded[shard] = list(read_samples(str(self.shards[shard][0])))
            while len(self._decoded) > 2:
                self._decoded.popitem(last=False)
        return self._decoded[shard]

    def at(self, position: int):
        """(image uint8 [H, W, 3], foreground bool [H, W], caption, background caption) of
        the position-th sample drawn, counting over epochs."""
        epoch, within = divmod(position, self.count)
        shard, index = self._epoch(epoch)[within]
        sample = self._shard(shard)[index]
        meta = sample.metadata
        image, heat = sample.image, sample.heatmap
        if image.shape[:2] != self.size:  # stored at the source's size: the frame the model saw
            image = fit(image, *self.size, self.fit_how)
            heat = np.stack([fit(np.repeat(m[..., None], 3, axis=2), *self.size, self.fit_how)[..., 0] for m in heat])
        class_ids = [c["class_id"] for c in meta["concepts"]]
        weak = weak_mask(heat.astype(np.float32) / 255.0, class_ids, self.mask)
        return image, weak != BACKGROUND_ID, meta["prompt"], meta["background_prompt"]


def frozen_sections(root: Path):
    manifest = RunDir(root).manifest()
    config = manifest.config
    try:
        model = ModelConfig.model_validate(config["model"])
    except ValueError as error:
        raise DistillError(f"{root}: the run's model cannot be found ({str(error).splitlines()[-1].strip()})") from None
    return (manifest, model, MaskConfig.model_validate(config["mask"]), RemovalConfig.model_validate(config["removal"]),
            GenerationConfig.model_validate(config["generation"]))


def adapter_targets(denoiser, family, layers: str) -> list[str]:
    """The module names the adapter wraps: the family's attention projections, or every
    linear and convolution (full names, so that peft matches each exactly once)."""
    if layers == "attention":
        return list(family.lora_targets)
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [name for name, module in denoiser.named_modules() if isinstance(module, kinds)]


def attach_adapter(denoiser, family, rank: int, seed: int, layers: str) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    torch.manual_seed(seed)  # the adapter's initial weights
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=adapter_targets(denoiser, family, layers)), adapter_name=ADAPTER_NAME)
    denoiser.requires_grad_(False)
    trainable = [p for name, p in denoiser.named_parameters() if "lora_" in name]
    for parameter in trainable:
        parameter.requires_grad_(True)
    return trainable


class Trainer:
    def __init__(self, root: Path, out: Path, options: DistillConfig, device: str = "auto"):
        self.root, self.out, self.options = Path(root), Path(out), options
        self.manifest, model, mask, self.removal, self.generation = frozen_sections(self.root)
        fit_how = self.manifest.config.get("annotate", {}).get("fit", "crop")
        self.samples = RunSamples(self.root, mask, options.seed, fit_how)  # refused before the model loads
        self.device = pick_device(device if device != "auto" else model.device)
        self.pipe = load_text_to_image(model, self.device, torch.float32)  # trained in fp32
        self.samples.size = pipeline_image_size(self.pipe, self.generation)
        self.family = family_of_pipeline(self.pipe)
        self.layout = load_text_layout(model)
        self.denoiser = self.family.denoiser(self.pipe)
        self.trainable = attach_adapter(self.denoiser, self.family, options.rank, options.seed, options.layers)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=options.lr)
        self.guidance = self.removal.guidance_scale if options.guidance is None else options.guidance
        self.step, self.losses, self.seconds = 0, [], 0.0
        self.resume()

    # -- state -------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"run": self.manifest.config_hash, "options": self.options.identity()}

    def resume(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state["identity"] != self.identity():
            raise DistillError(f"{self.out} holds a distillation of another run or with other options; "
                               "choose another --out")
        for parameter, saved in zip(self.trainable, state["lora"]):
            parameter.data.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]

    def checkpoint(self) -> None:
        state = {"identity": self.identity(), "step": self.step, "losses": self.losses, "seconds": self.seconds,
                 "lora": [p.detach().cpu().clone() for p in self.trainable], "optimizer": self.optimizer.state_dict()}
        path = self.out / CHECKPOINT
        os.replace(write_temp(path, lambda handle: torch.save(state, handle)), path)

    def save(self) -> None:
        """The adapter (diffusers' LoRA file) and its provenance beside it."""
        self.denoiser.save_lora_adapter(str(self.out), adapter_name=ADAPTER_NAME)
        provenance = {
            "maskmint_version": __version__, "family": self.family.name, "run": str(self.root.resolve()),
            "run_config_hash": self.manifest.config_hash, "model": self.manifest.config["model"]["path"],
            "options": self.options.model_dump(mode="json"), "steps_done": self.step, "samples": self.samples.count,
            "train_seconds": round(self.seconds, 1), "final_loss": float(np.mean(self.losses[-50:])),
            "loss_every_10_steps": [round(float(np.mean(self.losses[i:i + 10])), 5) for i in range(0, len(self.losses), 10)],
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(self.out / ADAPTER_PROVENANCE, json.dumps(provenance, indent=1).encode())

    # -- one step ----------------------------------------------------------------------------
    def batch(self, step: int):
        """Images, loss masks on the latent grid and captions of `step`, all drawn from (seed, step)."""
        rng = np.random.default_rng([self.options.seed, step])
        cell = self.pipe.vae_scale_factor
        images, masks, captions = [], [], []
        for j in range(self.options.batch_size):
            image, foreground, caption, background_caption = self.samples.at(step * self.options.batch_size + j)
            if self.options.flip and rng.random() < 0.5:
                image, foreground = image[:, ::-1], foreground[:, ::-1]
            if rng.random() < self.options.concept_share:
                grid = np.ones((image.shape[0] // cell, image.shape[1] // cell), bool)
            else:
                near = latent_foreground(foreground, cell, self.options.background_margin_px)
                grid, caption = background_rectangle(near, rng, self.options), background_caption
            images.append(np.ascontiguousarray(image))
            masks.append(grid)
            captions.append(caption)
        return np.stack(images), torch.from_numpy(np.stack(masks)), captions

    def loss(self, step: int) -> torch.Tensor:
        images, masks, captions = self.batch(step)
        generator = torch.Generator().manual_seed(self.options.seed * 1_000_003 + step)
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device, torch.float32) / 127.5 - 1
        with torch.no_grad():
            with vae_precision(self.pipe.vae) as dtype:
                encoded = self.pipe.vae.encode(pixels.to(dtype)).latent_dist.mean.float()
            clean = self.family.scaled_latents(self.pipe, encoded)
            states, pooled = self.family.encode_text(self.pipe, self.layout, captions)
        noise = torch.randn(clean.shape, generator=generator).to(self.device)
        uniform = torch.rand(len(clean), generator=generator)
        noisy, timesteps, target = self.family.training_example(self.pipe, clean, noise, uniform)
        prediction = self.family.predict(self.pipe, noisy, timesteps, states, pooled, self.guidance)
        return masked_mse(prediction, target, masks.to(self.device))

    def train(self, progress: bool = True) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.options.steps, initial=self.step, desc="distill", unit="step",
                   disable=not progress, file=sys.stderr)
        while self.step < self.options.steps:
            started = time.perf_counter()
            loss = self.loss(self.step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.losses.append(loss.item())
            self.seconds += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(self.losses[-20:]):.4f}")
            if self.step % self.options.checkpoint_every == 0 or self.step == self.options.steps:
                self.checkpoint()
        bar.close()
        self.save()
        return json.loads((self.out / ADAPTER_PROVENANCE).read_text())


def distill(root: Path | str, out: Path | str, options: DistillConfig, progress: bool = True, device: str = "auto") -> dict:
    """Train (or continue) the adapter of `root`'s run into `out`; returns its provenance."""
    return Trainer(Path(root), Path(out), options, device).train(progress)
