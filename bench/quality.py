"""Mask quality against the toy world's exact truth, stage by stage.

    python -m bench.quality --config configs/demo.yaml --samples 96 --seed 0 --json bench/quality.json
    python -m bench.quality --config configs/annotate.yaml --render 96 --render-seed 11 --objects 1

With --render the samples are not generated: that many toy-world scenes are rendered to
image files with their captions in a JSONL (`bench.annotate_demo`), and the config annotates
them (annotate mode); the truth is taken from the pixels the same way.

Runs maskmint's own stages in this process (generate with capture, weak mask, remove,
refine, filter) on the config's toy-world prompts ("a red circle on a striped gray
background") and scores every sample against truth taken from the world's rules:

- Truth mask of each concept of a generated image: the pixels of the colour the prompt puts
  right before the concept's word ("a red circle and a blue square"). Backgrounds in the
  toy world are achromatic and objects are saturated, so a pixel is object exactly when its
  HSV saturation >= 110 and value >= 70 (`bench.toyworld.object_pixels`), and it is the
  requested object when its hue is within 12 (OpenCV 0..179 scale) of the colour's hue
  (`colour_pixels`). Only the largest connected blob counts, so a stray speck of colour
  elsewhere is not 'object'.
- Prompt fidelity: every concept's blob exists (>= 1% of the image) and its fill ratio (area
  over bounding box) is closest to the requested shape's (square 1.0, circle 0.79, triangle 0.5);
  a blob that borders another object may be partly covered by it, so only its presence counts.
- heat AUC: how well each concept's map ranks its truth pixels above every other pixel
  (ROC AUC, 0.5 chance), before any threshold.
- weak IoU: weak mask == the class vs that concept's truth (255 of the `band` threshold left
  out); refined IoU: final mask == the class vs truth, with the 255 band left out of both
  (scored separately as `band share`, the share of the image's pixels marked 255); a
  sample's figure is the mean over its concepts. mIoU: per class the mean over samples
  showing it, then the mean over classes. Class confusion: the share of truth object pixels
  labelled as another class.
- removal: share of the removed region's pixels (the dilated weak mask that was
  inpainted) that are still object-coloured (any object colour) in the background.
  `psnr ring`: background vs image inside the removed region but outside the truth object,
  i.e. how faithfully inpainting rebuilt the scene around the object; outside the removed
  region the background is the image itself by construction (exact, not scored).

IoU columns are means over faithful samples (no truth otherwise); `kept` is the share the
filter keeps. Tune settings on one --seed, report on another: the run seed changes every
sample's seed and prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np

from bench import write_json
from bench.toyworld import (
    COLORS,
    FILL_RATIOS,
    closest_shape,
    colour_pixels,
    object_pixels,
    touches_other_object,
)
from maskmint.pipeline.worker import ShardWorker, as_columns
from maskmint.schemas.config import RunConfig, load_config
from maskmint.schemas.records import IGNORE_INDEX

MIN_BLOB = 0.01


def largest_blob(region: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(region, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def iou(a: np.ndarray, b: np.ndarray, valid: np.ndarray | None = None) -> float:
    if valid is not None:
        a, b = a & valid, b & valid
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    if not where.any():
        return None
    mse = float(np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def colour_of(prompt: str, span) -> str:
    """The colour word right before a concept ("a red circle"): which pixels are that object."""
    words = prompt[: span.char_span[0]].split()
    if not words or words[-1] not in COLORS:
        raise ValueError(f"toy-world prompts put a colour before each shape: {prompt!r}")
    return words[-1]


def score_sample(batch: dict, i: int, removal_dilate: int) -> dict:
    """Scores of one sample with one or more concepts; per class where it applies."""
    image, background, prompt = batch["image"][i], batch["background"][i], batch["prompt"][i]
    spans = batch["concepts"][i]
    truths = {}
    faithful = True
    for span in spans:
        truth = largest_blob(colour_pixels(image, colour_of(prompt, span)))
        # an object bordering another may be partly covered: its shape is not checked, only its presence
        shape_right = span.name in FILL_RATIOS and (closest_shape(truth) == span.name or touches_other_object(truth, image))
        faithful &= bool(truth.mean() >= MIN_BLOB and shape_right)
        truths[span.class_id] = truth
    objects = np.logical_or.reduce(list(truths.values()))
    weak, mask = batch["weak_mask"][i], batch["mask"][i]
    band = mask == IGNORE_INDEX
    weak_valid = weak != IGNORE_INDEX  # the `band` threshold's uncertain pixels are not scored
    removed = cv2.dilate((weak != 0).astype(np.uint8), np.ones((2 * removal_dilate + 1,) * 2, np.uint8)) > 0
    left = object_pixels(background) & removed
    ring = removed & ~cv2.dilate(objects.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    per_class = {
        c: {"weak": iou(weak == c, truth, valid=weak_valid), "refined": iou(mask == c, truth, valid=~band),
            "heat_auc": heat_auc(heat, truth)}
        for (c, truth), heat in zip(truths.items(), batch["heat"][i])
    } if faithful else {}

    def confused(labels: np.ndarray) -> float:
        wrong = sum((truth & (labels != c) & (labels != 0) & (labels != IGNORE_INDEX)).sum() for c, truth in truths.items())
        return float(wrong / objects.sum())

    return {
        "key": batch["key"][i],
        "prompt": prompt,
        "concepts": len(spans),
        "faithful": faithful,
        "truth_area": round(float(objects.mean()), 4),
        "heat_auc": mean(v["heat_auc"] for v in per_class.values()) if faithful else None,
        "weak_iou": mean(v["weak"] for v in per_class.values()) if faithful else None,
        "refined_iou": mean(v["refined"] for v in per_class.values()) if faithful else None,
        "per_class": {str(c): v for c, v in per_class.items()},
        "weak_confusion": confused(weak) if faithful else None,
        "confusion": confused(mask) if faithful else None,
        "band_share": float(band.mean()),
        "object_left": float(left.sum() / removed.sum()) if removed.any() else None,
        "psnr_ring": psnr(background, image, ring),
        "kept": batch["drop"][i] is None,
        "drop": batch["drop"][i],
    }


def heat_auc(heat: np.ndarray, truth: np.ndarray) -> float | None:
    """How well a concept's map ranks its object's pixels above all others (ROC AUC; 0.5 is
    chance, below it the map is hotter off the object), whatever threshold follows."""
    from sklearn.metrics import roc_auc_score

    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth.ravel(), heat.ravel()))


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def class_mean(scores: list[dict], stage: str) -> float | None:
    """mIoU: per class the mean IoU over the faithful samples showing it, then the mean over classes."""
    by_class = defaultdict(list)
    for s in scores:
        for c, values in s["per_class"].items():
            by_class[c].append(values[stage])
    return mean(mean(v) for v in by_class.values())


def summarise(scores: list[dict]) -> dict:
    faithful = [s for s in scores if s["faithful"]]
    return {
        "samples": len(scores),
        "prompt_fidelity": len(faithful) / len(scores),
        "heat_auc": mean(s["heat_auc"] for s in faithful),
        "weak_iou": mean(s["weak_iou"] for s in faithful),
        "refined_iou": mean(s["refined_iou"] for s in faithful),
        "refined_iou_kept": mean(s["refined_iou"] for s in faithful if s["kept"]),
        "weak_miou": class_mean(faithful, "weak"),
        "refined_miou": class_mean(faithful, "refined"),
        "weak_confusion": mean(s["weak_confusion"] for s in faithful),
        "confusion": mean(s["confusion"] for s in faithful),
        "band_share": mean(s["band_share"] for s in scores),
        "object_left": mean(s["object_left"] for s in scores),
        "psnr_ring": mean(s["psnr_ring"] for s in scores),
        "kept": float(np.mean([s["kept"] for s in scores])),
    }


def evaluate(config: RunConfig, samples: int, progress: bool = True,
             variants: list[RunConfig] = ()) -> tuple[dict, list[dict], dict, list[dict]]:
    """Scores of `config`, and of each of `variants` (the same run with other refine/filter
    settings) on the very same images, backgrounds and weak masks: the model runs once."""
    from maskmint.stages.filter import EarlyFilter, Filter
    from maskmint.stages.refine import Refine

    seconds: dict[str, float] = defaultdict(float)
    finishes = [(Refine(v.refine), EarlyFilter(v.filter, v.refine.dilate_px), Filter(v.filter)) for v in variants]
    if variants:  # a variant may keep what the config drops early: every sample gets its background
        config = config.model_copy(update={"execution": config.execution.model_copy(update={"early_drops": False})})
    with tempfile.TemporaryDirectory() as scratch:
        worker = ShardWorker(config, scratch)
        scores, variant_scores = [], [[] for _ in variants]
        size = config.generation.batch_size
        for start in range(0, samples, size):
            planned = [worker.plan.sample(i) for i in range(start, min(samples, start + size))]
            modelled = worker.model_stages(as_columns(planned), seconds)
            for (refine, early, keep), found in zip(finishes, variant_scores):
                batch = dict(modelled)
                batch.update(refine(batch))
                batch.update(early(batch))
                batch.update(keep(batch))
                found += [score_sample(batch, i, config.removal.dilate_px) for i in range(len(planned))]
            batch = worker.mask_stages(modelled, seconds)
            scores += [score_sample(batch, i, config.removal.dilate_px) for i in range(len(planned))]
            if progress:
                print(f"\r{len(scores)}/{samples} samples", end="", file=sys.stderr, flush=True)
        worker.close()
    if progress:
        print(file=sys.stderr)
    return summarise(scores), scores, dict(seconds), [summarise(found) for found in variant_scores]


ROWS = [
    ("prompt fidelity", "prompt_fidelity", "{:.1%}", ">= 90%"),
    ("heat-map AUC (object pixels ranked above the rest)", "heat_auc", "{:.3f}", ""),
    ("weak-mask IoU", "weak_iou", "{:.3f}", ">= 0.80"),
    ("refined-mask IoU", "refined_iou", "{:.3f}", ">= 0.90"),
    ("refined IoU, kept samples", "refined_iou_kept", "{:.3f}", ""),
    ("weak-mask mIoU (over classes)", "weak_miou", "{:.3f}", ""),
    ("final-mask mIoU (over classes)", "refined_miou", "{:.3f}", ""),
    ("class confusion, weak (share of object pixels)", "weak_confusion", "{:.2%}", ""),
    ("class confusion, final", "confusion", "{:.2%}", "< 1%"),
    ("255-band share of pixels", "band_share", "{:.2%}", ""),
    ("object colour left in removed region", "object_left", "{:.2%}", "< 2%"),
    ("PSNR around the object (dB)", "psnr_ring", "{:.1f}", ""),
    ("kept by the filter", "kept", "{:.1%}", ""),
]


def table(summary: dict) -> str:
    lines = ["| metric | value | goal |", "|---|---|---|"]
    for label, key, fmt, goal in ROWS:
        value = summary[key]
        lines.append(f"| {label} | {'n/a' if value is None else fmt.format(value)} | {goal} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="a toy-world run config")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0, help="run seed: every sample's seed and prompt follow it")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and per-sample scores here")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set mask.tau=0.3 (repeatable)")
    parser.add_argument("--sweep", default=None, metavar="SECTION.FIELD=V1,V2,...",
                        help="also score these values of one refine or filter field on the same generated images, "
                             "e.g. --sweep refine.delta_e=20,40,60")
    parser.add_argument("--render", type=int, default=None, metavar="N",
                        help="annotate N rendered toy-world scenes instead of generating --samples")
    parser.add_argument("--render-seed", type=int, default=11, help="the scenes' seed (7 made assets/annotate-demo)")
    parser.add_argument("--objects", type=int, nargs="+", default=[1], help="objects per rendered scene, in turn")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    data = config.model_dump(mode="json")
    data["execution"]["seed"] = args.seed
    scratch = tempfile.TemporaryDirectory()
    if args.render:
        from bench.annotate_demo import write_scenes

        write_scenes(Path(scratch.name), args.render, args.render_seed, args.objects)
        data["prompts"]["file"] = str(Path(scratch.name) / "lines.jsonl")
        args.samples = args.render
    data["output"]["samples"] = args.samples
    for item in args.set:
        set_field(data, item)
    config = RunConfig.model_validate(data)
    variants = []
    if args.sweep:
        path, _, values = args.sweep.partition("=")
        if path.partition(".")[0] not in ("refine", "filter"):
            parser.error("--sweep takes a refine or filter field: they run after the model")
        variants = [RunConfig.model_validate(set_field(copy.deepcopy(data), f"{path}={value}"))
                    for value in values.split(",")]

    start = time.time()
    summary, scores, seconds, swept = evaluate(config, args.samples, variants=variants)
    summary["seconds"] = round(time.time() - start, 1)
    source = f"{args.render} renders (seed {args.render_seed}, objects {args.objects}) annotated" if args.render else "generated"
    print(f"maskmint quality: {args.samples} samples {source}, seed {args.seed}, {config.model.path}")
    print(table(summary))
    if swept:
        print(sweep_table(args.sweep, swept))
    scratch.cleanup()
    write_json(args.json, {"config": str(args.config), "seed": args.seed, "overrides": args.set, "summary": summary,
                           "render": {"scenes": args.render, "seed": args.render_seed, "objects": args.objects}
                           if args.render else None,
                           "seconds_by_stage": seconds, "samples": scores,
                           "sweep": {"field": args.sweep, "summaries": swept} if swept else None})
    return 0


def set_field(data: dict, item: str) -> dict:
    path, _, value = item.partition("=")
    section, _, field = path.partition(".")
    try:
        data[section][field] = json.loads(value)
    except json.JSONDecodeError:
        data[section][field] = value  # a bare string, e.g. mask.threshold=otsu
    return data


SWEEP_COLUMNS = ("refined_iou", "refined_miou", "confusion", "band_share", "kept")


def sweep_table(sweep: str, summaries: list[dict]) -> str:
    path, _, values = sweep.partition("=")
    lines = [f"| {path} | " + " | ".join(SWEEP_COLUMNS) + " |", "|---" * (len(SWEEP_COLUMNS) + 1) + "|"]
    for value, summary in zip(values.split(","), summaries):
        cells = ["n/a" if summary[k] is None else f"{summary[k]:.4f}" for k in SWEEP_COLUMNS]
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
