"""Throughput of maskmint against plain diffusers, side by side in one process.

    python -m bench.throughput --model toy                                   # CPU, < 2 min
    python -m bench.throughput --model sd15 --device cuda --dtype fp16 \\
        --batch 8 --steps 30 --peak-tflops 989 --json bench/throughput-h100.json

Models are built from their real architectures with random weights (nothing downloaded):
`sd15` (UNet 859.5M, CLIP ViT-L/14 text encoder, VAE [128,256,512,512], 512 px), `sdxl`
(UNet 2.57B, CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, 1024 px), the embedded `toy` model
(64 px), `sd3` (SD3 Medium: MM-DiT 2.03B, CLIP-L + bigG + T5-XXL, 1024 px), `flux-schnell`
/ `flux-dev` (Flux.1: MM-DiT 11.9B, CLIP-L + T5-XXL, 1024 px; dev with distilled guidance),
or the test-sized `tiny` / `tiny-sdxl` / `tiny-sd3` / `tiny-flux` ones (32 px). a and b are
the family's own text-to-image and inpainting pipelines (for SD3 and Flux the inpainting
pipelines' latent blending); the full-size MM-DiT models need a GPU's memory. On the same batch,
steps and dtype it times, alternating the variants every round so drift hits all alike:

  a  plain StableDiffusionPipeline (SDPA attention, no capture), images decoded
  b  plain StableDiffusionInpaintPipeline on a's images with a centred mask
  c  maskmint's generate stage (capture on, heat maps out)
  d  maskmint's whole chain per sample: generate, weak mask, remove, refine, filter,
     encode, write (ShardWorker.run_shard on shards of two mini-batches)
  e  (--annotate) the same chain in annotate mode: toy-world renders written as files and
     read back, annotated with the family's default noise settings (or --annotate-steps /
     --annotate-strength) at guidance 1, then removed, refined and written like d; its
     fresh-noise levels stacked --annotate-steps-per-call to a denoiser call
  f  (--annotate) e with one level a call, the loop diffusers' own pipeline would run

and reports samples/s (medians over --repeats rounds after one warm-up round), c/a and
d/(a+b) (time of a plus b per sample over time of d), peak device memory of a vs c
(CUDA), the capture's accumulator bytes after 10 and 50 steps (must not grow), and the
model-FLOP utilisation of d: FLOPs of a + b per sample counted by
torch.utils.flop_counter on the same shapes, times d's rate, over --peak-tflops.
--compile and --channels-last apply to the one UNet all four variants share
(generation.compile, generation.channels_last), so the ratios stay like for like; FLOPs
are then counted on the uncompiled module. --quantize and --offload (model.quantize,
model.offload) likewise apply to every variant; c_sha256 digests one run of c's images and
heat maps, which must not change with --offload.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import write_json
from bench.real_shapes import FAMILY, REPO, build_pipe
from maskmint.pipeline.worker import ShardWorker, as_columns
from maskmint.schemas.config import RunConfig
from maskmint.stages import generate as generate_stage
from maskmint.stages.families import family_of_pipeline
from maskmint.stages.loading import offload_like, quiet_libraries
from maskmint.stages.models import load_inpainting

PROMPTS = {
    "concepts": [{"name": "circle", "class_id": 1}, {"name": "square", "class_id": 2}, {"name": "triangle", "class_id": 3}],
    "templates": [{"prompt": "a {colour} {concept} on a {kind} gray background", "background": "a {kind} gray background"}],
    "fillers": {"colour": ["red", "blue"], "kind": ["flat", "striped"]},
}


def quantize_int8(pipe) -> None:
    """model.quantize: int8 on an in-memory pipeline: the family's denoiser and T5 given
    optimum-quanto int8 weights, as diffusers' and transformers' QuantoConfig do on loading."""
    from optimum.quanto import freeze, qint8, quantize

    for name in family_of_pipeline(pipe).quantized_components():
        module = getattr(pipe, name)
        kept = getattr(module, "_keep_in_fp32_modules", None) or []
        quantize(module, weights=qint8, exclude=[f"*{part}*" for part in kept] or None)
        freeze(module)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Bench:
    def __init__(self, args):
        quiet_libraries()
        self.device = torch.device(args.device)
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
        self.pipe = build_pipe(args.model, self.device, self.dtype)
        if args.quantize:
            quantize_int8(self.pipe)
        self.steps, self.batch = args.steps, args.batch
        self.config = RunConfig.model_validate({
            "model": {"path": str(REPO / "assets" / "tiny-sd"), "device": args.device, "family": FAMILY[args.model],
                      "offload": args.offload},
            "prompts": PROMPTS,
            # compile / channels_last (when asked) change the UNet every variant below shares, a and b included
            "generation": {"steps": args.steps, "guidance_scale": 7.5, "batch_size": args.batch,
                           "compile": args.compile, "channels_last": args.channels_last},
            "removal": {"steps": args.steps, "guidance_scale": 7.5},
            "capture": {"self_attention": args.self_attention, "recipe": args.recipe,
                        "self_attention_downscale": args.self_attention_downscale,
                        "steps": [int(i) for i in args.capture_steps.split(",")] if args.capture_steps else None},
            # keep every sample so all variants do the same work
            "filter": {"min_mask_fraction": 0.0, "max_mask_fraction": 1.0, "max_components": 10**6,
                       "min_image_std": 0.0, "min_removal_delta": 0.0},
            "output": {"samples": 10**6, "shard_size": 2 * args.batch},
            "execution": {"executor": "local", "cpu_threads": 2},
        })
        self.scratch = tempfile.TemporaryDirectory()
        (Path(self.scratch.name) / "shards").mkdir()
        self.family = family_of_pipeline(self.pipe)
        # a and b run the pipeline as diffusers ships it: SDPA everywhere, no capture
        self.plain = dict(self.denoiser.attn_processors)
        self.worker = ShardWorker(self.config, self.scratch.name, pipe=self.pipe)  # installs capture
        self.capture_processors = dict(self.denoiser.attn_processors)
        self.layout = self.worker.generate.layout
        self.inpaint = offload_like(load_inpainting(self.pipe, self.config.model), self.pipe)
        self.batch_columns = as_columns([self.worker.plan.sample(i) for i in range(self.batch)])
        self.height, self.width = self.worker.generate.height, self.worker.generate.width
        mask = np.zeros((self.batch, self.height, self.width, 1), np.float32)
        mask[:, self.height // 4 : 3 * self.height // 4, self.width // 4 : 3 * self.width // 4] = 1.0
        self.mask = mask
        self.images = None
        self.next_shard = 0
        self.annotated_runs = self.annotated(args) if args.annotate else {}

    def annotated(self, args) -> dict:
        """The plans and configs of variants e and f: the same run, its samples reading rendered images."""
        from bench.annotate_demo import write_scenes
        from maskmint.pipeline.plan import Plan

        write_scenes(Path(self.scratch.name) / "renders", 4 * args.batch, 11, [1])
        data = self.config.model_dump(mode="json")
        data["prompts"]["file"] = str(Path(self.scratch.name) / "renders" / "lines.jsonl")
        runs = {}
        for variant, per_call in (("e", args.annotate_steps_per_call), ("f", 1)):
            data["annotate"] = {"steps": args.annotate_steps, "strength": args.annotate_strength,
                                **({"steps_per_call": per_call} if per_call else {})}
            config = RunConfig.model_validate(data)
            runs[variant] = Plan(config, self.layout), config
        return runs

    @property
    def denoiser(self):
        return self.family.denoiser(self.pipe)

    def plain_processors(self) -> None:
        self.denoiser.set_attn_processor(dict(self.plain))  # it pops from the dict

    def text(self, prompts: str, negatives: str) -> dict:
        return self.family.prompt_kwargs(self.layout, self.batch_columns[prompts], self.batch_columns[negatives])

    def generators(self):
        return [torch.Generator(self.device).manual_seed(int(s)) for s in self.batch_columns["seed"]]

    @torch.inference_mode()
    def run_a(self) -> None:
        self.plain_processors()
        out = self.pipe(
            **self.text("prompt", "negative_prompt"),
            num_inference_steps=self.steps, guidance_scale=7.5, height=self.height, width=self.width,
            generator=self.generators(), output_type="np",
        ).images
        self.images = out
        self.denoiser.set_attn_processor(dict(self.capture_processors))

    @torch.inference_mode()
    def run_b(self) -> None:
        self.plain_processors()
        self.inpaint(
            **self.text("background_prompt", "background_negative_prompt"),
            image=self.images, mask_image=self.mask, height=self.height, width=self.width, strength=1.0,
            num_inference_steps=self.steps, guidance_scale=7.5, generator=self.generators(), output_type="np",
        )
        self.denoiser.set_attn_processor(dict(self.capture_processors))

    def run_c(self) -> dict:
        return self.worker.generate(dict(self.batch_columns))

    def c_digest(self) -> str:
        """sha256 of variant c's images and heat maps: runs that differ only in model.offload
        must give the same."""
        out = self.run_c()
        return hashlib.sha256(np.ascontiguousarray(out["image"]).tobytes()
                              + np.ascontiguousarray(out["heatmap"]).tobytes()).hexdigest()

    def run_d(self) -> None:
        for _ in self.worker.run_shard(self.next_shard):
            pass
        self.next_shard += 1

    def run_e(self, variant: str = "e") -> None:
        minted = self.worker.plan, self.worker.config
        self.worker.plan, self.worker.config = self.annotated_runs[variant]
        try:
            for _ in self.worker.run_shard(self.next_shard % 2):  # the renders cycle
                pass
        finally:
            self.worker.plan, self.worker.config = minted
        self.next_shard += 1

    def run_f(self) -> None:
        self.run_e("f")

    def timed(self, variant: str) -> float:
        sync(self.device)
        start = time.perf_counter()
        getattr(self, f"run_{variant}")()
        sync(self.device)
        return time.perf_counter() - start

    def peak_memory(self, variant: str) -> int | None:
        if self.device.type != "cuda":
            return None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        getattr(self, f"run_{variant}")()
        sync(self.device)
        return torch.cuda.max_memory_allocated()

    def capture_bytes(self, steps: int) -> tuple[int, int | None]:
        """Bytes the capture holds after a generation of `steps` steps, and CUDA peak memory."""
        generate = self.worker.generate
        saved = generate.config
        generate.config = saved.model_copy(update={"steps": steps})
        try:
            peak = self.peak_memory("c")
            if peak is None:
                self.run_c()
        finally:
            generate.config = saved
        # the accumulators stay in the store until the next batch begins
        return generate.store.held_bytes(), peak

    def flops_per_sample(self) -> float:
        from torch.utils.flop_counter import FlopCounterMode

        name = self.family.denoiser_component
        compiled = getattr(self.pipe, name)
        for pipe in (self.pipe, self.inpaint):  # count the plain module
            setattr(pipe, name, getattr(compiled, "_orig_mod", compiled))
        try:
            with FlopCounterMode(display=False) as counter:
                self.run_a()
                self.run_b()
        finally:
            for pipe in (self.pipe, self.inpaint):
                setattr(pipe, name, compiled)
        return counter.get_total_flops() / self.batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(FAMILY), default="toy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="generation steps; removal uses the same")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device's dense fp16/bf16 peak, for MFU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the shared UNet (generation.compile); the warm-up round compiles")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for --compile (eager: trace only, for a quick CPU rehearsal)")
    parser.add_argument("--channels-last", action="store_true", help="UNet in channels-last layout (all variants)")
    parser.add_argument("--self-attention", action="store_true",
                        help="capture.self_attention on (c and d): the affinity refinement's cost in c/a")
    parser.add_argument("--self-attention-downscale", type=int, default=2, metavar="N",
                        help="capture.self_attention_downscale with --self-attention (1: the latent's own size)")
    parser.add_argument("--capture-steps", default=None, metavar="I,J,...",
                        help="capture.steps for c and d: the denoising steps whose attention is read (default: all)")
    parser.add_argument("--recipe", choices=["cross", "concept_attention"], default="cross",
                        help="capture.recipe for c and d (concept_attention: sd3/flux models)")
    parser.add_argument("--annotate", action="store_true", help="also time variant e, annotate mode's whole chain")
    parser.add_argument("--annotate-steps", type=int, default=None, help="annotate.steps (default: the family's)")
    parser.add_argument("--annotate-strength", type=float, default=None, help="annotate.strength (default: the family's)")
    parser.add_argument("--annotate-steps-per-call", type=int, default=None,
                        help="annotate.steps_per_call of variant e (default: the config's); f runs one")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="model.quantize: int8 weights for the denoiser and T5 (optimum-quanto), every variant")
    parser.add_argument("--offload", choices=["model", "sequential"], default=None,
                        help="model.offload for every variant (diffusers' CPU-offload hooks; sequential needs CUDA)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    generate_stage.COMPILE_BACKEND = args.compile_backend
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.time()
    bench = Bench(args)
    variants = ["a", "b", "c", "d"] + (["e", "f"] if args.annotate else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.repeats + 1):
        for variant in variants:
            seconds = bench.timed(variant)
            if round_:  # round 0 warms up
                times[variant].append(seconds)
    per_sample = {
        v: statistics.median(t) / (2 * args.batch if v in "def" else args.batch) for v, t in times.items()
    }
    rates = {v: 1.0 / s for v, s in per_sample.items()}
    # a short and a long generation: the capture must hold the same after both (the short one
    # still reaches every step --capture-steps names)
    short = 1 + max(bench.config.capture.steps) if bench.config.capture.steps else 10
    long = max(50, short)
    capture_short, peak_short = bench.capture_bytes(short)
    capture_50, peak_50 = bench.capture_bytes(long)
    flops = bench.flops_per_sample()
    result = {
        "model": args.model, "recipe": args.recipe, "quantize": args.quantize, "offload": args.offload,
        "device": str(bench.device), "c_sha256": bench.c_digest(),
        "device_name": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
        "dtype": args.dtype, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "samples_per_s": {v: round(r, 4) for v, r in rates.items()},
        "c_over_a": per_sample["a"] / per_sample["c"],
        "d_over_a_plus_b": (per_sample["a"] + per_sample["b"]) / per_sample["d"],
        "e_over_d": per_sample["d"] / per_sample["e"] if args.annotate else None,
        "f_over_d": per_sample["d"] / per_sample["f"] if args.annotate else None,
        "e_over_f": per_sample["f"] / per_sample["e"] if args.annotate else None,
        "annotate": {"steps": args.annotate_steps or bench.family.annotate_steps,
                     "strength": args.annotate_strength or bench.family.annotate_strength,
                     "steps_per_call": bench.annotated_runs["e"][1].annotate.steps_per_call} if args.annotate else None,
        "peak_memory_a": bench.peak_memory("a"), "peak_memory_c": bench.peak_memory("c"),
        "capture_short_steps": short, "capture_bytes_short": capture_short, "capture_bytes_50_steps": capture_50,
        "peak_memory_c_short": peak_short, "peak_memory_c_50_steps": peak_50,
        "tflop_per_triple": flops / 1e12,
        "achieved_tflops_d": flops * rates["d"] / 1e12,
        "mfu_d": flops * rates["d"] / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        "seconds": round(time.time() - started, 1),
    }
    print(f"maskmint throughput: {args.model} on {result['device_name']}, {args.dtype}, "
          f"batch {args.batch}, {args.steps}+{args.steps} steps, median of {args.repeats}")
    print("| variant | samples/s |\n|---|---|")
    names = {"a": "a plain generation", "b": "b plain inpainting", "c": "c generate + capture", "d": "d whole chain",
             "e": "e whole chain, annotate mode", "f": "f annotate mode, one level a call"}
    for v in variants:
        print(f"| {names[v]} | {rates[v]:.3f} |")
    print(f"c/a = {result['c_over_a']:.3f}   d/(a+b) = {result['d_over_a_plus_b']:.3f}"
          + (f"   e/d = {result['e_over_d']:.3f}   f/d = {result['f_over_d']:.3f}   e/f = {result['e_over_f']:.3f}"
             f" (annotate {result['annotate']})" if args.annotate else ""))
    print(f"capture holds {capture_short} bytes after {short} steps, {capture_50} after {long}")
    if result["peak_memory_a"] is not None:
        print(f"peak memory a {result['peak_memory_a'] / 2**30:.2f} GiB, c {result['peak_memory_c'] / 2**30:.2f} GiB, "
              f"c at {short} / {long} steps {peak_short / 2**30:.2f} / {peak_50 / 2**30:.2f} GiB")
    mfu = f", MFU of d {result['mfu_d']:.1%}" if result["mfu_d"] is not None else ""
    print(f"{result['tflop_per_triple']:.4f} TFLOP per triple, d achieves {result['achieved_tflops_d']:.4f} TFLOP/s{mfu}")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
