"""What a model family is: the protocol every family module implements, with the behaviour
most of them share (loading through diffusers, the CLIP/T5 text layout, the VAE's latents).

A family says everything maskmint needs to know about a kind of pipeline: how it loads
(folder, single file, hub id; nothing fetched it does not need), where concept tokens sit
in its text sequence, which capture recipes it offers and what feeds them, how its latents
reach the VAE and back, how it inpaints, what one denoiser call costs, and which options
it cannot honour. Nothing outside `stages/families` asks which family it runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from maskmint.schemas.config import CaptureConfig, ModelConfig
from maskmint.stages.loading import ModelLoadError, is_single_file, load_failure, quiet_libraries
from maskmint.stages.tokens import TextLayout, TextSegment


class UnsupportedModel(ModelLoadError):
    """The checkpoint is of a family maskmint does not run (yet)."""


class Family:
    name: ClassVar[str]
    text_to_image: ClassVar[str]  # diffusers class that generates (and model_index.json's `_class_name`)
    also_known_as: ClassVar[tuple[str, ...]] = ()  # other `_class_name` values that load as this family
    inpainting: ClassVar[str]  # diffusers class that removes, built from the generator's components
    image_to_image: ClassVar[str]  # diffusers class that denoises a real image's latents (annotate)
    # annotate's default schedule: `steps`, of which the last steps x strength are run from the image
    annotate_steps: ClassVar[int]
    annotate_strength: ClassVar[float]
    load_kwargs: ClassVar[dict] = {}
    t5_component: ClassVar[str | None] = None  # the T5 encoder model.quantize also quantizes
    single_file_kwargs: ClassVar[dict] = {}
    inpainting_kwargs: ClassVar[dict] = {}
    single_file_marker: ClassVar[str]  # a tensor name only this family's original checkpoints hold
    denoiser_component: ClassVar[str]  # the pipeline component (and model subfolder) that denoises
    denoiser_class: ClassVar[str]  # its diffusers class, where model_index.json does not say
    # the text sequence attention sees: (tokenizer component, most tokens the pipeline is
    # given; None: the tokenizer's own limit), in sequence order
    text_tokenizers: ClassVar[tuple[tuple[str, int | None], ...]] = (("tokenizer", None),)
    takes_negative_prompt: ClassVar[bool] = True  # False: guidance-distilled, no unconditional batch
    refines_with_self_attention: ClassVar[bool] = False  # capture.self_attention
    reads_blocks: ClassVar[bool] = False  # capture.blocks: numbered transformer blocks

    @property
    def pipeline_classes(self) -> tuple[str, ...]:
        return (self.text_to_image, *self.also_known_as)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- loading -----------------------------------------------------------------------------
    def load(self, config: ModelConfig, device: torch.device, dtype: torch.dtype):
        """The text-to-image pipeline on `device` (on the CPU with `offload`, which the worker
        switches on once every pipeline on these networks is built), progress bars off."""
        import diffusers

        pipeline_class = getattr(diffusers, self.text_to_image)
        quiet_libraries()
        try:
            if is_single_file(config.path):
                pipe = pipeline_class.from_single_file(
                    config.path, config=config.single_file_config, dtype=dtype,
                    **self.load_kwargs, **self.single_file_kwargs,
                )
            else:
                pipe = pipeline_class.from_pretrained(config.path, dtype=dtype, **self.load_kwargs,
                                                      **self.quantization(config))
        except Exception as error:  # noqa: BLE001 - any loader failure is reported the same way
            raise load_failure("path", config.path, error) from error
        pipe.set_progress_bar_config(disable=True)
        return pipe if config.offload is not None else pipe.to(device)  # offloaded: the hooks place it

    def quantized_components(self) -> list[str]:
        return [self.denoiser_component] + ([self.t5_component] if self.t5_component else [])

    def quantization(self, config: ModelConfig) -> dict:
        """from_pretrained's quantization_config for `model.quantize`: optimum-quanto int8
        weights for the denoiser (diffusers' config) and T5 (transformers')."""
        if config.quantize is None:
            return {}
        import diffusers
        import transformers

        mapping = {self.denoiser_component: diffusers.QuantoConfig(weights_dtype="int8")}
        if self.t5_component:
            mapping[self.t5_component] = transformers.QuantoConfig(weights="int8")
        return {"quantization_config": diffusers.PipelineQuantizationConfig(quant_mapping=mapping)}

    def load_inpainting(self, base, config: ModelConfig):
        """The inpainting pipeline sharing the base model's components (nothing loaded twice)."""
        import diffusers

        pipe = getattr(diffusers, self.inpainting)(**self.inpainting_components(base, config), **self.inpainting_kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def inpainting_components(self, base, config: ModelConfig) -> dict:
        return dict(base.components)

    def load_image_to_image(self, base):
        """The image-to-image pipeline sharing the base model's components."""
        import diffusers

        pipe = getattr(diffusers, self.image_to_image).from_pipe(base, **self.inpainting_kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def renoise(self, scheduler, clean, noise, timestep):
        """The clean latents noised to the level of `timestep` (a [1] tensor of the schedule
        `scheduler` is running, at that step), as the image-to-image pipeline noises."""
        raise NotImplementedError

    def model_input(self, scheduler, latents, timestep):
        """The latents as the pipeline hands them to the denoiser at `timestep`."""
        return latents

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_component)

    def reuses_generation_latents(self, inpaint_denoiser_config) -> bool:
        """Whether removal inpaints from generation's latents (latent blending) instead of
        encoding the image again."""
        return False

    def image_to_image_takes_latents(self, vae_config) -> bool:
        """Whether the image-to-image pipeline takes annotate's encoded latents as its `image`
        (its image processor passes a tensor of the VAE's channel count through), so that
        each image is encoded once."""
        return True

    def removal_encodes(self, inpaint_denoiser_config, prefill: bool) -> int:
        """VAE encodes removal makes per sample (for plan's cost): diffusers' inpainting
        pipelines encode the image and the masked image."""
        return 2

    # -- text --------------------------------------------------------------------------------
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

    def removal_prompts(self, layout: TextLayout) -> Callable[[list[str], list[str]], dict]:
        return lambda prompts, negatives: self.prompt_kwargs(layout, prompts, negatives)

    def encode_text(self, pipe, layout: TextLayout, texts: list[str]):
        """(token states [N, L, D], pooled vectors [N, P] or None) of `texts`, by the
        pipeline's own encoder, without the unconditional batch."""
        raise NotImplementedError

    # -- latents -----------------------------------------------------------------------------
    def latents_for_vae(self, pipe, latents, height: int, width: int):
        """The pipeline's latent output as the VAE's input: unscaled, unshifted."""
        scaled = latents / pipe.vae.config.scaling_factor
        shift = getattr(pipe.vae.config, "shift_factor", None)
        return scaled + shift if shift else scaled

    def latents_from_vae(self, pipe, encoded, height: int, width: int):
        """The VAE's latents (of images being encoded) as the denoiser takes them: the inverse
        of `latents_for_vae`."""
        return self.scaled_latents(pipe, encoded)

    @staticmethod
    def scaled_latents(pipe, encoded):
        """The VAE's latents shifted and scaled, still on the VAE's [B, C, h, w] grid."""
        shift = getattr(pipe.vae.config, "shift_factor", None)
        return ((encoded - shift) if shift else encoded) * pipe.vae.config.scaling_factor

    # -- training (distill) ------------------------------------------------------------------
    # the denoiser's projections a LoRA adapter wraps: every attention's query, key, value, out
    lora_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")

    def training_example(self, pipe, clean, noise, uniform):
        """(noisy latents, timesteps, target) of the family's training objective, from clean
        [B, C, h, w] latents, their noise and one uniform draw in [0, 1) per sample."""
        raise NotImplementedError

    def predict(self, pipe, noisy, timesteps, states, pooled, guidance: float):
        """The denoiser's prediction for [B, C, h, w] latents, on the same grid."""
        raise NotImplementedError

    # -- capture -----------------------------------------------------------------------------
    def recipes(self) -> dict[str, Callable]:
        """recipe name -> builder(pipe, layout, capture) of its store (`stages/capture`)."""
        raise NotImplementedError

    def capture_store(self, pipe, layout: TextLayout, capture: CaptureConfig):
        """The store of the configured recipe, its processors or hooks installed on the denoiser."""
        return self.recipes()[capture.recipe](pipe, layout, capture)

    def denoiser_levels(self, denoiser_config: dict) -> int:
        """How many times the denoiser's token grid is smaller than the latent at its coarsest."""
        raise NotImplementedError

    def map_cell(self, capture: CaptureConfig, denoiser_config: dict) -> int:
        """Latent pixels per cell of the finest attention map `capture` reads (`mask.guide_px: auto`):
        an MM-DiT has one token grid, so its coarsest is its finest."""
        return self.denoiser_levels(denoiser_config)

    def check_capture_against(self, capture: CaptureConfig, denoiser_config: dict) -> None:
        """Refuse capture settings the denoiser's config shows would read no attention."""

    def check_loaded(self, pipe, capture: CaptureConfig) -> None:
        """The same refusals on a loaded model (a benchmark hands one in)."""

    # -- cost --------------------------------------------------------------------------------
    def denoiser_call(self, config, latent: tuple[int, int], text_tokens: int) -> tuple[tuple, dict]:
        """(args, kwargs) of one denoiser call at batch 1 on the meta device, shaped as the
        architecture takes them: what `plan` runs under torch's FLOP counter."""
        raise NotImplementedError

    # -- refusals ----------------------------------------------------------------------------
    def refuse(self, model: ModelConfig, capture: CaptureConfig) -> None:
        """Options this family cannot honour, refused before a run writes anything."""
        from maskmint.stages.families import offering  # the registry names who does offer it

        if model.quantize is not None:
            if is_single_file(model.path):
                raise ModelLoadError("model.quantize: takes a diffusers folder or hub id, not a single-file checkpoint")
            if importlib.util.find_spec("optimum.quanto") is None:
                raise ModelLoadError("model.quantize: int8 needs optimum-quanto (pip install 'maskmint[quantize]')")
        if capture.recipe not in self.recipes():
            raise ModelLoadError(
                f"capture.recipe: {capture.recipe} is offered by {offering(lambda f: capture.recipe in f.recipes())}, "
                f"not family {self.name}"
            )
        if capture.self_attention and not self.refines_with_self_attention:
            raise ModelLoadError(
                f"capture.self_attention: not available for family {self.name} "
                f"(only {offering(lambda f: f.refines_with_self_attention)})"
            )
        if capture.blocks is not None and not self.reads_blocks:
            raise ModelLoadError(
                f"capture.blocks: reads numbered transformer blocks ({offering(lambda f: f.reads_blocks)}); "
                f"family {self.name} has none"
            )
