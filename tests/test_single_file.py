"""Loading a single original-format `.safetensors` checkpoint, the way most SD 1.x models ship.

No such file can be fetched here and diffusers writes none, so the test writes the tiny
model in the original (CompVis/LDM) layout itself, key for key, then runs maskmint on it.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import torch
from safetensors.torch import save_file

from maskmint import launch
from maskmint.pipeline.plan import planned_keys
from maskmint.pipeline.rundir import RunDir
from maskmint.schemas.config import load_config
from maskmint.stages.models import load_text_layout, load_text_to_image

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            # SDXL's size/crop and pooled-text embedding
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key(key: str, unet) -> str:
    per_block = unet.config.layers_per_block
    for name, ldm in UNET_TOP.items():
        if key.startswith(name + "."):
            return ldm + key[len(name):]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = match.groups()
        index = 1 + int(block) * (per_block + 1) + int(layer)
        return f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        block, rest = match.groups()
        return f"input_blocks.{1 + int(block) * (per_block + 1) + per_block}.0.op.{rest}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = match.groups()
        return f"middle_block.{2 * int(layer) + (kind == 'attentions')}.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = match.groups()
        return f"output_blocks.{int(block) * (per_block + 1) + int(layer)}.{0 if kind == 'resnets' else 1}.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block, rest = match.groups()
        has_attention = "CrossAttn" in unet.config.up_block_types[int(block)]
        return f"output_blocks.{int(block) * (per_block + 1) + per_block}.{2 if has_attention else 1}.conv.{rest}"
    raise KeyError(key)


def resnet_names(key: str) -> str:
    for name, ldm in RESNET.items():
        key = key.replace(f".{name}.", f".{ldm}.")
    return key


def vae_key(key: str, blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    if "mid_block.attentions.0." in key:
        key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
        for name, ldm in VAE_ATTENTION.items():
            key = key.replace(f".{name}.", f".{ldm}.")
    return key


def original_format_state(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original SD 1.x checkpoint's names and shapes."""
    state = {}
    for key, value in pipe.unet.state_dict().items():
        name = unet_key(key, pipe.unet)
        state["model.diffusion_model." + (resnet_names(name) if ".resnets." in key else name)] = value
    blocks = len(pipe.vae.config.block_out_channels)
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, blocks)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original VAE attention uses 1x1 convolutions
        state["first_stage_model." + name] = value
    for key, value in pipe.text_encoder.state_dict().items():
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {key: value.contiguous() for key, value in state.items()}


def test_single_file_checkpoint_loads_the_same_weights_and_runs(config_dict, tiny_model_dir, write_config, tmp_path, capsys):
    checkpoint = tmp_path / "tiny-sd.safetensors"
    folder_config = load_config(write_config(config_dict, "folder.yaml")).model
    reference = load_text_to_image(folder_config, torch.device("cpu"), torch.float32)
    state = original_format_state(reference)
    assert not any(key.startswith(("down_blocks", "mid_block", "up_blocks")) for key in state)
    save_file(state, checkpoint)

    data = copy.deepcopy(config_dict)
    data["model"].update(path=str(checkpoint), single_file_config=str(tiny_model_dir))
    config_path = write_config(data, "single.yaml")
    model = load_config(config_path).model
    loaded = load_text_to_image(model, torch.device("cpu"), torch.float32)
    for name in ("unet", "vae", "text_encoder"):
        expected, got = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"
    tokenizer = load_text_layout(model).segments[0].tokenizer
    assert tokenizer("a photo of a dog").input_ids == reference.tokenizer("a photo of a dog").input_ids

    # The same seed through both loading paths draws the same image.
    images = [
        pipe("a photo of a dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
        for pipe in (reference, loaded)
    ]
    np.testing.assert_array_equal(images[0], images[1])

    data["output"] = {"samples": 4, "shard_size": 4}
    assert launch.main(["run", "--config", str(write_config(data, "single.yaml")), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    stats = RunDir(tmp_path / "run").shard_stats()
    assert sorted(k for s in stats for k in [*s.written, *s.dropped]) == planned_keys(load_config(config_path))


def test_single_file_without_its_config_folder_is_a_clear_error(config_dict, write_config, tmp_path, capsys):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, checkpoint)
    data = copy.deepcopy(config_dict)
    data["model"]["path"] = str(checkpoint)
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "single_file_config" in err and "Traceback" not in err


def openclip_state(encoder) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection under OpenCLIP's names: fused q/k/v, resblocks, a transposed projection."""
    state, layers = {}, encoder.state_dict()
    state["positional_embedding"] = layers["text_model.embeddings.position_embedding.weight"]
    state["token_embedding.weight"] = layers["text_model.embeddings.token_embedding.weight"]
    state["ln_final.weight"] = layers["text_model.final_layer_norm.weight"]
    state["ln_final.bias"] = layers["text_model.final_layer_norm.bias"]
    state["text_projection"] = layers["text_projection.weight"].T
    for i in range(encoder.config.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[theirs + f"attn.in_proj_{kind}"] = torch.cat(
                [layers[ours + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for name, old in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                              ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                state[theirs + f"{old}.{kind}"] = layers[ours + f"{name}.{kind}"]
    return state


def sdxl_original_format_state(pipe) -> dict[str, torch.Tensor]:
    """SDXL's original (Stability generative-models) layout: the SD-style UNet and VAE names,
    the size/crop embedding as label_emb, CLIP-L under conditioner.embedders.0 and the
    OpenCLIP bigG-style encoder under conditioner.embedders.1."""
    state = {k: v for k, v in original_format_state(pipe).items() if not k.startswith("cond_stage_model.")}
    for key, value in pipe.text_encoder.state_dict().items():
        state["conditioner.embedders.0.transformer.text_model." + key.removeprefix("text_model.")] = value
    for key, value in openclip_state(pipe.text_encoder_2).items():
        state["conditioner.embedders.1.model." + key] = value
    return {key: value.contiguous() for key, value in state.items()}


def test_single_file_sdxl_in_the_original_layout_loads_the_same_weights(tmp_path):
    from maskmint.pipeline.testing.tiny_models import build_tiny_sdxl_pipeline
    from maskmint.schemas.config import ModelConfig
    from maskmint.stages.families import SDXL, resolve_family

    folder = tmp_path / "tiny-sdxl"
    build_tiny_sdxl_pipeline(seed=4, image_size=32).save_pretrained(folder)
    reference = load_text_to_image(ModelConfig(path=str(folder)), torch.device("cpu"), torch.float32)
    checkpoint = tmp_path / "tiny-sdxl.safetensors"
    state = sdxl_original_format_state(reference)
    assert any(k.startswith("model.diffusion_model.label_emb.") for k in state)
    save_file(state, checkpoint)

    model = ModelConfig(path=str(checkpoint), single_file_config=str(folder))
    assert resolve_family(model) is SDXL  # auto: the OpenCLIP encoder's names say SDXL
    loaded = load_text_to_image(model, torch.device("cpu"), torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got = getattr(reference, name).state_dict(), getattr(loaded, name).state_dict()
        assert expected.keys() == got.keys(), name
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}.{key}"
