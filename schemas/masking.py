"""The sections that turn heat maps into masks: the weak mask, removal, refinement, filters."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from maskmint.schemas.base import RELATIVE_PATHS, Section, require_path

ADAPTER_PROVENANCE = "distill.json"  # what `launch.py distill` writes beside the adapter
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


class MaskConfig(Section):
    threshold: Literal["fixed", "otsu", "gmm", "gmm_midpoint", "band"] = Field(
        default="fixed",
        description="fixed: tau; otsu: Otsu's threshold per class map; gmm: where a two-component Gaussian "
        "mixture of the map's values says 'high'; gmm_midpoint: the mean of that mixture's two means (the "
        "concept-distillation paper's rule); band: class at band_high and above, ignore (255) from "
        "band_low, background below",
    )
    orphan_filter: bool = Field(
        default=False, description="after the threshold, a 3 x 3 majority vote (the paper's orphan-pixel filter)"
    )
    tau: float = Field(default=0.4, gt=0.0, lt=1.0)
    normalise: Literal["per_map", "none"] = Field(
        default="per_map",
        description="per_map: stretch each concept's map to [0, 1] before thresholds and argmax; none: take the "
        "maps as they are, for capture.recipe concept_attention, whose maps are already each pixel's share of "
        "the softmax over the objects and the background concepts",
    )
    guide_px: int | Literal["auto"] | None = Field(
        default=None,
        description="the side of the maps' token cells in image pixels (8 on the toy Flux; 16 on Flux and SD3 "
        "at their VAE's 8 x and patch 2): each map is read again from its cells at pixel size by joint bilateral "
        "upsampling guided by the image's colour, so the maps' edges follow the image's; auto: the model's own "
        "(the VAE's factor x the token size, or a UNet's finest attention read); None: the capture's bicubic "
        "upsampling, blind to the image",
    )
    guide_colour: float = Field(
        default=20.0, gt=0.0, description="guide_px: the Lab distance at which a cell's weight falls to e^-1/2"
    )
    band_low: float = Field(default=0.3, gt=0.0, lt=1.0, description="threshold 'band': below it, background")
    band_high: float = Field(default=0.6, gt=0.0, lt=1.0, description="threshold 'band': from it, the class")
    open_px: int = Field(default=1, ge=0, description="radius of the opening that removes specks")
    close_px: int = Field(default=2, ge=0, description="radius of the closing that fills pinholes")
    min_area: float = Field(default=0.002, ge=0.0, lt=1.0, description="smallest component kept, as image fraction")

    @field_validator("guide_px", mode="before")
    @classmethod
    def _guide_cell(cls, value):
        """One message for every wrong value, not one per member of the union."""
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 256:
            raise ValueError(f"{value!r} is neither a cell side of 2 to 256 pixels nor auto")
        return value

    @model_validator(mode="after")
    def _band_ordered(self) -> MaskConfig:
        if self.band_low >= self.band_high:
            raise ValueError("band_low must be below band_high")
        return self


class RemovalConfig(Section):
    steps: int = Field(default=30, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    strength: float = Field(default=1.0, gt=0.0, le=1.0)
    dilate_px: int = Field(default=4, ge=0, description="grow the weak mask before inpainting so edges go too")
    prefill: bool = Field(
        default=False,
        description="fill the region from its surroundings (OpenCV Telea) first, so that with strength < 1 "
        "denoising starts from that fill instead of from the object",
    )
    adapter: str | None = Field(
        default=None,
        description="a folder `launch.py distill` wrote: its LoRA adapter is switched on for removal only "
        "(generation and the attention read never see it)",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter_folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        return require_path(value, info, lambda p: (p / ADAPTER_PROVENANCE).is_file(),
                            f"an adapter folder (no {ADAPTER_PROVENANCE}; `launch.py distill` writes one; {RELATIVE_PATHS})")


    @model_validator(mode="after")
    def _some_step_left(self) -> RemovalConfig:
        if int(self.steps * self.strength) < 1:
            raise ValueError(f"removal.strength: {self.strength:g} of removal.steps {self.steps} leaves no denoising "
                             "step (steps x strength must be at least 1)")
        return self


class RefineConfig(Section):
    method: Literal["delta_e", "fgbg"] = Field(
        default="delta_e",
        description="delta_e: pixels whose Lab colour changed by removal, within the weak mask's reach; fgbg: "
        "the concept-distillation paper's rule, each class's weak region AND a GMM-midpoint threshold of the "
        "mean RGB difference of image and background, orphan-filtered, then closing and hole filling (with "
        "mask.threshold gmm_midpoint and mask.orphan_filter the weak regions are the paper's too)",
    )
    fgbg_fill: bool = Field(default=True, description="method fgbg: close and fill holes in each class at the end")
    delta_e: float = Field(default=12.0, gt=0.0, description="Lab colour distance that counts as 'changed'")
    dilate_px: int = Field(default=6, ge=0, description="how far outside the weak mask the object may reach")
    shift_px: int = Field(
        default=0, ge=0, le=16,
        description="method delta_e: a pixel is changed only if its colour is far from every background pixel "
        "within this many pixels, so a background repainted slightly out of register (a pattern out of phase) "
        "is not read as object; 0: the same pixel only",
    )
    segment_vote: float | None = Field(
        default=None, ge=0.5, le=1.0,
        description="method delta_e: the image is cut into colour segments (Felzenszwalb's graph segmentation); "
        "where at least this share of a segment's changed pixels go to one class by heat, all of them that the "
        "class reaches take it, so a boundary between classes follows colour edges rather than the coarse heat "
        "maps; None: each pixel by its own heat",
    )
    segment_scale: float = Field(
        default=200.0, gt=0.0, description="segment_vote: Felzenszwalb's scale; larger gives larger segments"
    )
    open_px: int = Field(default=1, ge=0)
    close_px: int = Field(default=2, ge=0)
    min_area: float = Field(default=0.002, ge=0.0, lt=1.0)
    ignore_band: bool = Field(default=True, description="mark uncertain pixels 255")
    boundary_px: int = Field(default=1, ge=0, description="width of the 255 band on the mask outline")
    disagree_low: float = Field(
        default=0.05, ge=0.0, le=1.0, description="object pixels whose heat is below this become 255"
    )
    disagree_high: float = Field(
        default=0.9, ge=0.0, le=1.0, description="background pixels whose heat is above this become 255"
    )


class FilterConfig(Section):
    min_mask_fraction: float = Field(default=0.005, ge=0.0, le=1.0)
    max_mask_fraction: float = Field(default=0.9, ge=0.0, le=1.0)
    max_components: int = Field(default=4, ge=1)
    min_image_std: float = Field(default=2.0, ge=0.0, description="below this (0..255 scale) an image is 'blank'")
    min_removal_delta: float = Field(
        default=3.0, ge=0.0, description="mean Lab change inside the weak mask below which removal 'failed'"
    )
    drop_missing_concept: bool = Field(
        default=True, description="drop a sample whose final mask lacks one of its prompt's concepts"
    )
    max_weak_fraction: float | None = Field(
        default=None, gt=0.0, le=1.0, description="drop a sample whose weak mask covers more (before removal); None: off"
    )
    max_weak_components: int | None = Field(
        default=None, ge=1, description="drop a sample whose weak mask has more pieces (before removal); None: off"
    )

    @model_validator(mode="after")
    def _ordered(self) -> FilterConfig:
        if self.min_mask_fraction >= self.max_mask_fraction:
            raise ValueError("min_mask_fraction must be below max_mask_fraction")
        return self
