"""SD 1.x/2.x and SDXL: a UNet whose `attn2` layers cross-attend to the text.

A CLIP tokenizer's positions are the positions cross-attention sees (SDXL concatenates its
two encoders' states on the feature axis, so there are still 77). Removal blends latents
with the base UNet, or uses a dedicated 9-channel inpainting UNet (`model.inpaint_path`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from maskmint.schemas.config import CaptureConfig, ModelConfig
from maskmint.stages.families.base import Family
from maskmint.stages.loading import ModelLoadError, execution_device, is_single_file, load_failure


class UNetFamily(Family):
    denoiser_component: ClassVar[str] = "unet"
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    refines_with_self_attention: ClassVar[bool] = True
    # the concept-distillation recipe (FG/BG): the last 40 of 50 steps, from t of about 781
    annotate_steps: ClassVar[int] = 50
    annotate_strength: ClassVar[float] = 0.8

    def renoise(self, scheduler, clean, noise, timestep):
        return scheduler.add_noise(clean, noise, timestep)

    def model_input(self, scheduler, latents, timestep):
        return scheduler.scale_model_input(latents, timestep)  # Euler-type schedulers divide by their sigma

    def encode_text(self, pipe, layout, texts: list[str]):
        out = pipe.encode_prompt(prompt=texts, device=execution_device(pipe), num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        return out[0], self.pooled(out)

    def pooled(self, encoded: tuple):
        return None  # SD's UNet takes no pooled text

    def inpainting_components(self, base, config: ModelConfig) -> dict:
        """With a dedicated checkpoint only its 9-channel UNet is loaded; the text encoders,
        VAE and tokenizers are the base's."""
        from diffusers import UNet2DConditionModel

        components = dict(base.components)
        if config.inpaint_path is not None:
            try:
                if is_single_file(config.inpaint_path):
                    unet = UNet2DConditionModel.from_single_file(config.inpaint_path, dtype=base.unet.dtype)
                else:
                    unet = UNet2DConditionModel.from_pretrained(config.inpaint_path, subfolder="unet", dtype=base.unet.dtype)
            except Exception as error:  # noqa: BLE001
                raise load_failure("inpaint_path", config.inpaint_path, error) from error
            components["unet"] = unet.to(base.device)
        return components

    def image_to_image_takes_latents(self, vae_config) -> bool:
        # diffusers' SD and SDXL image-to-image pipelines tell latents by their 4 channels
        return vae_config.latent_channels == 4

    def reuses_generation_latents(self, inpaint_denoiser_config) -> bool:
        # Latent blending needs only the image's latents (a 9-channel UNet also takes the masked image's).
        return inpaint_denoiser_config["in_channels"] == 4

    def removal_encodes(self, inpaint_denoiser_config, prefill: bool) -> int:
        if self.reuses_generation_latents(inpaint_denoiser_config) and not prefill:
            return 0
        return super().removal_encodes(inpaint_denoiser_config, prefill)

    # -- training ----------------------------------------------------------------------------
    def training_example(self, pipe, clean, noise, uniform):
        """DDPM's objective on the model's own training schedule: a uniform timestep, the
        noise (or the velocity, for v-prediction models) as target."""
        from diffusers import DDPMScheduler

        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        steps = schedule.config.num_train_timesteps
        timesteps = (uniform * steps).long().clamp(max=steps - 1).to(clean.device)
        noisy = schedule.add_noise(clean, noise, timesteps)
        if schedule.config.prediction_type == "v_prediction":
            return noisy, timesteps, schedule.get_velocity(clean, noise, timesteps)
        return noisy, timesteps, noise

    def predict(self, pipe, noisy, timesteps, states, pooled, guidance: float):
        return pipe.unet(noisy, timesteps, encoder_hidden_states=states,
                         **self.training_conditions(pipe, noisy, pooled)).sample

    def training_conditions(self, pipe, noisy, pooled) -> dict:
        return {}

    # -- capture -----------------------------------------------------------------------------
    def recipes(self):
        return {"cross": self._cross}

    @staticmethod
    def _cross(pipe, layout, capture: CaptureConfig):
        """DAAM: every cross-attention layer (attn2), and self-attention (attn1) when it refines the maps."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        from maskmint.stages.capture.cross import CrossAttentionStore
        from maskmint.stages.capture.processors import UNetCaptureProcessor, install

        store = CrossAttentionStore(capture)
        read = ("attn2", "attn1") if capture.self_attention else ("attn2",)
        install(pipe.unet, lambda layer, own: UNetCaptureProcessor(store, layer) if layer.endswith(read) else AttnProcessor2_0())
        return store

    def denoiser_levels(self, denoiser_config: dict) -> int:
        return 2 ** (len(denoiser_config.get("down_block_types", [None])) - 1)

    @staticmethod
    def attention_downscales(unet: dict) -> tuple[set[int], int | None]:
        """The downscales of the UNet's cross-attention blocks, and its mid block's (None: none)."""
        blocks = unet.get("down_block_types", [])
        with_attention = {2**i for i, kind in enumerate(blocks) if "CrossAttn" in kind}
        mid_type = unet.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
        return with_attention, (2 ** (len(blocks) - 1) if "CrossAttn" in mid_type else None)

    def cross_downscales(self, capture: CaptureConfig, unet: dict) -> set[int]:
        """The downscales the capture could read cross-attention at: the mid block's only if asked."""
        with_attention, mid = self.attention_downscales(unet)
        return with_attention | ({mid} if capture.include_mid_block and mid else set())

    def map_cell(self, capture: CaptureConfig, unet: dict) -> int:
        return min(self.cross_downscales(capture, unet) - set(capture.skip_downscales))

    def check_capture_against(self, capture: CaptureConfig, unet: dict) -> None:
        """The resolutions the UNet has attention at must include those the capture reads."""
        with_attention, mid = self.attention_downscales(unet)
        cross = self.cross_downscales(capture, unet)
        if not cross - set(capture.skip_downscales):
            raise ModelLoadError(
                f"capture.skip_downscales: {sorted(capture.skip_downscales)} leaves out every cross-attention "
                f"resolution of this UNet (it has {sorted(cross)}{'' if capture.include_mid_block else ', mid block off'})"
            )
        attended = with_attention | ({mid} if mid else set())  # self-attention sits beside every cross-attention
        if capture.self_attention and capture.self_attention_downscale not in attended:
            raise ModelLoadError(
                f"capture.self_attention_downscale: this UNet has self-attention at {sorted(attended)} times smaller "
                f"than the latent, not {capture.self_attention_downscale}"
            )

    # -- cost --------------------------------------------------------------------------------
    def denoiser_call(self, config, latent, text_tokens):
        meta = dict(device="meta")
        sample = torch.zeros(1, config.in_channels, *latent, **meta)
        states = torch.zeros(1, text_tokens, config.cross_attention_dim, **meta)
        return (sample, torch.zeros(1, **meta)), {"encoder_hidden_states": states, **self.added_conditions(config)}

    def added_conditions(self, config) -> dict:
        return {}


class StableDiffusion(UNetFamily):
    name = "sd"
    text_to_image = "StableDiffusionPipeline"
    inpainting = "StableDiffusionInpaintPipeline"
    image_to_image = "StableDiffusionImg2ImgPipeline"
    # diffusers loads the safety checker unless it is None, and fetches its feature
    # extractor from the hub for single files unless that is None too
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    single_file_kwargs = {"feature_extractor": None}
    single_file_marker = "cond_stage_model."


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    text_to_image = "StableDiffusionXLPipeline"
    inpainting = "StableDiffusionXLInpaintPipeline"
    image_to_image = "StableDiffusionXLImg2ImgPipeline"
    # an installed invisible-watermark package would otherwise mark images and backgrounds
    load_kwargs = {"add_watermarker": False}
    inpainting_kwargs = {"add_watermarker": False}
    single_file_marker = "conditioner.embedders.1."

    def pooled(self, encoded: tuple):
        return encoded[2]

    def training_conditions(self, pipe, noisy, pooled) -> dict:
        """The pooled text and the size numbers of an uncropped image at the model's size."""
        height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=noisy.dtype, device=noisy.device)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(noisy), 1)}}

    def added_conditions(self, config) -> dict:
        """SDXL's UNet also takes the pooled text and six size numbers."""
        meta = dict(device="meta")
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": torch.zeros(1, pooled, **meta), "time_ids": torch.zeros(1, 6, **meta)}}
