"""Real architectures at random init (nothing downloaded), and the test-sized ones, for the
throughput benchmark: `sd15`, `sdxl`, `sd3`, `flux-schnell`, `flux-dev`, the embedded `toy`
model and `tiny` / `tiny-sdxl` / `tiny-sd3` / `tiny-flux`."""

from __future__ import annotations

from pathlib import Path

import torch

from maskmint.pipeline.testing.tiny_models import (
    build_t5_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    build_tokenizer,
    sd_ddim_scheduler,
)
from maskmint.stages.models import load_text_to_image

REPO = Path(__file__).resolve().parents[1]
WORDS = ["a", "on", "background", "circle", "square", "triangle", "red", "blue", "gray", "flat", "striped"]


def build_sd15():
    """SD 1.5's architecture with random weights (the tokenizer's vocabulary is a small word list)."""
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = build_tokenizer(WORDS, max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd_ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl():
    """SDXL base's architecture with random weights: UNet 2.57B (transformer depths 1, 2, 10;
    size/crop micro-conditioning), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders, VAE."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(WORDS, max_length=77), build_tokenizer(WORDS, max_length=77)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=49408, max_position_embeddings=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768, **special))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        projection_dim=1280, **special))
    unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=True,
    )
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=sd_ddim_scheduler(), add_watermarker=False)


def _t5_xxl(tokenizer):
    """T5 v1.1 XXL's encoder (4.76B; the vocabulary is the small word list's)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )).eval()


def _clip(tokenizer, big: bool, projection: bool):
    """CLIP ViT-L/14's text tower, or OpenCLIP ViT-bigG/14's (big)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    shape = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280) if big else \
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             hidden_act="quick_gelu", projection_dim=768)
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _flow_vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=scaling, shift_factor=shift,
    )


def build_sd3():
    """SD3 Medium's architecture with random weights: MM-DiT 2.03B (24 joint blocks), CLIP
    ViT-L/14 + OpenCLIP ViT-bigG/14 + T5 v1.1 XXL encoders, 16-channel VAE, 1024 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(WORDS, max_length=77), build_tokenizer(WORDS, max_length=77)
    tokenizer_3 = build_t5_tokenizer(WORDS, max_length=512)
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(1.5305, 0.0609), text_encoder=_clip(tokenizer, False, True), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, True, True), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_xxl(tokenizer_3), tokenizer_3=tokenizer_3,
    )


def build_flux(guidance_embeds: bool):
    """Flux.1's architecture with random weights: MM-DiT 11.9B (19 double-stream, 38
    single-stream blocks), CLIP ViT-L/14 (pooled) + T5 v1.1 XXL, 16-channel VAE, 1024 px.
    guidance_embeds: dev (distilled guidance) rather than schnell."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tokenizer(WORDS, max_length=77), build_t5_tokenizer(WORDS, max_length=512)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=guidance_embeds, axes_dims_rope=(16, 56, 56),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=_flow_vae(0.3611, 0.1159),
        text_encoder=_clip(tokenizer, False, False), tokenizer=tokenizer,
        text_encoder_2=_t5_xxl(tokenizer_2), tokenizer_2=tokenizer_2,
    )


FAMILY = {
    "toy": "sd", "tiny": "sd", "sd15": "sd", "tiny-sdxl": "sdxl", "sdxl": "sdxl", "tiny-sd3": "sd3", "sd3": "sd3",
    "tiny-flux": "flux", "flux-schnell": "flux", "flux-dev": "flux",
}


def build_pipe(name: str, device: torch.device, dtype: torch.dtype):
    if name == "toy":
        from maskmint.schemas.config import ModelConfig

        return load_text_to_image(ModelConfig(path=str(REPO / "assets" / "tiny-sd")), device, dtype)
    builders = {
        "tiny": lambda: build_tiny_pipeline(seed=0, image_size=32, words=WORDS),
        "tiny-sdxl": lambda: build_tiny_sdxl_pipeline(seed=0, image_size=32, words=WORDS),
        "tiny-sd3": lambda: build_tiny_sd3_pipeline(seed=0, image_size=32, words=WORDS),
        "tiny-flux": lambda: build_tiny_flux_pipeline(seed=0, image_size=32, words=WORDS),
        "sd15": build_sd15,
        "sdxl": build_sdxl,
        "sd3": build_sd3,
        "flux-schnell": lambda: build_flux(guidance_embeds=False),
        "flux-dev": lambda: build_flux(guidance_embeds=True),
    }
    pipe = builders[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
