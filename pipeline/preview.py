"""A contact sheet of a run, so a person can judge it at a glance.

Each row is one sample, random or ranked by a quality score (the worst first, to find failure
modes): image | heat map | weak mask | background | final mask over the image. The weak mask is recomputed from the stored heat map with the run's own mask
settings, so it is the mask the run started from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from maskmint.pipeline.dataset import Sample, read_samples
from maskmint.pipeline.rundir import RunDir, RunDirError
from maskmint.schemas.config import MaskConfig
from maskmint.schemas.records import IGNORE_INDEX, ShardStats
from maskmint.stages.weak_mask import weak_mask

COLUMNS = ("image", "heat map", "weak mask", "background", "mask overlay")


def class_colours(class_ids: list[int]) -> dict[int, np.ndarray]:
    """A distinct colour per class; the ignore band is white."""
    hues = np.linspace(0, 180, num=max(len(class_ids), 1), endpoint=False)
    colours = {
        cid: cv2.cvtColor(np.uint8([[[h, 220, 255]]]), cv2.COLOR_HSV2RGB)[0, 0] for cid, h in zip(class_ids, hues)
    }
    colours[IGNORE_INDEX] = np.array([255, 255, 255], np.uint8)
    return colours


def paint(mask: np.ndarray, colours: dict[int, np.ndarray]) -> np.ndarray:
    out = np.zeros((*mask.shape, 3), np.uint8)
    for value, colour in colours.items():
        out[mask == value] = colour
    return out


def sample_row(sample: Sample, mask_config: MaskConfig, colours: dict[int, np.ndarray]) -> np.ndarray:
    class_ids = [c["class_id"] for c in sample.metadata["concepts"]]
    heat = sample.heatmap.astype(np.float32) / 255.0
    weak = weak_mask(heat, class_ids, mask_config)
    heat_rgb = cv2.cvtColor(cv2.applyColorMap(sample.heatmap.max(axis=0), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    painted = paint(sample.mask, colours)
    labelled = sample.mask > 0
    overlay = sample.image.copy()
    overlay[labelled] = (0.45 * sample.image[labelled] + 0.55 * painted[labelled]).astype(np.uint8)
    return np.concatenate([sample.image, heat_rgb, paint(weak, colours), sample.background, overlay], axis=1)


def random_samples(rundir: RunDir, count: int, seed: int) -> list[Sample]:
    """`count` random samples drawn from up to `count` random whole shards (so a preview of a
    run of millions reads a few shards, not all)."""
    rng = np.random.default_rng(seed)
    shards = sorted(rundir.complete_shards())
    picked = sorted(rng.choice(shards, size=min(count, len(shards)), replace=False).tolist()) if shards else []
    chosen: list[Sample] = []
    for seen, sample in enumerate(read_samples([rundir.tar_path(s) for s in picked])):
        if len(chosen) < count:
            chosen.append(sample)
        elif (slot := int(rng.integers(0, seen + 1))) < count:
            chosen[slot] = sample
    return sorted(chosen, key=lambda s: s.key)


@dataclass(frozen=True)
class Ranked:
    key: str
    shard: int
    score: float
    class_id: int | None  # the class row it was picked for (per-class review)


def rank(stats: list[ShardStats], by: str, count: int, highest: bool = False, per_class: bool = False) -> list[Ranked]:
    """The `count` written samples lowest on score `by` (highest with `highest`), from the shard
    stats alone; with `per_class`, `count` for every class, class by class. Ties go by key."""
    entries = [
        (key, s.shard, scores[by], s.classes.get(key, []))
        for s in stats
        for key, scores in s.scores.items()
        if by in scores
    ]
    order = (lambda e: (-e[2], e[0])) if highest else (lambda e: (e[2], e[0]))
    if not per_class:
        return [Ranked(k, shard, score, None) for k, shard, score, _ in sorted(entries, key=order)[:count]]
    picked = []
    for class_id in sorted({c for *_, classes in entries for c in classes}):
        of_class = sorted((e for e in entries if class_id in e[3]), key=order)[:count]
        picked += [Ranked(k, shard, score, class_id) for k, shard, score, _ in of_class]
    return picked


def score_names(stats: list[ShardStats]) -> list[str]:
    return sorted({name for s in stats for scores in s.scores.values() for name in scores})


def ranked_samples(rundir: RunDir, ranked: list[Ranked]) -> list[Sample]:
    """The ranked samples read from their shards, in ranked order."""
    wanted = {r.key for r in ranked}
    found = {s.key: s for s in read_samples([rundir.tar_path(shard) for shard in sorted({r.shard for r in ranked})])
             if s.key in wanted}
    return [found[r.key] for r in ranked]


def contact_sheet(
    run_dir: Path | str, count: int = 8, seed: int = 0, tile: int = 128, ranked: list[Ranked] | None = None
) -> np.ndarray:
    """RGB uint8 sheet: `count` random samples, or the `ranked` ones in their order, each
    captioned with its key, prompt (and score and class when ranked)."""
    rundir = RunDir(run_dir)
    manifest = rundir.manifest()
    mask_config = MaskConfig.model_validate(manifest.config.get("mask", {}))
    colours = class_colours(sorted(int(k) for k in manifest.classes))
    if ranked is None:
        chosen = random_samples(rundir, count, seed)
        captions = [f"{s.key}: {s.metadata['prompt']}" for s in chosen]
    else:
        chosen = ranked_samples(rundir, ranked)
        captions = [
            (f"[{manifest.classes.get(r.class_id, r.class_id)}] " if r.class_id is not None else "")
            + f"{r.key} {r.score:.3g}: {s.metadata['prompt']}"
            for r, s in zip(ranked, chosen)
        ]
    if not chosen:
        raise RunDirError(f"{run_dir}: no whole shard with samples to preview yet")
    rows = []
    for sample, caption in zip(chosen, captions):
        row = sample_row(sample, mask_config, colours)
        height, width = sample.mask.shape
        scale = tile / height
        row = cv2.resize(row, (round(row.shape[1] * scale), tile), interpolation=cv2.INTER_NEAREST)
        label = caption[: 8 * len(COLUMNS) * tile // 100]
        banner = np.full((18, row.shape[1], 3), 255, np.uint8)
        cv2.putText(banner, label, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([banner, row], axis=0))
    header = np.full((18, rows[0].shape[1], 3), 230, np.uint8)
    column_width = rows[0].shape[1] // len(COLUMNS)
    for i, name in enumerate(COLUMNS):
        cv2.putText(header, name, (i * column_width + 4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, *rows], axis=0)


def write_preview(
    run_dir: Path | str, out: Path | str, count: int = 8, seed: int = 0, ranked: list[Ranked] | None = None
) -> Path:
    sheet = contact_sheet(run_dir, count, seed, ranked=ranked)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
        raise RunDirError(f"{out}: cannot write the image (use a .png or .jpg name)")
    return out
