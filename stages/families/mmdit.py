"""What SD3 and Flux share: an MM-DiT whose joint attention takes the text tokens as keys
beside the image tokens in one softmax, read from its double-stream blocks."""

from __future__ import annotations

from typing import ClassVar

from maskmint.schemas.config import CaptureConfig, ModelConfig
from maskmint.stages.families.base import Family
from maskmint.stages.loading import ModelLoadError, execution_device


def check_blocks(wanted: list[int] | None, blocks: int) -> None:
    """capture.blocks must name double-stream blocks the model has (checked from its config
    before a run, and again on the loaded model)."""
    if wanted is not None and max(wanted) >= blocks:
        raise ModelLoadError(f"capture.blocks: the model has {blocks} double-stream blocks (0..{blocks - 1})")


class MMDiTFamily(Family):
    denoiser_component: ClassVar[str] = "transformer"
    reads_blocks: ClassVar[bool] = True
    packed_latents: ClassVar[bool] = False  # Flux packs 2 x 2 latents into one token
    encode_kwargs: ClassVar[dict] = {}  # encode_prompt arguments beyond the prompt
    pooled_output: ClassVar[int] = 1  # where encode_prompt returns the pooled text vector

    def encode_text(self, pipe, layout, texts: list[str]):
        out = pipe.encode_prompt(prompt=texts, prompt_2=None, max_sequence_length=layout.segments[-1].length,
                                 device=execution_device(pipe), **self.encode_kwargs)
        return out[0], out[self.pooled_output]

    # ConceptAttention's setting for Flux: the image noised to step 2 of 4 (SD3: the same share)
    annotate_steps: ClassVar[int] = 4
    annotate_strength: ClassVar[float] = 0.5

    def renoise(self, scheduler, clean, noise, timestep):
        # flow matching: the pipeline has set the scheduler's begin index, so the level is
        # that of its current step (the next one, at a step's end)
        return scheduler.scale_noise(clean, timestep, noise)

    def training_example(self, pipe, clean, noise, uniform):
        """Rectified flow: a uniform noise level s, the latents (1 - s) x + s noise, the
        velocity noise - x as target; the timestep is s on the scheduler's 0..1000 scale."""
        sigma = uniform.to(clean.device, clean.dtype).view(-1, *[1] * (clean.ndim - 1))
        noisy = (1 - sigma) * clean + sigma * noise
        return noisy, uniform.to(clean.device, clean.dtype) * pipe.scheduler.config.num_train_timesteps, noise - clean

    def joint_processor(self):
        """The attention processor class that computes this family's joint attention and
        hands the image-query x text-key block to the `cross` store."""
        raise NotImplementedError

    def double_stream_blocks(self, transformer) -> list:
        """The joint blocks the concept tokens go through (SD3's last one ends their stream)."""
        return list(transformer.transformer_blocks)

    def time_embedding(self, transformer, timestep, pooled, guidance=None):
        """The conditioning vector of a step, as the transformer computes it from its inputs."""
        raise NotImplementedError

    def refuse(self, model: ModelConfig, capture: CaptureConfig) -> None:
        super().refuse(model, capture)
        if model.inpaint_path is not None:
            raise ModelLoadError(
                f"model.inpaint_path: a dedicated inpainting checkpoint is not supported for family {self.name}; "
                "leave it out to remove objects with the base model"
            )

    # -- capture -----------------------------------------------------------------------------
    def recipes(self):
        return {"cross": self._joint_cross, "concept_attention": self._concept_attention}

    def _joint_cross(self, pipe, layout, capture: CaptureConfig):
        """The joint layers of the double-stream blocks (`capture.blocks`: which)."""
        from maskmint.stages.capture.cross import CrossAttentionStore
        from maskmint.stages.capture.processors import install

        store, processor = CrossAttentionStore(capture), self.joint_processor()

        def processor_for(layer: str, own):
            parts = layer.split(".")
            read = parts[0] == "transformer_blocks" and parts[-1] == "attn" and (
                capture.blocks is None or int(parts[1]) in capture.blocks)
            return processor(store, layer) if read else own

        install(pipe.transformer, processor_for)
        return store

    def _concept_attention(self, pipe, layout, capture: CaptureConfig):
        from maskmint.stages.capture.concept_attention import ConceptAttentionStore

        return ConceptAttentionStore(pipe, self, layout, capture)

    def denoiser_levels(self, denoiser_config: dict) -> int:
        return (denoiser_config.get("patch_size") or 1) * (2 if self.packed_latents else 1)

    def check_capture_against(self, capture: CaptureConfig, transformer: dict) -> None:
        levels = self.denoiser_levels(transformer)
        if capture.recipe in self.recipes_at_token_resolution and levels in capture.skip_downscales:
            raise ModelLoadError(f"capture.skip_downscales: {levels} leaves out this model's only attention resolution")
        if transformer.get("num_layers") is not None:
            check_blocks(capture.blocks, transformer["num_layers"])

    recipes_at_token_resolution: ClassVar[tuple[str, ...]] = ("cross",)  # those skip_downscales applies to

    def check_loaded(self, pipe, capture: CaptureConfig) -> None:
        check_blocks(capture.blocks, len(pipe.transformer.transformer_blocks))
