"""SD3: an MM-DiT whose joint sequence puts the image tokens first; its text is CLIP's 77
positions followed by T5's, and its latents carry a shift as well as a scale."""

from __future__ import annotations

import torch

from maskmint.stages.families.mmdit import MMDiTFamily


class StableDiffusion3(MMDiTFamily):
    name = "sd3"
    text_to_image = "StableDiffusion3Pipeline"
    inpainting = "StableDiffusion3InpaintPipeline"
    image_to_image = "StableDiffusion3Img2ImgPipeline"
    single_file_marker = "joint_blocks."
    t5_component = "text_encoder_3"
    denoiser_class = "SD3Transformer2DModel"
    text_tokenizers = (("tokenizer", None), ("tokenizer_3", 256))  # the pipeline's default T5 length
    encode_kwargs = {"prompt_3": None, "do_classifier_free_guidance": False}
    pooled_output = 2

    def joint_processor(self):
        from maskmint.stages.capture.processors import SD3JointCaptureProcessor

        return SD3JointCaptureProcessor

    def time_embedding(self, transformer, timestep, pooled, guidance=None):
        return transformer.time_text_embed(timestep, pooled)

    def predict(self, pipe, noisy, timesteps, states, pooled, guidance: float):
        return pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=states,
                                pooled_projections=pooled).sample

    def denoiser_call(self, config, latent, text_tokens):
        meta = dict(device="meta")
        sample = torch.zeros(1, config.in_channels, *latent, **meta)
        states = torch.zeros(1, text_tokens, config.joint_attention_dim, **meta)
        return (sample, states, torch.zeros(1, config.pooled_projection_dim, **meta), torch.zeros(1, **meta)), {}
