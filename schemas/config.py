"""RunConfig: everything a run needs, validated once so later code can trust it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
from maskmint.schemas.base import ConfigError, Section, format_error, resolve_model_location
from maskmint.schemas.inputs import AnnotateConfig, InputConfig, folder_signature, is_shards, list_images
from maskmint.schemas.masking import ADAPTER_WEIGHTS, FilterConfig, MaskConfig, RefineConfig, RemovalConfig
from maskmint.schemas.running import EXECUTION_ONLY, TEMPLATE_SAMPLES, ExecutionConfig, OutputConfig
from maskmint.schemas.prompts import MAX_CONCEPTS, PromptsConfig, concept_slots, scan_prompts_file

# The values a user picks from, each listed here once. The registries that implement them
# (stages/families, the families' capture recipes, pipeline/executors, pipeline/export) are
# held equal to these by tests/test_one_source.py.
FamilyName = Literal["sd", "sdxl", "sd3", "flux"]
from maskmint.schemas.running import ExecutorName as ExecutorName  # noqa: E402  (beside its section)
RecipeName = Literal["cross", "concept_attention"]
ExportFormat = Literal["folders", "coco", "hf"]
EvaluateBand = Literal["background", "ignore"]  # what evaluate makes of a mask's 255
SHARE_RECIPES = ("concept_attention",)  # recipes whose maps are already shares of each pixel


class ModelConfig(Section):
    path: str = Field(description="diffusers pipeline folder, single .safetensors/.ckpt file, or hub id")
    inpaint_path: str | None = Field(
        default=None,
        description="dedicated inpainting checkpoint; None removes objects with the base model by latent blending",
    )
    single_file_config: str | None = Field(
        default=None,
        description="diffusers folder or hub id holding the configs for a single-file checkpoint",
    )
    family: Literal["auto", FamilyName] = Field(
        default="auto",
        description="sd (1.x/2.x), sdxl, sd3 or flux; auto reads model_index.json's class (or a single file's "
        "tensor names)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = Field(default="auto", description="'auto' picks cuda when present, else cpu")
    offload: Literal["model", "sequential"] | None = Field(
        default=None,
        description="diffusers' CPU offload: model keeps one network at a time on the device, sequential one "
        "layer at a time (least memory, slowest); the weights wait in CPU memory. Outputs are unchanged",
    )
    quantize: Literal["int8"] | None = Field(
        default=None,
        description="int8: the denoiser's and T5's linear and conv weights stored in int8 (optimum-quanto, "
        "weight-only; activations stay in dtype), about half their fp16 memory",
    )

    _resolve = field_validator("path", "inpaint_path", "single_file_config")(resolve_model_location)

    @field_validator("offload", "quantize", mode="before")
    @classmethod
    def _none_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value


class GenerationConfig(Section):
    steps: int = Field(default=30, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0.0)
    height: int | None = Field(default=None, ge=8, description="default: the model's native size")
    width: int | None = Field(default=None, ge=8)
    batch_size: int = Field(default=4, ge=1, le=1024)
    compile: bool = Field(
        default=False,
        description="torch.compile the UNet for generation: the first batch pays the compile, "
        "later batches of the same shape reuse it",
    )
    channels_last: bool = Field(
        default=False, description="UNet weights in channels-last layout (faster convolutions on recent GPUs)"
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError("must be a multiple of 8")
        return value


class CaptureConfig(Section):
    recipe: RecipeName = Field(
        default="cross",
        description="cross: attention probabilities of the concept's tokens (DAAM; for SD3/Flux the image x "
        "concept block of the joint softmax); concept_attention: ConceptAttention's output-space maps (sd3, flux)",
    )
    blocks: list[int] | None = Field(
        default=None, description="sd3/flux: which double-stream blocks to read (0 = first); None = all"
    )
    background_concepts: list[str] = Field(
        default_factory=lambda: ["background"],
        description="concept_attention: words that compete with the objects in the softmax, then drop out",
    )
    concept_variant: Literal["reference", "projected"] = Field(
        default="reference",
        description="concept_attention: reference: the paper's own code (outputs before their projections, a "
        "softmax per block and step, then the mean; zero pooled vector); projected: its diffusers port's way "
        "(outputs after their projections, summed, one softmax; the concepts' pooled text)",
    )
    concept_tokens: Literal["mean", "each", "first"] = Field(
        default="mean",
        description="concept_attention, a word of several T5 tokens: mean: their dot products averaged into "
        "one logit; each: every token competes in the softmax, the word's shares summed; first: its first only",
    )
    concept_text: Literal["word", "phrase", "caption", "caption_phrase"] = Field(
        default="word",
        description="concept_attention, what is encoded as a concept: word: the concept word alone (the paper's "
        "way); phrase: the word with the modifiers the prompt gives it ('red circle'); caption: the word's own "
        "states in the prompt's encoding; caption_phrase: the noun phrase's states there",
    )
    steps: list[int] | None = Field(
        default=None, description="denoising step indices to aggregate (0 = first); None = all"
    )
    skip_downscales: list[int] = Field(
        default_factory=lambda: [8],
        description="leave out attention maps this many times smaller than the latent (DAAM drops 8x8 of 64x64)",
    )
    include_mid_block: bool = False
    weighting: Literal["per_map", "per_resolution"] = Field(
        default="per_map",
        description="per_map: every layer's and head's map counts once (DAAM); per_resolution: each resolution "
        "counts once (SDXL has many more 32x32 layers than 64x64 ones)",
    )
    self_attention: bool = Field(
        default=False,
        description="refine each concept map by self-attention affinity (Dataset Diffusion): map <- A^k map",
    )
    self_attention_downscale: int = Field(
        default=2, ge=1, description="which self-attention layers: those this many times smaller than the latent"
    )
    self_attention_power: int = Field(default=4, ge=1, le=16, description="k in A^k")

    @field_validator("steps", "blocks")
    @classmethod
    def _non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or min(value) < 0):
            raise ValueError("must be a non-empty list of indices >= 0")
        return value

    @field_validator("background_concepts")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        if any(not word.strip() for word in value):
            raise ValueError("background concepts must be words, not blanks")
        return value

    @model_validator(mode="after")
    def _one_token_is_the_word(self) -> CaptureConfig:
        if self.concept_tokens == "first" and self.concept_text == "caption_phrase":
            raise ValueError("concept_tokens: first would read the phrase's first token, a modifier such as "
                             "'red', not the concept; use mean or each with concept_text: caption_phrase")
        return self


UNET_RUNTIME_ONLY = {"compile", "channels_last"}
# Where the weights sit is not what they are: a run moved to another mount or checkout is
# the same run. The weights' identity enters the hash as a fingerprint instead.
MODEL_LOCATIONS = {"path", "inpaint_path", "single_file_config"}
MODEL_RUNTIME_ONLY = {"offload"}  # where the weights wait between calls does not change a number
# Likewise input files: their content is hashed (the class list is in `concepts`).
INPUT_FILES = {"concepts_file", "file"}
INPUT_FOLDERS = {"images"}
# Options added after runs were made, whose off value computes exactly what maskmint did
# before them: left out of the hash while off, so those runs still resume.
NEUTRAL_WHEN_OFF = (
    ("refine", "shift_px", 0), ("refine", "segment_vote", None), ("refine", "segment_scale", 200.0),
    ("mask", "guide_px", None), ("mask", "guide_colour", 20.0),
)


class RunConfig(Section):
    name: str = "maskmint-run"
    model: ModelConfig
    prompts: PromptsConfig
    input: InputConfig = InputConfig()
    generation: GenerationConfig = GenerationConfig()
    capture: CaptureConfig = CaptureConfig()
    mask: MaskConfig = MaskConfig()
    removal: RemovalConfig = RemovalConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    refine: RefineConfig = RefineConfig()
    filter: FilterConfig = FilterConfig()
    output: OutputConfig = OutputConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @property
    def num_shards(self) -> int:
        return -(-self.output.samples // self.output.shard_size)

    def quota_need(self) -> int:
        """Samples a perfect filter would need for the quota: from templates a sample shows the
        mean of `concepts_per_image` classes, each class taking its turn."""
        if self.output.kept is not None:
            return self.output.kept
        counts = self.prompts.counts_per_image
        return -(-self.output.kept_per_class * len(self.prompts.concepts) * len(counts) // sum(counts))

    def class_names(self) -> dict[int, str]:
        return {c.class_id: c.name for c in self.prompts.concepts}

    @model_validator(mode="after")
    def _one_source(self) -> RunConfig:
        """Images from one place, each with classes a template can caption; the sample count
        defaulting to one per line or image."""
        if self.input.images is not None:
            if self.prompts.file is not None:
                raise ValueError("input.images: give the images by input.images or by prompts.file lines, not both")
            count = len(self.prompts.concepts)
            if self.input.classes == "label" and not is_shards(self.input.images):
                raise ValueError("input.classes: label reads a shard sample's .cls field; a folder's images take "
                                 "folder or all")
            if self.input.classes == "all" and count > MAX_CONCEPTS:
                raise ValueError(f"input.classes: all asks every class of every image, at most {MAX_CONCEPTS} "
                                 f"({count} configured); use folder")
            needed = count if self.input.classes == "all" else 1
            captions = any(concept_slots(t.prompt) == needed for t in self.prompts.templates) or (
                needed == 1 and all(c.templates for c in self.prompts.concepts))
            if not captions:
                raise ValueError(f"prompts.templates: no template names {needed} concept(s) to caption the images "
                                 f"of input.images ({{concept}} .. {{concept{needed}}})")
        quota = self.output.kept_per_class or self.output.kept
        if quota is not None:
            if self.output.kept_per_class and self.output.kept:
                raise ValueError("output: give kept_per_class or kept, not both")
            if self.input.images is not None or self.prompts.file is not None:
                raise ValueError("output.kept_per_class / kept: top-up rounds need prompts from templates "
                                 "(each image or line is one sample already)")
            need = self.quota_need()
            update = {"samples": self.output.samples or need, "max_samples": self.output.max_samples or 4 * need}
            if update["max_samples"] < update["samples"]:
                raise ValueError(f"output.max_samples ({update['max_samples']}) is below output.samples "
                                 f"({update['samples']})")
            self = self.model_copy(update={"output": self.output.model_copy(update=update)})
        if self.output.samples is None:
            if self.input.images is not None:
                samples = len(list_images(self.input.images))
            elif self.prompts.file is not None:
                samples = scan_prompts_file(self.prompts.file).lines
            else:
                samples = TEMPLATE_SAMPLES
            if samples == 0:
                raise ValueError(f"input.images: '{self.input.images}' holds no jpg, png or webp image")
            self = self.model_copy(update={"output": self.output.model_copy(update={"samples": samples})})
        return self

    @model_validator(mode="after")
    def _steps_exist(self) -> RunConfig:
        if self.capture.steps is not None and max(self.capture.steps) >= self.generation.steps:
            raise ValueError(f"capture.steps: step {max(self.capture.steps)} does not exist with generation.steps "
                             f"{self.generation.steps} (steps are 0..{self.generation.steps - 1})")
        return self

    @model_validator(mode="after")
    def _compile_stays_on_the_device(self) -> RunConfig:
        if self.generation.compile and self.model.offload is not None:
            raise ValueError("generation.compile: a compiled denoiser stays on the device; it cannot be offloaded "
                             f"(model.offload: {self.model.offload})")
        return self

    @model_validator(mode="after")
    def _shares_need_concept_attention(self) -> RunConfig:
        if self.mask.normalise == "none" and self.capture.recipe not in SHARE_RECIPES:
            raise ValueError("mask.normalise: none takes maps that are shares (capture.recipe: concept_attention); "
                             "cross-attention maps need per_map")
        return self

    def with_execution(self, **changes: Any) -> RunConfig:
        """The same run executed another way (command-line overrides), validated like the file."""
        try:
            execution = ExecutionConfig.model_validate({**self.execution.model_dump(), **changes})
        except ValidationError as error:
            raise ConfigError(format_error(error, prefix="execution.")) from None
        return self.model_copy(update={"execution": execution})

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def config_hash(self, model_fingerprint: str = "") -> str:
        """Hash of everything that shapes the output: not how it is executed, not the run's
        name, not where the weights are (`model_fingerprint` says what they are)."""
        content = self.model_dump(
            mode="json",
            exclude={
                "name": True, "model": MODEL_LOCATIONS | MODEL_RUNTIME_ONLY, "prompts": INPUT_FILES, "input": INPUT_FOLDERS,
                "execution": EXECUTION_ONLY, "generation": UNET_RUNTIME_ONLY, "removal": {"adapter"},
            },
        )
        if self.removal.adapter is not None:  # what the adapter is, not where it sits
            content["removal_adapter_sha256"] = hashlib.sha256(
                (Path(self.removal.adapter) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
        content["model_fingerprint"] = model_fingerprint
        if self.prompts.file is not None:
            scan = scan_prompts_file(self.prompts.file)
            content["prompts_file_sha256"] = scan.sha256
            images = scan.images
            if images:
                content["images"] = images
        if self.input.images is not None:
            content["images"] = folder_signature(self.input.images)
        if "images" not in content:  # these shape only runs that annotate: the others keep their hash
            del content["annotate"], content["input"]
        for section, field, off in NEUTRAL_WHEN_OFF:
            if content[section][field] == off:
                del content[section][field]
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def parse_config(data: Any, base_dir: Path | str = ".") -> RunConfig:
    """Validate a config mapping; raise ConfigError with one readable line."""
    if not isinstance(data, dict):
        raise ConfigError("config: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data, context={"base_dir": str(base_dir)})
    except ValidationError as error:
        raise ConfigError(format_error(error)) from None


def load_config(path: Path | str) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config: '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config: '{path}' is not valid YAML ({error})".replace("\n", " ")) from None
    return parse_config(data, base_dir=path.parent)
