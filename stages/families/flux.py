"""Flux: an MM-DiT whose joint sequence puts the T5 text tokens first; guidance-distilled
(no negative prompt, an optional guidance embedding), latents packed 2 x 2 into tokens,
and a timestep the transformer takes in [0, 1] and scales by 1000."""

from __future__ import annotations

import torch

from maskmint.stages.families.mmdit import MMDiTFamily

TIMESTEP_SCALE = 1000.0


class Flux(MMDiTFamily):
    name = "flux"
    text_to_image = "FluxPipeline"
    inpainting = "FluxInpaintPipeline"
    image_to_image = "FluxImg2ImgPipeline"
    single_file_marker = "double_blocks."
    t5_component = "text_encoder_2"
    denoiser_class = "FluxTransformer2DModel"
    text_tokenizers = (("tokenizer_2", 512),)
    takes_negative_prompt = False
    packed_latents = True

    def joint_processor(self):
        from maskmint.stages.capture.processors import FluxJointCaptureProcessor

        return FluxJointCaptureProcessor

    def time_embedding(self, transformer, timestep, pooled, guidance=None):
        if guidance is None:  # a model without a guidance embedding (schnell-like)
            return transformer.time_text_embed(timestep * TIMESTEP_SCALE, pooled)
        return transformer.time_text_embed(timestep * TIMESTEP_SCALE, guidance * TIMESTEP_SCALE, pooled)

    def predict(self, pipe, noisy, timesteps, states, pooled, guidance: float):
        batch, channels, rows, cols = noisy.shape
        transformer = pipe.transformer
        ids = pipe._prepare_latent_image_ids(batch, rows // 2, cols // 2, noisy.device, noisy.dtype)
        steer = torch.full((batch,), guidance, device=noisy.device, dtype=noisy.dtype) if transformer.config.guidance_embeds else None
        out = transformer(
            hidden_states=pipe._pack_latents(noisy, batch, channels, rows, cols),
            timestep=timesteps / TIMESTEP_SCALE, guidance=steer, pooled_projections=pooled,
            encoder_hidden_states=states, txt_ids=torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=ids,
        ).sample
        return pipe._unpack_latents(out, rows * pipe.vae_scale_factor, cols * pipe.vae_scale_factor, pipe.vae_scale_factor)

    def latents_for_vae(self, pipe, latents, height: int, width: int):
        return super().latents_for_vae(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor),
                                       height, width)

    def latents_from_vae(self, pipe, encoded, height: int, width: int):
        latents = super().latents_from_vae(pipe, encoded, height, width)
        return pipe._pack_latents(latents, *latents.shape[:2], *latents.shape[2:])

    def denoiser_call(self, config, latent, text_tokens):
        meta = dict(device="meta")
        tokens = (latent[0] // 2) * (latent[1] // 2)
        sample = torch.zeros(1, tokens, config.in_channels, **meta)
        step = torch.zeros(1, **meta)
        states = torch.zeros(1, text_tokens, config.joint_attention_dim, **meta)
        pooled = torch.zeros(1, config.pooled_projection_dim, **meta)
        extra = {"img_ids": torch.zeros(tokens, 3, **meta), "txt_ids": torch.zeros(text_tokens, 3, **meta),
                 "guidance": step if config.guidance_embeds else None}
        return (sample, states, pooled, step), extra
