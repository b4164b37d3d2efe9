"""Model families: what differs between the pipelines maskmint runs, in one place.

SD 1.x/2.x and SDXL: a CLIP tokenizer whose positions are the positions cross-attention
sees (SDXL concatenates its two encoders' states on the feature axis, so there are still
77) and cross-attention on the UNet's `attn2` layers. SD3 and Flux (MM-DiT): a transformer
whose joint attention takes text tokens as keys beside image tokens; SD3's text sequence
is CLIP's 77 followed by T5's, Flux's is T5's alone; latents carry a shift as well as a
scale, and Flux packs them 2x2 into tokens. What else differs is which diffusers classes
load and inpaint, and the keyword arguments that keep loading offline and unwatermarked.
So a family is a small record, picked once from `model.family` (or from the checkpoint),
and nothing else in maskmint asks which family it runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from maskmint.schemas.config import ModelConfig
from maskmint.stages.tokens import TextLayout, TextSegment


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
    denoiser: Literal["unet", "transformer"] = "unet"
    # how concept attention is read: UNet cross-attention, or the joint attention of an MM-DiT
    # whose sequence puts the image tokens first (SD3) or the text tokens first (Flux)
    attention: Literal["cross", "joint_image_first", "joint_text_first"] = "cross"
    # the text sequence attention sees: (tokenizer component, most tokens the pipeline is
    # given; None: the tokenizer's own limit), in sequence order
    text_tokenizers: tuple[tuple[str, int | None], ...] = (("tokenizer", None),)
    takes_negative_prompt: bool = True  # False: guidance-distilled, no unconditional batch
    packed_latents: bool = False
    timestep_scale: float = 1.0  # what the transformer multiplies the pipeline's timestep by (Flux: 1000)
    encode_kwargs: dict = field(default_factory=dict)  # encode_prompt arguments beyond the prompt
    pooled_output: int = 1  # where encode_prompt returns the pooled text vector

    def encode_text(self, pipe, layout: TextLayout, texts: list[str]):
        """(token states [N, L, D], pooled vectors [N, P]) of `texts`, by the pipeline's own encoder."""
        out = pipe.encode_prompt(prompt=texts, prompt_2=None, max_sequence_length=layout.segments[-1].length,
                                 device=pipe.device, **self.encode_kwargs)
        return out[0], out[self.pooled_output]

    def text_layout(self, tokenizers: Mapping[str, Any]) -> TextLayout:
        """Where concept tokens sit, from the family's tokenizers (a pipeline's or loaded alone)."""
        segments, offset = [], 0
        for name, most in self.text_tokenizers:
            tokenizer = tokenizers[name]
            length = tokenizer.model_max_length if most is None else min(most, tokenizer.model_max_length)
            segments.append(TextSegment(tokenizer, length, offset))
            offset += length
        return TextLayout(segments)

    def prompt_kwargs(self, layout: TextLayout, prompts: list[str], negatives: list[str]) -> dict:
        """The text arguments of the family's __call__, the T5 length matching `layout`."""
        kwargs: dict[str, Any] = {"prompt": prompts}
        if self.takes_negative_prompt:
            kwargs["negative_prompt"] = negatives
        if len(self.text_tokenizers) > 1 or self.text_tokenizers[0][1] is not None:
            kwargs["max_sequence_length"] = layout.segments[-1].length
        return kwargs

    def latents_for_vae(self, pipe, latents, height: int, width: int):
        """The pipeline's latent output as the VAE's input: unpacked, unscaled, unshifted."""
        if self.packed_latents:
            latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        scaled = latents / pipe.vae.config.scaling_factor
        shift = getattr(pipe.vae.config, "shift_factor", None)
        return scaled + shift if shift else scaled


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

SD3 = Family(
    name="sd3",
    pipeline_classes=("StableDiffusion3Pipeline",),
    text_to_image="StableDiffusion3Pipeline",
    inpainting="StableDiffusion3InpaintPipeline",
    single_file_marker="joint_blocks.",
    denoiser="transformer",
    attention="joint_image_first",
    text_tokenizers=(("tokenizer", None), ("tokenizer_3", 256)),  # the pipeline's default T5 length
    encode_kwargs={"prompt_3": None, "do_classifier_free_guidance": False},
    pooled_output=2,
)

FLUX = Family(
    name="flux",
    pipeline_classes=("FluxPipeline",),
    text_to_image="FluxPipeline",
    inpainting="FluxInpaintPipeline",
    single_file_marker="double_blocks.",
    denoiser="transformer",
    attention="joint_text_first",
    text_tokenizers=(("tokenizer_2", 512),),
    takes_negative_prompt=False,
    packed_latents=True,
    timestep_scale=1000.0,
)

FAMILIES = {family.name: family for family in (SD, SDXL, SD3, FLUX)}
# Pipelines people ask for that maskmint does not run yet: a clear refusal, not a traceback.
NOT_YET = {
    "FluxFillPipeline": "flux-fill",
    "PixArtAlphaPipeline": "pixart",
    "HunyuanDiTPipeline": "hunyuan-dit",
}


def family_of_pipeline(pipe) -> Family:
    """The family of an already loaded pipeline (benchmarks hand one in)."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise UnsupportedModel(f"a {name} is not a pipeline maskmint runs")


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
