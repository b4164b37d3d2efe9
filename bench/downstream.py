"""Does a maskmint dataset train a segmenter? Toy-world proof against exact-truth data.

    python -m bench.downstream --run runs/demo-256 --json bench/downstream.json

Trains the same small segmentation network (MONAI's BasicUNet, random init, nothing
downloaded) for the same budget on
  (i)  a maskmint run made with the embedded toy model (its masks, 255 ignored), and
  (ii) the same number of toy-world renders with their exact masks, with as many objects
       in each as the run's prompts asked for (1-3, overlaps allowed),
then evaluates both on held-out exact-truth renders with the same mix of object counts
(mIoU over background + the three shapes) and reports the ratio (i)/(ii). Also reports the loader's rate (samples/s) with
two DataLoader workers over the run's shards. If --run does not exist it is made first
with --config and --samples (the Ray executor, as a user would).

CPU defaults take a few minutes. Larger: --samples 2048 --train-steps 3000 --batch 32.
Several objects per image: --config configs/multi.yaml --run runs/downstream-multi.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench import write_json
from bench.toyworld import SHAPES, render_scene
from maskmint.pipeline.dataset import read_samples, segmentation_dataset

NUM_CLASSES = 1 + len(SHAPES)


def build_model():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=3, out_channels=NUM_CLASSES, features=(16, 32, 64, 128, 256, 16))


def renders(object_counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact-truth scenes, one per entry, each with that many objects."""
    rng = np.random.default_rng(seed)
    scenes = [render_scene(rng, n_objects=n) for n in object_counts]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    masks = torch.from_numpy(np.stack([s.mask for s in scenes]).astype(np.int64))
    return images, masks


def render_batches(images: torch.Tensor, masks: torch.Tensor, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start : start + batch]
            flip = torch.rand(()) < 0.5
            image, mask = images[index], masks[index]
            yield (image.flip(-1), mask.flip(-1)) if flip else (image, mask)


def run_batches(run: Path, batch: int, seed: int, workers: int):
    dataset = segmentation_dataset(run, size=None, train=True, shuffle=512, seed=seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    while True:
        yield from loader


def train(batches, steps: int, seed: int, lr: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for images, masks in itertools.islice(batches, steps):
        loss = F.cross_entropy(model(images), masks, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def mean_iou(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor) -> tuple[float, list[float]]:
    predicted = torch.cat([model(images[i : i + 64]).argmax(1) for i in range(0, len(images), 64)])
    ious = []
    for c in range(NUM_CLASSES):
        inter = ((predicted == c) & (masks == c)).sum().item()
        union = ((predicted == c) | (masks == c)).sum().item()
        ious.append(inter / union if union else float("nan"))
    return float(np.nanmean(ious)), ious


def loader_rate(run: Path, workers: int, epochs: int = 3) -> float:
    dataset = segmentation_dataset(run, size=None, train=True, shuffle=256)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers)
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, _ in loader:
            count += len(images)
    return count / (time.perf_counter() - start)


def object_counts(run: Path) -> list[int]:
    """How many concepts each of the run's samples was prompted with."""
    return [len(sample.metadata["concepts"]) for sample in read_samples(run)]


def make_run(config: Path, run: Path, samples: int) -> None:
    from maskmint import launch
    from maskmint.schemas.config import load_config

    data = load_config(config).model_dump(mode="json")
    data["output"]["samples"] = samples
    data["output"]["shard_size"] = max(8, samples // 16)
    path = run.with_suffix(".yaml")
    run.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(data))
    if launch.main(["run", "--config", str(path), "--out", str(run)]) != 0:
        raise SystemExit(f"making {run} failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/downstream"), help="maskmint run (made if missing)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="config to make the run with")
    parser.add_argument("--samples", type=int, default=384, help="samples of the run to make")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval", type=int, default=500, help="held-out exact-truth renders")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if not (args.run / "run.json").exists():
        make_run(args.config, args.run, args.samples)
    counts = object_counts(args.run)
    written = len(counts)
    eval_counts = np.random.default_rng(20_000 + args.seed).choice(counts, size=args.eval).tolist()
    eval_images, eval_masks = renders(eval_counts, seed=10_000 + args.seed)
    truth_images, truth_masks = renders(counts, seed=args.seed)

    started = time.time()
    on_maskmint = train(run_batches(args.run, args.batch, args.seed, args.workers), args.train_steps, args.seed, args.lr)
    maskmint_seconds = time.time() - started
    on_truth = train(render_batches(truth_images, truth_masks, args.batch, args.seed), args.train_steps, args.seed, args.lr)
    miou_maskmint, ious_maskmint = mean_iou(on_maskmint, eval_images, eval_masks)
    miou_truth, ious_truth = mean_iou(on_truth, eval_images, eval_masks)
    rate = loader_rate(args.run, args.workers)

    result = {
        "run": str(args.run), "train_samples": written,
        "objects_per_sample": {str(n): counts.count(n) for n in sorted(set(counts))}, "train_steps": args.train_steps, "batch": args.batch,
        "eval_renders": args.eval, "miou_maskmint": miou_maskmint, "miou_exact": miou_truth,
        "ratio": miou_maskmint / miou_truth, "iou_per_class_maskmint": ious_maskmint, "iou_per_class_exact": ious_truth,
        "loader_samples_per_s": rate, "loader_workers": args.workers, "train_seconds_maskmint": round(maskmint_seconds, 1),
    }
    names = ["background", *SHAPES]
    print(f"downstream: BasicUNet, {args.train_steps} steps x {args.batch} on {written} samples, eval on {args.eval} renders")
    print("| trained on | mIoU | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print(f"| (i) maskmint run | {miou_maskmint:.3f} | " + " | ".join(f"{v:.3f}" for v in ious_maskmint) + " |")
    print(f"| (ii) exact renders | {miou_truth:.3f} | " + " | ".join(f"{v:.3f}" for v in ious_truth) + " |")
    print(f"ratio (i)/(ii) = {result['ratio']:.3f}; loader {rate:.0f} samples/s with {args.workers} workers")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
