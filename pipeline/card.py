"""DIR/README.md: a dataset card written at the end of a run, so a shared dataset explains itself."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from maskmint.pipeline.preview import write_preview
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.records import RunSummary, ShardStats
from maskmint.stages.durable import atomic_write_bytes

PREVIEW_NAME = "preview.png"


def _distribution(values: list[float]) -> str:
    if not values:
        return "n/a"
    low, median, high = np.percentile(values, [5, 50, 95])
    return f"{median:.3g} [{low:.3g}-{high:.3g}]"


def shard_pattern(summary: RunSummary, whole: list[int]) -> str:
    """The brace pattern when every shard is whole; a partial run lists the shards it has."""
    if summary.whole:
        return f'"shards/{{000000..{max(summary.planned_shards - 1, 0):06d}}}.tar"'
    return json.dumps([f"shards/{s:06d}.tar" for s in sorted(whole)])


def class_counts(stats: list[ShardStats]) -> dict[int, tuple[int, int]]:
    """class id -> (samples written, samples dropped) showing that class."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for s in stats:
        for key, classes in s.classes.items():
            for class_id in classes:
                counts[class_id][key in s.dropped] += 1
    return defaultdict(lambda: (0, 0), {k: (v[0], v[1]) for k, v in counts.items()})


def score_table(stats: list[ShardStats], classes: dict) -> list[str]:
    """Per-sample score distributions: all samples, then per class (median, 5-95%)."""
    names = sorted({n for s in stats for scores in s.scores.values() for n in scores})
    if not names:
        return ["## Mask scores", "", "No per-sample scores recorded."]
    columns: dict[str, list[dict]] = defaultdict(list)
    for s in stats:
        for key, scores in s.scores.items():
            columns["all"].append(scores)
            for class_id in s.classes.get(key, []):
                columns[classes.get(str(class_id), classes.get(class_id, str(class_id)))].append(scores)
    groups = ["all", *sorted(g for g in columns if g != "all")]
    return [
        "## Mask scores (per sample: median, and 5%-95% in brackets)",
        "",
        "| score | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
        *[f"| {n} | " + " | ".join(_distribution([q[n] for q in columns[g] if n in q]) for g in groups) + " |"
          for n in names],
        "",
        "Per-sample scores are in each sample's `json` under `quality`, and in the shard's stats json;"
        " `maskmint preview DIR --by SCORE --worst N` shows the lowest.",
    ]


def write_card(run_dir: Path | str, summary: RunSummary, stats: list[ShardStats]) -> Path:
    rundir = RunDir(run_dir)
    manifest = rundir.manifest()
    config = manifest.config
    per_class = class_counts(stats)
    lines = [
        f"# {config.get('name', 'maskmint run')}",
        "",
        "A segmentation dataset minted by maskmint from a text-to-image model: per sample an image, "
        "a class-index mask (0 background, class ids, 255 ignore), the background with the object "
        "removed, the concept's attention heat map and metadata, in WebDataset shards under `shards/`.",
        "",
        f"- state: {'whole' if summary.whole else f'partial ({len(summary.pending_shards)} shards pending)'}",
        f"- model: `{config['model']['path']}`" + (f", inpainting `{config['model']['inpaint_path']}`"
                                                   if config["model"].get("inpaint_path") else ""),
        f"- samples: {summary.written} written, {summary.dropped} dropped, {summary.planned_samples} planned, "
        f"in {summary.complete_shards}/{summary.planned_shards} shards",
        "- kept per class (of attempts): " + ", ".join(
            f"{name} {summary.kept_per_class[name]} of {n}" for name, n in summary.attempts_per_class.items())
        + (f"; {summary.top_up_rounds} top-up round(s) for the quota" if summary.top_up_rounds else ""),
        f"- config hash: `{manifest.config_hash}` (full config in `run.json`)",
        f"- generation: {config['generation']['steps']} steps, guidance {config['generation']['guidance_scale']}; "
        f"weak mask {config['mask']['threshold']} threshold tau {config['mask']['tau']}; "
        f"removal {config['removal']['steps']} steps; ignore band {'on' if config['refine']['ignore_band'] else 'off'}",
        "",
        "## Classes",
        "",
        "| id | name | samples written | dropped |",
        "|---|---|---|---|",
        "| 0 | background | | |",
        *[f"| {k} | {v} | {per_class[int(k)][0]} | {per_class[int(k)][1]} |"
          for k, v in sorted(manifest.classes.items(), key=lambda item: int(item[0]))],
        "| 255 | ignore (uncertain pixels) | | |",
        "",
        "## Drops",
        "",
    ]
    if summary.dropped_by_reason:
        lines += ["| reason | samples |", "|---|---|", *[f"| {r} | {n} |" for r, n in summary.dropped_by_reason.items()]]
    else:
        lines.append("No sample was dropped.")
    lines += ["", *score_table(stats, manifest.classes), ""]
    if summary.written:
        write_preview(rundir.root, rundir.root / PREVIEW_NAME)
        lines += ["## Preview", "", "image | heat map | weak mask | background | mask overlay", "",
                  f"![preview]({PREVIEW_NAME})", ""]
    lines += [
        "## Reading it",
        "",
        "```python",
        "import webdataset as wds",
        f"ds = wds.WebDataset({shard_pattern(summary, [s.shard for s in stats])}).decode(\"rgb8\")",
        "```",
        "",
        f"Fields: {json.dumps(manifest.fields)}",
        "",
    ]
    path = rundir.root / "README.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path
