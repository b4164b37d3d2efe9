"""Weight memory of the full-size models under each `model.quantize` choice, and what the
device holds at once under each `model.offload`, from their architectures built on the meta
device (no weights, nothing downloaded).

    python -m bench.weights --json bench/weights.json

The architectures are bench/real_shapes.py's; their text encoders carry the toy vocabulary,
so each embedding is counted at its real size (CLIP 49,408 tokens, T5 32,128). Bytes are
`plan`'s rule (pipeline/cost.py::components_memory): fp16 values (what model.dtype auto
loads on CUDA; transformers then keeps T5's `wo` layers in fp32, about 1.0B values), and
with int8 the denoiser's and T5's other linear weights in one byte plus a scale per output
channel. `--bf16` counts bf16 loading, where `wo` is not kept apart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import real_shapes, write_json
from maskmint.pipeline.cost import components_memory, offloaded_memory
from maskmint.stages.families import family_of_pipeline

REAL_VOCAB = {"CLIPTextModel": 49408, "CLIPTextModelWithProjection": 49408, "T5EncoderModel": 32128}
MODELS = {"sdxl": "build_sdxl", "sd3": "build_sd3", "flux-schnell": "build_flux", "flux-dev": "build_flux"}


def memory(name: str, bf16: bool = False) -> dict:
    with torch.device("meta"):
        builder = getattr(real_shapes, MODELS[name])
        pipe = builder(name == "flux-dev") if builder is real_shapes.build_flux else builder()
    family = family_of_pipeline(pipe)
    networks = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    found = components_memory(networks, 2, set(family.quantized_components()), keeps_full=not bf16)
    parameters = {}
    for component, network in networks.items():
        count = sum(p.numel() for p in network.parameters())
        vocab = REAL_VOCAB.get(type(network).__name__)
        if vocab:  # the toy tokenizer's embedding, counted at the real vocabulary's size
            table = network.get_input_embeddings().weight
            extra = (vocab - table.shape[0]) * table.shape[1]
            count += extra
            for choice in found.values():
                choice[component] = round(choice[component] + extra * 2 / 1e9, 4)
        parameters[component] = round(count / 1e6, 1)
    for choice in found.values():
        choice["total"] = round(sum(v for k, v in choice.items() if k != "total"), 3)
    held = offloaded_memory(networks, found, 2, set(family.quantized_components()))
    tables = [REAL_VOCAB[type(n).__name__] * n.get_input_embeddings().weight.shape[1] * 2 / 1e9
              for n in networks.values() if type(n).__name__ in REAL_VOCAB]
    for choice in held.values():  # a real vocabulary's table can be the largest layer
        choice["sequential"] = round(max([choice["sequential"], *tables]), 4)
    return {"parameters_m": parameters, "weight_gb": found, "device_gb_by_offload": held,
            "quantized": family.quantized_components()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bf16", action="store_true", help="bf16 loading (no fp32 T5 layers)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    record = {name: memory(name, args.bf16) for name in args.models}
    print(json.dumps(record, indent=1))
    write_json(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
