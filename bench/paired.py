"""Is one setting's final mIoU above another's, or within noise? A paired bootstrap over prompts.

    python -m bench.paired --a A_SEED0.json A_SEED1.json --b B_SEED0.json B_SEED1.json

Each side is one or more `bench.quality` JSON files run on the same prompts in the same order
(same run seeds and sample counts; the models may differ, so each side keeps only its own
faithful samples). The prompts are resampled with replacement, the same indices for both
sides, and mIoU (`bench.quality.class_mean`) is taken on each side: the figure is A's mIoU
minus B's, with its 95% interval and the share of resamples in which A is below B.

`--both-faithful` keeps only the prompts both models drew faithfully, so that both mIoUs are
taken over the very same images' prompts: a prompt one model fails to draw then counts for
neither, instead of for the other model alone.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from bench.quality import class_mean


def load(paths: list[str]) -> list[dict]:
    samples = []
    for path in paths:
        with open(path) as f:
            samples += json.load(f)["samples"]
    return samples


def miou(samples: list[dict], indices, stage: str) -> float:
    return class_mean([samples[i] for i in indices if samples[i]["faithful"]], stage)


def paired_difference(a: list[dict], b: list[dict], stage: str = "refined", resamples: int = 2000,
                      seed: int = 0, both_faithful: bool = False) -> dict:
    if [s["prompt"] for s in a] != [s["prompt"] for s in b]:
        raise ValueError("the two sides were not run on the same prompts in the same order")
    if both_faithful:
        kept = [i for i in range(len(a)) if a[i]["faithful"] and b[i]["faithful"]]
        a, b = [a[i] for i in kept], [b[i] for i in kept]
    everything = np.arange(len(a))
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(a), len(a))
        differences.append(miou(a, drawn, stage) - miou(b, drawn, stage))
    low, high = np.percentile(differences, [2.5, 97.5])
    a_all, b_all = miou(a, everything, stage), miou(b, everything, stage)
    return {
        "prompts": len(a), "a": a_all, "b": b_all, "difference": a_all - b_all,
        "interval_95": [float(low), float(high)], "share_a_below_b": float(np.mean(np.array(differences) < 0)),
        "resamples": resamples, "seed": seed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", nargs="+", required=True, help="bench.quality JSON files of setting A")
    parser.add_argument("--b", nargs="+", required=True, help="the same prompts under setting B")
    parser.add_argument("--stage", choices=["weak", "refined"], default="refined")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--both-faithful", action="store_true",
                        help="score only the prompts both sides drew faithfully")
    args = parser.parse_args(argv)
    try:
        result = paired_difference(load(args.a), load(args.b), args.stage, args.resamples, args.seed,
                                   args.both_faithful)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result['prompts']} prompts: A {result['a']:.4f}, B {result['b']:.4f}, A - B {result['difference']:+.4f}, "
          f"95% interval [{result['interval_95'][0]:+.4f}, {result['interval_95'][1]:+.4f}], "
          f"A below B in {result['share_a_below_b']:.0%} of resamples")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
