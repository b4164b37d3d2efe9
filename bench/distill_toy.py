"""What distillation changes, measured on the toy world where the exact background is known.

    python -m bench.distill_toy --out /tmp/distill-toy --train 64 --test 32 --steps 2000 --lr 1e-3

1. Renders a domain of backgrounds the shipped model never learnt (checkerboards and dot
   grids, captioned "striped" and "noise"): a training split and a held-out one (other
   seeds), and a held-out split of the shipped world's own backgrounds.
2. Annotates the training split with configs/annotate.yaml's settings and distils that
   run's own weak masks into an adapter (no truth is read).
3. Annotates both held-out splits with and without `removal.adapter`, and scores each
   against the exact scene: the removed background's mean RGB error inside the objects,
   the object colour left there (any object colour, and the object's own), and the weak
   and final foreground IoU (the final mask's 255 band left out of both, as bench.quality
   scores it; `final_iou_band_as_background` counts it as background instead).

`--vae assets/tiny-sd-pattern-decoder` decodes with the toy VAE whose decoder was also taught
these patterns (`bench.train_toy_model --decoder-kinds`): the shipped one tints their edges,
which bounds what any removal through it can reach; the UNet and latent space stay the same.

Writes OUT/distill-toy-TAG.json (TAG: lr, rank, steps); `--json PATH` copies it (bench/distill-toy.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import yaml

from bench.quality import iou
from bench.toyworld import BACKGROUND_KINDS, COARSE_UNSEEN_KINDS, COLORS, UNSEEN_KINDS, colour_pixels, object_pixels, render_scene
from maskmint.pipeline.dataset import read_samples
from maskmint.pipeline.distill import distill
from maskmint.pipeline.run import run
from maskmint.schemas.config import MaskConfig, parse_config
from maskmint.schemas.distill import DistillConfig
from maskmint.schemas.records import IGNORE_INDEX
from maskmint.stages.weak_mask import weak_mask

REPO = Path(__file__).resolve().parent.parent


def write_split(out: Path, count: int, seed: int, kinds: tuple[str, ...]) -> Path:
    if (out / "lines.jsonl").is_file():  # kept: a rewrite changes the files' times, so the runs' hashes
        return out / "lines.jsonl"
    for part in ("images", "truth", "backgrounds"):
        (out / part).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene = render_scene(np.random.default_rng(seed * 100_000 + i), n_objects=1, kinds=kinds)
        name = f"{i:04d}.png"
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(out / "truth" / name), scene.mask)
        cv2.imwrite(str(out / "backgrounds" / name), cv2.cvtColor(scene.background, cv2.COLOR_RGB2BGR))
        lines.append({"image": f"images/{name}", "prompt": scene.caption, "concepts": [s for _, s in scene.objects],
                      "background": scene.caption.rpartition(" on ")[2]})
    (out / "lines.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out / "lines.jsonl"


SHIPPED_MODEL = REPO / "assets" / "tiny-sd"
TRAIN_SEED, HELD_OUT_SEED = 21, 22


def annotate(lines: Path, count: int, out: Path, adapter: Path | None = None, shift_px: int = 0,
             model: Path = SHIPPED_MODEL) -> None:
    data = yaml.safe_load((REPO / "configs" / "annotate.yaml").read_text())
    data["model"]["path"] = str(model)
    data["prompts"]["file"] = str(lines)
    data["output"] = {"samples": count, "shard_size": 16}
    data["execution"] = {"executor": "local"}
    if adapter is not None:
        data["removal"]["adapter"] = str(adapter)
    if shift_px:
        data["refine"]["shift_px"] = shift_px
    run(parse_config(copy.deepcopy(data)), out, show_progress=False)


def with_vae(out: Path, vae_from: Path | None) -> Path:
    """The shipped toy model, or the same model with another model folder's VAE: a decoder
    taught the unseen patterns, as a real VAE draws them, while the UNet still never saw them."""
    if vae_from is None:
        return SHIPPED_MODEL
    model = out / "model"
    model.mkdir(parents=True, exist_ok=True)
    for part in SHIPPED_MODEL.iterdir():
        link, target = model / part.name, (vae_from if part.name == "vae" else SHIPPED_MODEL).resolve() / part.name
        if link.is_symlink() and link.resolve() != target:  # an earlier --vae: point it at this one
            link.unlink()
        if not link.exists():
            link.symlink_to(target)
    return model


def toy_vae(model: Path = SHIPPED_MODEL):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model, subfolder="vae").eval()


def vae_round_trip(split: Path, vae) -> dict:
    """What no removal through this VAE can beat, inside the objects: the exact background's
    mean RGB error after a VAE round trip, and the object-coloured pixels that round trip
    already makes (a checkerboard's edges come back tinted)."""
    import torch

    errors, colour = [], []
    for path in sorted((split / "backgrounds").glob("*.png")):
        exact = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(split / "truth" / path.name), cv2.IMREAD_GRAYSCALE) > 0
        pixels = torch.from_numpy(exact).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            back = vae.decode(vae.encode(pixels).latent_dist.mean).sample[0].permute(1, 2, 0).numpy()
        back = ((back + 1) * 127.5).clip(0, 255)
        errors.append(float(np.abs(back - exact)[truth].mean()))
        colour.append(float(object_pixels(back.round().astype(np.uint8))[truth].mean()))
    return {"background_error_in_objects": float(np.mean(errors)), "object_colour_left": float(np.mean(colour))}


def own_colour(prompt: str) -> str:
    """The one object's colour: the caption's first colour word ("a red circle on ...")."""
    return next(word for word in prompt.split() if word in COLORS)


def score(run_dir: Path, split: Path) -> dict:
    mask_config = MaskConfig.model_validate(json.loads((run_dir / "run.json").read_text())["config"]["mask"])
    errors, left, own_left, weak_ious, final_ious, banded_ious = [], [], [], [], [], []
    kept = 0
    for sample in read_samples(str(run_dir)):
        kept += 1
        name = Path(sample.metadata["source"]["path"]).name
        truth = cv2.imread(str(split / "truth" / name), cv2.IMREAD_GRAYSCALE) > 0
        exact = cv2.cvtColor(cv2.imread(str(split / "backgrounds" / name)), cv2.COLOR_BGR2RGB)
        removed = sample.background
        errors.append(float(np.abs(removed.astype(np.float32) - exact)[truth].mean()))
        left.append(float(object_pixels(removed)[truth].mean()))
        own_left.append(float(colour_pixels(removed, own_colour(sample.metadata["prompt"]))[truth].mean()))
        ids = [c["class_id"] for c in sample.metadata["concepts"]]
        weak = weak_mask(sample.heatmap.astype(np.float32) / 255.0, ids, mask_config)
        weak_ious.append(iou(weak != 0, truth))
        band = sample.mask == IGNORE_INDEX
        final_ious.append(iou(sample.mask != 0, truth, valid=~band))
        banded_ious.append(iou((sample.mask != 0) & ~band, truth))
    return {"kept": kept, "background_error_in_objects": float(np.mean(errors)), "object_colour_left": float(np.mean(left)),
            "own_colour_left": float(np.mean(own_left)), "weak_iou": float(np.mean(weak_ious)), "final_iou": float(np.mean(final_ious)),
            "final_iou_band_as_background": float(np.mean(banded_ious))}


def training_flops(run_dir: Path, scratch: Path) -> dict:
    """FLOPs of one training image (VAE encode, text encode, denoiser forward and backward),
    counted by torch's FLOP counter on a batch of one."""
    from torch.utils.flop_counter import FlopCounterMode

    from maskmint.pipeline.distill import Trainer

    trainer = Trainer(run_dir, scratch, DistillConfig(batch_size=1, steps=1))
    with FlopCounterMode(display=False) as counter:
        trainer.loss(0).backward()
    return {"gflop_per_training_image": round(counter.get_total_flops() / 1e9, 3)}


def rescore(out: Path, model: Path = SHIPPED_MODEL) -> dict:
    """Scores of every held-out run under OUT/runs, and each split's VAE round trip."""
    vae = toy_vae(model)
    results = {}
    for split in sorted(p for p in (out / "data").iterdir() if p.name != "train"):
        results[f"{split.name}_vae_round_trip"] = vae_round_trip(split, vae)
        for run_dir in sorted((out / "runs").glob(f"{split.name}-with*")):
            results[run_dir.name] = score(run_dir, split)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=64)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=DistillConfig().lr, help="distill's learning rate (default the paper's)")
    parser.add_argument("--rank", type=int, default=DistillConfig().rank)
    parser.add_argument("--layers", choices=get_args(DistillConfig.model_fields["layers"].annotation),
                        default=DistillConfig().layers,
                        help="the layers the adapter wraps (distill --layers)")
    parser.add_argument("--concept-share", type=float, default=DistillConfig().concept_share,
                        help="share of steps on the image's own caption (default the paper's)")
    parser.add_argument("--background-margin", type=int, default=DistillConfig().background_margin_px,
                        help="distill --background-margin-px")
    parser.add_argument("--domain", choices=["fine", "coarse"], default="fine",
                        help="the unseen backgrounds: 4-9 px patterns, or 12-18 px ones the toy VAE can draw back")
    parser.add_argument("--test-seed", type=int, default=HELD_OUT_SEED,
                        help="the held-out splits' seed; tune on another, report on the default")
    parser.add_argument("--refine-shift", type=int, default=0,
                        help="refine.shift_px of the held-out runs, with and without the adapter")
    parser.add_argument("--vae", type=Path, default=None, metavar="MODEL",
                        help="decode with this toy model folder's VAE (e.g. bench.train_toy_model --decoder-kinds "
                             "with the unseen patterns) instead of the shipped one; the UNet stays the shipped one")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rescore", action="store_true",
                        help="only score every run already under OUT/runs again (with today's scores)")
    parser.add_argument("--flops", type=Path, metavar="RUN", help="only count one training image's FLOPs on RUN")
    args = parser.parse_args(argv)
    if args.vae is not None and not (args.vae / "vae").is_dir():
        parser.error(f"--vae {args.vae}: no vae/ folder there (a toy model folder such as assets/tiny-sd-pattern-decoder)")
    out = args.out
    if args.flops:
        print(json.dumps(training_flops(args.flops, out / "flops-scratch")))
        return 0
    if args.rescore:
        results = rescore(out, with_vae(out, args.vae))
        print(json.dumps(results, indent=1))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    unseen = tuple(COARSE_UNSEEN_KINDS if args.domain == "coarse" else UNSEEN_KINDS)
    seed = "" if args.test_seed == HELD_OUT_SEED else f"-seed{args.test_seed}"
    splits = {
        "train": write_split(out / "data" / "train", args.train, TRAIN_SEED, unseen),
        "unseen": write_split(out / "data" / f"unseen{seed}", args.test, args.test_seed, unseen),
        "shipped": write_split(out / "data" / f"shipped{seed}", args.test, args.test_seed, BACKGROUND_KINDS),
    }
    model = with_vae(out, args.vae)
    started = time.perf_counter()
    annotate(splits["train"], args.train, out / "runs" / "train", model=model)
    annotate_seconds = time.perf_counter() - started
    tag = (f"lr{args.lr:g}-rank{args.rank}-steps{args.steps}" + ("-coarse" if args.domain == "coarse" else "")
           + (f"-concept{args.concept_share:g}" if args.concept_share != DistillConfig().concept_share else "")
           + (f"-{args.layers}" if args.layers != DistillConfig().layers else "")
           + (f"-margin{args.background_margin}" if args.background_margin != DistillConfig().background_margin_px else ""))
    held_out = f"-shift{args.refine_shift}" if args.refine_shift else ""
    adapter = out / f"adapter-{tag}"
    report = distill(out / "runs" / "train", adapter, DistillConfig(steps=args.steps, lr=args.lr, rank=args.rank,
                                                                    concept_share=args.concept_share,
                                                                    layers=args.layers,
                                                                    background_margin_px=args.background_margin))
    results = {"train_images": args.train, "test_images": args.test, "distill": report,
               "annotate_train_seconds": round(annotate_seconds, 1),
               "train_seconds_per_1000_images_seen": round(report["train_seconds"] * 1000 /
                                                           (report["steps_done"] * report["options"]["batch_size"]), 1)}
    vae = toy_vae(model)
    results["domain"] = args.domain
    results["test_seed"] = args.test_seed
    results["vae"] = str(args.vae) if args.vae else "shipped"
    for name in ("unseen", "shipped"):
        split = splits[name].parent
        results[f"{name}_vae_round_trip"] = vae_round_trip(split, vae)
        for label, used in (("without", None), ("with", adapter)):
            run_dir = out / "runs" / (f"{split.name}-without{held_out}" if used is None
                                      else f"{split.name}-with-{tag}{held_out}")
            annotate(splits[name], args.test, run_dir, used, args.refine_shift, model)
            results[f"{name}_{label}"] = score(run_dir, split)
            print(name, label, results[f"{name}_{label}"], flush=True)
    results["refine_shift_px"] = args.refine_shift
    (out / f"distill-toy-{tag}{held_out}{seed}.json").write_text(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
