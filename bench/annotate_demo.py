"""Toy-world renders written as plain image files, with their truth: what annotate mode and
`maskmint evaluate` are tried on.

    python -m bench.annotate_demo --out assets/annotate-demo --count 24 --seed 7

OUT/images/NNNN.png (the scenes), OUT/truth/NNNN.png (class-index PNGs, VOC's
SegmentationClass layout: 0 background, the shape's class id) and OUT/lines.jsonl (one line
per image: its caption, its shapes as concepts, and the scene without them as the
background prompt). Seeds from 7 up are not the ones the toy
model or the quality benchmarks were tuned on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np

from bench.toyworld import render_scene


def write_scenes(out: Path, count: int, seed: int, objects: list[int]) -> list[dict]:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        scene = render_scene(np.random.default_rng(seed * 100_000 + i), n_objects=objects[i % len(objects)])
        name = f"{i:04d}.png"
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(out / "truth" / name), scene.mask)
        background = scene.caption.rpartition(" on ")[2]  # the scene without its objects: what removal asks for
        lines.append({"image": f"images/{name}", "prompt": scene.caption, "concepts": [s for _, s in scene.objects],
                      "background": background})
    (out / "lines.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--objects", type=int, nargs="+", default=[1], help="objects per scene, in turn")
    args = parser.parse_args(argv)
    lines = write_scenes(args.out, args.count, args.seed, args.objects)
    print(f"{args.out}: {len(lines)} scenes with their truth")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
