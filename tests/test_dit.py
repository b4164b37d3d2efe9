"""MM-DiT families (SD3, Flux): the same command, shard format and checks as the UNet ones."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from maskmint import launch
from bench.chaos import audit
from maskmint.pipeline.testing.tiny_models import BUILDERS
from maskmint.schemas.config import CaptureConfig, GenerationConfig, ModelConfig
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.families import FLUX, SD3, family_of_pipeline, resolve_family
from maskmint.stages.generate import Generate, decode, to_uint8
from maskmint.stages.tokens import token_slots
from tests.conftest import TEST_IMAGE_SIZE, save_tiny_models
from tests.test_capture import STEPS, reference_heatmaps

DIT_FAMILIES = ("sd3", "flux")
DEFAULT_PROCESSORS = {"sd3": JointAttnProcessor2_0, "flux": FluxAttnProcessor}


@pytest.fixture(scope="module", params=DIT_FAMILIES)
def dit(request):
    pipe = BUILDERS[request.param](seed=1, image_size=TEST_IMAGE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


@pytest.fixture(scope="module")
def dit_dirs(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, DIT_FAMILIES, seed=2)


class JointStoringProcessor:
    """The family's own joint attention, plus every call's full softmax probabilities,
    materialised (image rows x text columns kept) in the slowest, plainest way."""

    def __init__(self, family: str, layer: str, log: list):
        self.family, self.layer, self.log = family, layer, log
        self.inner = DEFAULT_PROCESSORS[family]()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None, **kw):
        if encoder_hidden_states is not None:
            image_tokens, text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
            if self.family == "sd3":
                def heads(x, norm):
                    x = x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
                    return x if norm is None else norm(x)

                q = torch.cat([heads(attn.to_q(hidden_states), attn.norm_q),
                               heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
                k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                               heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
                image_rows, text_columns = slice(0, image_tokens), slice(image_tokens, image_tokens + text_tokens)
            else:
                def heads(x):
                    return x.unflatten(-1, (-1, attn.head_dim))

                q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))),
                               attn.norm_q(heads(attn.to_q(hidden_states)))], dim=1)
                k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))),
                               attn.norm_k(heads(attn.to_k(hidden_states)))], dim=1)
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1).transpose(1, 2)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1).transpose(1, 2)
                image_rows, text_columns = slice(text_tokens, text_tokens + image_tokens), slice(0, text_tokens)
            probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            self.log.append((self.layer, probs[:, :, image_rows, text_columns].float().clone()))
        if self.family == "sd3":
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _batch(pipe):
    layout = family_of_pipeline(pipe).text_layout(pipe.components)
    prompts = ["a photo of a dog in a park", "a zebra in a kitchen"]
    spans = [
        [ConceptSpan(name="dog", class_id=1, word="dog", char_span=(13, 16), token_positions=layout.positions(prompts[0], (13, 16)))],
        [ConceptSpan(name="zebra", class_id=2, word="zebra", char_span=(2, 7), token_positions=layout.positions(prompts[1], (2, 7)))],
    ]
    assert all(len(s[0].token_positions) > 1 for s in spans[1:])  # a multi-token word is part of the check
    return {"prompt": prompts, "negative_prompt": ["", ""], "seed": [11, 12], "concepts": spans}, layout


def _generate_plain(name, pipe, batch, layout, processor_factory):
    log = []
    transformer = pipe.transformer
    transformer.set_attn_processor(
        {n: processor_factory(n.removesuffix(".processor"), log) for n in transformer.attn_processors}
    )
    family = family_of_pipeline(pipe)
    latents = _pipe_output(pipe, batch, layout, "latent")
    with torch.inference_mode():
        image = decode(pipe.vae, family.latents_for_vae(pipe, latents, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE))
    return to_uint8(image), log


def _pipe_output(pipe, batch, layout, output_type: str):
    """The family pipeline's own call on the batch's prompts and seeds."""
    with torch.inference_mode():
        return pipe(
            **family_of_pipeline(pipe).prompt_kwargs(layout, batch["prompt"], batch["negative_prompt"]),
            num_inference_steps=STEPS, guidance_scale=5.0,
            generator=[torch.Generator().manual_seed(s) for s in batch["seed"]],
            height=TEST_IMAGE_SIZE, width=TEST_IMAGE_SIZE, output_type=output_type,
        ).images


def _storing(name):
    def factory(layer, log):
        double_stream = layer.startswith("transformer_blocks.") and layer.endswith(".attn")
        return JointStoringProcessor(name, layer, log) if double_stream else DEFAULT_PROCESSORS[name]()

    return factory


def test_joint_capture_equals_slow_reference_and_leaves_images_alone(dit):
    name, pipe = dit
    batch, layout = _batch(pipe)
    latent = TEST_IMAGE_SIZE // pipe.vae_scale_factor
    stored_image, log = _generate_plain(name, pipe, batch, layout, _storing(name))
    assert {layer for layer, _ in log} == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"}
    expected = reference_heatmaps(log, 2, batch["concepts"], latent, set(range(STEPS)), False, [8])

    generate = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig())
    out = generate(batch)
    _, weights = token_slots(batch["concepts"])
    captured = generate.store.heatmaps(weights).numpy()
    assert expected.max() > 0
    np.testing.assert_allclose(captured, expected, rtol=2e-3, atol=1e-6)

    plain, _ = _generate_plain(name, pipe, batch, layout, lambda layer, log: DEFAULT_PROCESSORS[name]())
    np.testing.assert_array_equal(out["image"], plain)  # capture leaves the images bit for bit
    np.testing.assert_array_equal(stored_image, plain)


def test_generated_images_are_the_family_pipelines_own_decode(dit):
    """Latents to pixels by diffusers' own pipeline (output_type="np"), not by maskmint's path:
    the VAE's shift and scale (both non-zero here) and Flux's packing are undone as it does."""
    name, pipe = dit
    assert pipe.vae.config.shift_factor and pipe.vae.config.scaling_factor != 1.0
    batch, layout = _batch(pipe)
    ours = Generate(pipe, GenerationConfig(steps=STEPS, guidance_scale=5.0), CaptureConfig())(batch)["image"]
    theirs = _pipe_output(pipe, batch, layout, "np")
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - (theirs * 255).round().astype(int)).max() <= 1


def test_joint_capture_in_bounded_chunks_is_the_same(dit, monkeypatch):
    """A large layer's scores are taken a few query rows at a time; the maps do not change."""
    from maskmint.stages.capture import cross as capture

    name, pipe = dit
    batch, _ = _batch(pipe)
    _, weights = token_slots(batch["concepts"])
    whole = Generate(pipe, GenerationConfig(steps=2), CaptureConfig())
    whole(batch)
    monkeypatch.setattr(capture, "QUERY_CHUNK_ELEMENTS", 1000)
    chunked = Generate(pipe, GenerationConfig(steps=2), CaptureConfig())
    chunked(batch)
    np.testing.assert_allclose(chunked.store.heatmaps(weights).numpy(), whole.store.heatmaps(weights).numpy(), rtol=1e-5)


def test_text_layout_points_at_the_concept_in_every_encoder(dit):
    name, pipe = dit
    layout = family_of_pipeline(pipe).text_layout(pipe.components)
    prompt = "a photo of a dog in a park"
    positions = layout.positions(prompt, (13, 16))
    if name == "sd3":  # CLIP's 77 (BOS first), then T5's (no BOS)
        assert positions == [5, 77 + 4]
        assert pipe.tokenizer(prompt).input_ids[5] == pipe.tokenizer.convert_tokens_to_ids("dog</w>")
        assert pipe.tokenizer_3(prompt).input_ids[4] == pipe.tokenizer_3.convert_tokens_to_ids("\u2581dog")
    else:  # T5 alone
        assert positions == [4]
        assert pipe.tokenizer_2(prompt).input_ids[4] == pipe.tokenizer_2.convert_tokens_to_ids("\u2581dog")


@pytest.mark.parametrize("recipe", ["cross", "concept_attention"])
@pytest.mark.parametrize("name", DIT_FAMILIES)
def test_dit_runs_end_to_end(name, recipe, dit_dirs, config_dict, write_config, tmp_path):
    import webdataset as wds

    assert resolve_family(ModelConfig(path=str(dit_dirs[name]))) is {"sd3": SD3, "flux": FLUX}[name]
    data = copy.deepcopy(config_dict)
    data["model"]["path"] = str(dit_dirs[name])
    data["prompts"]["concepts_per_image"] = [1, 2]
    data["prompts"]["templates"] = ["a photo of a {concept} in a park", "a {concept} and a {concept2} in a kitchen"]
    data["mask"] = {"tau": 0.2, "min_area": 0.0}
    data["capture"] = {"recipe": recipe}
    data["output"] = {"samples": 6, "shard_size": 3}
    out = tmp_path / "run"
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(out), "--executor", "local",
                        "--quiet"]) == 0
    assert audit(out) == []
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 6
    for sample in samples:
        ids = {c["class_id"] for c in sample["json"]["concepts"]}
        assert set(np.unique(sample["mask.png"][..., 0])) <= {0, 255} | ids
        assert sample["jpg"].shape == (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)
        heat = sample["heatmap.png"][..., 0]
        assert heat.max() > heat.min()  # not flat
    assert any(len(s["json"]["concepts"]) == 2 for s in samples)
    assert any(set(np.unique(s["mask.png"][..., 0])) - {0, 255} for s in samples)  # some class pixels made it


def test_options_a_family_cannot_honour_are_one_line_exit_2(dit_dirs, tiny_model_dir, config_dict, write_config,
                                                             tmp_path, capsys):
    for model, change, words in (
        ("flux", ("capture", "self_attention", True), ["capture.self_attention", "flux"]),
        ("flux", ("model", "inpaint_path", str(dit_dirs["sd3"])), ["model.inpaint_path", "flux"]),
        ("flux", ("capture", "blocks", [7]), ["capture.blocks", "2 double-stream blocks"]),
        ("sd", ("capture", "recipe", "concept_attention"), ["capture.recipe", "family sd"]),
        ("sd", ("capture", "blocks", [0]), ["capture.blocks", "family sd"]),
    ):
        data = copy.deepcopy(config_dict)
        data["model"]["path"] = str(dit_dirs[model] if model in dit_dirs else tiny_model_dir)
        section, field, value = change
        data.setdefault(section, {})[field] = value
        for command in (["plan", "--config", str(write_config(data))],
                        ["run", "--config", str(write_config(data)), "--out", str(tmp_path / "run"), "--quiet"]):
            capsys.readouterr()
            assert launch.main(command) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and all(w in err[0] for w in words), err
            assert not (tmp_path / "run").exists()  # refused before anything was written


def test_plan_reports_tokens_of_the_longest_encoder_sequence(dit_dirs, config_dict, write_config, capsys):
    data = copy.deepcopy(config_dict)
    data["model"]["path"] = str(dit_dirs["sd3"])
    assert launch.main(["plan", "--config", str(write_config(data)), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["token_limit"] == 31  # the tiny T5's 32 less its EOS; CLIP keeps 75
    assert report["cost"]["tflop_per_triple"] > 0
