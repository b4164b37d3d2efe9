"""Model families: what differs between the UNet pipelines maskmint runs, in one place.

SD 1.x/2.x and SDXL share everything that matters to maskmint: a CLIP tokenizer whose
positions are the positions cross-attention sees (SDXL concatenates its two encoders'
states on the feature axis, so there are still 77), cross-attention on the UNet's `attn2`
layers, the same `__call__` and latents. What differs is which diffusers classes load and
inpaint, and the keyword arguments that keep loading offline and unwatermarked. So a
family is a small record, picked once from `model.family` (or from the checkpoint), and
nothing else in maskmint asks which family it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from schemas.config import ModelConfig


class UnsupportedModel(ValueError):
    """The checkpoint is of a family maskmint does not run (yet)."""


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name` values of this family
    text_to_image: str  # diffusers class that generates
    inpainting: str  # diffusers class that removes, built from the generator's components
    load_kwargs: dict = field(default_factory=dict)
    single_file_kwargs: dict = field(default_factory=dict)
    inpainting_kwargs: dict = field(default_factory=dict)
    single_file_marker: str = ""  # a tensor name only this family's original checkpoints hold


SD = Family(
    name="sd",
    pipeline_classes=("StableDiffusionPipeline",),
    text_to_image="StableDiffusionPipeline",
    inpainting="StableDiffusionInpaintPipeline",
    # diffusers loads the safety checker unless it is None, and fetches its feature
    # extractor from the hub for single files unless that is None too
    load_kwargs={"safety_checker": None, "requires_safety_checker": False},
    single_file_kwargs={"feature_extractor": None},
    single_file_marker="cond_stage_model.",
)

SDXL = Family(
    name="sdxl",
    pipeline_classes=("StableDiffusionXLPipeline",),
    text_to_image="StableDiffusionXLPipeline",
    inpainting="StableDiffusionXLInpaintPipeline",
    # an installed invisible-watermark package would otherwise mark images and backgrounds
    load_kwargs={"add_watermarker": False},
    inpainting_kwargs={"add_watermarker": False},
    single_file_marker="conditioner.embedders.1.",
)

FAMILIES = {family.name: family for family in (SD, SDXL)}
# Pipelines people ask for that maskmint does not run yet: a clear refusal, not a traceback.
NOT_YET = {
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxFillPipeline": "flux",
    "PixArtAlphaPipeline": "pixart",
}


def _pipeline_class(source: str) -> str | None:
    index = Path(source) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    if Path(source).exists():
        return None
    try:  # a hub id: its model_index.json only (small; from the cache when offline)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(source).get("_class_name")
    except Exception:  # noqa: BLE001 - not reachable or not a pipeline: the loader will say why
        return None


def _single_file_family(path: str) -> Family | None:
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        names = list(handle.keys())
    return next((f for f in FAMILIES.values() if any(n.startswith(f.single_file_marker) for n in names)), None)


def resolve_family(config: ModelConfig) -> Family:
    """The configured family, or the one the checkpoint says (`model.family: auto`)."""
    if config.family != "auto":
        return FAMILIES[config.family]
    single_file = Path(config.path).is_file()
    source = config.single_file_config if single_file else config.path
    class_name = _pipeline_class(source) if source else None
    if class_name is None and single_file:
        family = _single_file_family(config.path)
        if family is not None:
            return family
    if class_name is None:
        return SD  # what maskmint always ran; the loader reports a checkpoint that is not
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    hint = f" (family {NOT_YET[class_name]})" if class_name in NOT_YET else ""
    raise UnsupportedModel(
        f"model.path: a {class_name}{hint} is not a pipeline maskmint runs; "
        f"it runs {', '.join(f.pipeline_classes[0] for f in FAMILIES.values())} (model.family: {', '.join(FAMILIES)})"
    )
