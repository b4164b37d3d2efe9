"""The toy MM-DiT trainer: Flux- and SD3-shaped folders maskmint runs, resumable training,
and the word-attention targets and probes it trains with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench import quality, train_toy_dit
from bench.toyworld import SHAPES, WORDS, render_scene
from maskmint.schemas.config import RunConfig
from tests.test_bench import train_cut_and_rerun

REPO = Path(__file__).resolve().parents[1]
TOY_VAE = REPO / "assets" / "tiny-sd"

DIT_ARGUMENTS = ["--steps", "4", "--batch", "2", "--width", "32", "--heads", "2", "--double-blocks", "1",
                 "--single-blocks", "1", "--checkpoint-every", "1", "--seed", "3"]


def runs_both_recipes(model: Path) -> None:
    """A few samples of the toy world through maskmint's stages on `model`, both recipes."""
    data = yaml.safe_load((REPO / "configs" / "toy-flux.yaml").read_text())
    data["model"] = {"path": str(model)}
    data["generation"].update(steps=2, batch_size=2, guidance_scale=1.0)
    data["removal"]["steps"] = 2
    for recipe in ("cross", "concept_attention"):
        data["capture"] = {"recipe": recipe}
        summary, scores, _, _ = quality.evaluate(RunConfig.model_validate(data), samples=2, progress=False)
        assert len(scores) == 2 and all(s["concepts"] >= 1 for s in scores)


def assert_same_weights(first: Path, second: Path) -> dict:
    """The two saved toy folders hold the same weights (to fp16 rounding); their models."""
    (_, whole), (_, cut) = train_toy_dit.load_models(first), train_toy_dit.load_models(second)
    for a, b in zip(whole.values(), cut.values()):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x.float(), y.float(), atol=1e-3), name
    return whole


def test_toy_dit_is_a_flux_folder_maskmint_runs_with_the_reused_vae_untouched(tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "toy-flux"
    train_toy_dit.main(["--vae", str(REPO / "assets" / "tiny-sd"), "--out", str(out), *DIT_ARGUMENTS])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    record = json.loads((out / "training.json").read_text())
    assert record["trained_by"] == "bench/train_toy_dit.py" and record["vae_from"]["trained_by"] == "bench/train_toy_model.py"
    before = AutoencoderKL.from_pretrained(REPO / "assets" / "tiny-sd" / "vae")
    after = AutoencoderKL.from_pretrained(out / "vae")
    assert after.config.shift_factor == 0.0 and after.config.scaling_factor == before.config.scaling_factor
    assert all(torch.equal(x, y) for x, y in zip(before.state_dict().values(), after.state_dict().values()))

    runs_both_recipes(out)


def test_toy_dit_training_interrupted_and_rerun_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    arguments = ["--vae", str(REPO / "assets" / "tiny-sd"), *DIT_ARGUMENTS]
    train_toy_dit.main(["--out", str(tmp_path / "whole"), *arguments])
    out = tmp_path / "cut"
    train_cut_and_rerun(train_toy_dit, ["--out", str(out), *arguments], 3, monkeypatch, name="draw_scenes")  # die in the third step
    assert_same_weights(tmp_path / "whole", out)


def test_word_targets_put_each_image_token_on_its_own_objects_words():
    from bench.train_toy_model import MAX_TOKENS, caption_ids
    from maskmint.pipeline.testing.tiny_models import build_t5_tokenizer

    tokenizer = build_t5_tokenizer(WORDS, MAX_TOKENS)
    checked = {"object": 0, "background": 0}
    for seed in range(6):
        scene = render_scene(np.random.default_rng(seed), n_objects=2)
        words = scene.caption.split()  # one T5 token per toy word, in order
        token_words = train_toy_dit.token_words(tokenizer, caption_ids(tokenizer, [scene.caption])[0].tolist())
        targets = train_toy_dit.word_targets(scene, token_words)
        assert targets.shape == (64, MAX_TOKENS) and np.allclose(targets.sum(1).numpy(), 1.0)
        cells = scene.mask.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)  # token -> its 8 x 8 pixels
        for token, pixels in enumerate(cells):
            if len(set(pixels.tolist())) != 1:
                continue  # a token on an edge shares its target
            if pixels[0] == 0:
                expected = {words.index(w): 1 / 3 for w in (words[-3], words[-2], "background")}
                checked["background"] += 1
            else:
                colour, shape = next(o for o in scene.objects if SHAPES[o[1]] == pixels[0])
                expected = {words.index(colour): 0.5, words.index(shape): 0.5}
                checked["object"] += 1
            row = targets[token].numpy()
            assert all(abs(row[i] - share) < 1e-6 for i, share in expected.items()), (seed, token, row)
            assert abs(row.sum() - sum(expected.values())) < 1e-6
        places = train_toy_dit.place_targets(scene, token_words)
        for colour, shape in scene.objects:  # each object word looks at its object's tokens, by area
            area = (cells == SHAPES[shape]).mean(axis=1)
            for word in (colour, shape):
                assert np.allclose(places[words.index(word)].numpy(), area / area.sum(), atol=1e-6)
        assert places[words.index("and")].sum() == 0 and places[words.index("on")].sum() == 0  # names nothing
    assert min(checked.values()) >= 20, checked


def test_toy_dit_with_word_attention_and_a_scene_pool_resumes_exactly(tmp_path, monkeypatch):
    arguments = ["--vae", str(REPO / "assets" / "tiny-sd"), *DIT_ARGUMENTS, "--word-attention", "0.2",
                 "--scene-pool", "8", "--lr", "0.5"]  # steps large enough to show in the fp16 weights
    train_toy_dit.main(["--out", str(tmp_path / "whole"), *arguments])
    out = tmp_path / "cut"
    train_cut_and_rerun(train_toy_dit, ["--out", str(out), *arguments], 3, monkeypatch,
                        owner=train_toy_dit.ScenePool, name="draw")
    assert_same_weights(tmp_path / "whole", out)


SD3_ARGUMENTS = ["--family", "sd3", "--vae", str(TOY_VAE), "--steps", "4", "--batch", "2", "--width", "32",
                 "--heads", "2", "--double-blocks", "2", "--checkpoint-every", "1", "--seed", "3"]


def test_widened_vae_encodes_and_decodes_as_the_toy_vae_it_widens():
    narrow = train_toy_dit.load_vae(TOY_VAE)
    wide = train_toy_dit.widen_vae(narrow, 16)
    scenes = [render_scene(np.random.default_rng(seed)) for seed in range(3)]
    images = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        before, after = narrow.encode(images).latent_dist, wide.encode(images).latent_dist
        assert after.mean.shape[1] == 16
        torch.testing.assert_close(after.mean[:, :4], before.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(after.std[:, :4], before.std, atol=1e-5, rtol=1e-5)
        assert after.mean[:, 4:].abs().max() == 0 and after.std[:, 4:].max() < 1e-6
        sample = after.sample(torch.Generator().manual_seed(0))
        torch.testing.assert_close(wide.decode(sample).sample, narrow.decode(sample[:, :4]).sample, atol=1e-4, rtol=1e-4)


def test_sd3_probe_keeps_the_joint_attention_restricted_to_text_and_leaves_the_block_unchanged():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from maskmint.pipeline.testing.tiny_models import build_tiny_sd3_pipeline

    transformer = build_tiny_sd3_pipeline(seed=1).transformer
    attn = transformer.transformer_blocks[0].attn
    image, text = torch.randn(2, 9, attn.query_dim), torch.randn(2, 5, attn.query_dim)
    plain = JointAttnProcessor2_0()(attn, image, text)
    kept = []
    probed = train_toy_dit.SD3WordAttentionProbe(kept)(attn, image, text)
    for a, b in zip(plain, probed):
        torch.testing.assert_close(a, b)
    # the reference: full joint attention over [image, text] keys, per head, by hand
    heads = attn.heads

    def split(x):
        return x.view(2, x.shape[1], heads, -1).transpose(1, 2)

    q = torch.cat([split(attn.to_q(image)), split(attn.add_q_proj(text))], dim=2)
    k = torch.cat([split(attn.to_k(image)), split(attn.add_k_proj(text))], dim=2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    image_rows = scores[:, :, :9, 9:].softmax(-1).mean(1)  # image queries over the text keys only
    text_rows = scores[:, :, 9:, :9].softmax(-1).mean(1)
    (image_to_text, text_to_image), = kept
    torch.testing.assert_close(image_to_text, image_rows)
    torch.testing.assert_close(text_to_image, text_rows)


def test_sd3_text_words_line_up_with_the_pipelines_joint_text_sequence():
    from argparse import Namespace

    family = train_toy_dit.FAMILIES["sd3"]
    tokenizers = family.tokenizers()
    scene = render_scene(np.random.default_rng(5), n_objects=2)
    (words,) = family.text_words(tokenizers, [scene.caption])
    models = family.build(tokenizers, Namespace(width=32, heads=2, double_blocks=2, seed=0), family.vae(TOY_VAE))
    states, _ = family.encode(models, tokenizers, [scene.caption])  # the pipeline's own encode_prompt
    assert states.shape[1] == len(words) == 2 * tokenizers[0].model_max_length
    for part in (words[:len(words) // 2], words[len(words) // 2:]):  # CLIP's slots, then T5's
        assert [w for w in part if w in scene.caption.split()] == scene.caption.split()
    named = {word for obj in scene.objects for word in obj} | (train_toy_dit.BACKGROUND_WORDS & set(scene.caption.split()))
    looking = train_toy_dit.place_targets(scene, words).sum(1) > 0
    assert [w for w, looks in zip(words, looking) if looks] == [w for w in words if w in named]
    assert looking.sum() == 2 * len(named) > 8  # each named word in both encoders' slots


def test_toy_sd3_is_an_sd3_folder_maskmint_runs_both_recipes(tmp_path):
    out = tmp_path / "toy-sd3"
    train_toy_dit.main(["--out", str(out), *SD3_ARGUMENTS, "--word-attention", "0.2"])
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    record = json.loads((out / "training.json").read_text())
    assert record["arguments"]["family"] == "sd3" and record["vae_from"]["trained_by"] == "bench/train_toy_model.py"
    runs_both_recipes(out)


def test_toy_sd3_training_interrupted_and_rerun_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    arguments = [*SD3_ARGUMENTS, "--word-attention", "0.2", "--scene-pool", "8", "--lr", "0.5"]
    train_toy_dit.main(["--out", str(tmp_path / "whole"), *arguments])
    out = tmp_path / "cut"
    train_cut_and_rerun(train_toy_dit, ["--out", str(out), *arguments], 3, monkeypatch,
                        owner=train_toy_dit.ScenePool, name="draw")
    assert set(assert_same_weights(tmp_path / "whole", out)) == {
        "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}


@pytest.mark.parametrize("family_name", ["flux", "sd3"])
def test_training_prediction_is_the_pipelines_own_denoiser_call(family_name):
    """What training asks of the transformer at noise level sigma is what the pipeline's loop
    asks of it there (SD3 gives timesteps in thousandths of sigma, Flux in sigma)."""
    from maskmint.pipeline.testing.tiny_models import BUILDERS

    pipe = BUILDERS[family_name](seed=2, image_size=64)
    family = train_toy_dit.FAMILIES[family_name]
    seen = {}

    def keep(module, args, kwargs, output):
        seen.setdefault("call", (kwargs, output[0] if isinstance(output, tuple) else output.sample))

    pipe.transformer.register_forward_hook(keep, with_kwargs=True)
    pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, height=64, width=64, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    kwargs, output = seen["call"]
    sigma = pipe.scheduler.sigmas[:1]
    with torch.no_grad():
        again = family.predict(pipe.transformer, kwargs["hidden_states"], sigma, kwargs["encoder_hidden_states"],
                               kwargs["pooled_projections"], kwargs.get("img_ids"))
    torch.testing.assert_close(again, output)


def test_an_interrupted_run_continued_to_fewer_steps_ends_as_a_run_of_that_many(tmp_path, monkeypatch):
    """--steps is where a run stops, not how it trains: a run of 6 cut after its step-2
    checkpoint and continued with --steps 4 gives the weights of a run of 4."""
    arguments = ["--vae", str(TOY_VAE), *DIT_ARGUMENTS]  # 4 steps
    train_toy_dit.main(["--out", str(tmp_path / "four"), *arguments])
    out = tmp_path / "cut"
    longer = [*arguments, "--steps", "6"]  # the later flag wins
    real, calls = train_toy_dit.draw_scenes, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_toy_dit, "draw_scenes", dying)
    with pytest.raises(KeyboardInterrupt):
        train_toy_dit.main(["--out", str(out), *longer])
    monkeypatch.setattr(train_toy_dit, "draw_scenes", real)
    train_toy_dit.main(["--out", str(out), *arguments])
    assert "continuing from" in out.with_name(out.name + ".train.log").read_text()
    assert_same_weights(tmp_path / "four", out)


def test_dev_student_starts_as_its_teacher_and_learns_the_teachers_guided_prediction(tmp_path):
    """The Flux.1-dev shaped student: a guidance embedding that starts at zero (so at first it
    predicts as the teacher, whatever the scale), trained towards the teacher's classifier-free
    guided prediction, computed here call by call; its folder is dev-shaped and maskmint runs it."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    train_toy_dit.main(["--vae", str(TOY_VAE), "--out", str(teacher_dir), *DIT_ARGUMENTS, "--caption-dropout", "0.5"])
    family = train_toy_dit.FAMILIES["flux"]
    tokenizers, models = family.load(teacher_dir)
    teacher = models["transformer"].eval()
    student = family.dev_shaped(teacher).eval()
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    noisy, ids = family.tokens(latents)
    sigmas = torch.tensor([0.3, 0.8])
    states, pooled = family.encode(models, tokenizers, ["a red circle on a flat gray background", "a blue square"])
    empty_states, empty_pooled = family.encode(models, tokenizers, ["", ""])
    scale = torch.tensor([1.0, 4.0])
    with torch.no_grad():
        conditional = family.predict(teacher, noisy, sigmas, states, pooled, ids)
        unconditional = family.predict(teacher, noisy, sigmas, empty_states, empty_pooled, ids)
        for guidance in (torch.tensor([1.0, 1.0]), scale):
            torch.testing.assert_close(family.predict(student, noisy, sigmas, states, pooled, ids, guidance=guidance),
                                       conditional)
        target = train_toy_dit.guided_target(family, models, tokenizers, teacher, noisy, sigmas.view(-1, 1, 1),
                                             states, pooled, ids, scale)
    torch.testing.assert_close(target[0], conditional[0], rtol=1e-4, atol=1e-5)  # scale 1: the caption alone
    torch.testing.assert_close(target[1], unconditional[1] + 4.0 * (conditional[1] - unconditional[1]), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(conditional, unconditional)  # the empty caption conditions differently

    train_toy_dit.main(["--out", str(student_dir), *DIT_ARGUMENTS, "--guidance-teacher", str(teacher_dir)])
    config = json.loads((student_dir / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is True
    record = json.loads((student_dir / "training.json").read_text())
    assert record["distilled_from"]["arguments"]["caption_dropout"] == "0.5"
    assert record["transformer"]["guidance_embeds"] and record["resumed_from"] is None
    _, trained = family.load(student_dir)
    for name in ("text_encoder", "text_encoder_2"):  # shared with the teacher, frozen
        assert all(torch.equal(a, b) for a, b in zip(trained[name].state_dict().values(), models[name].state_dict().values()))
    embedder = trained["transformer"].time_text_embed.guidance_embedder.linear_2.weight
    assert embedder.abs().sum() > 0  # it learned something of the scale
    runs_both_recipes(student_dir)


def test_caption_dropout_empties_that_share_of_captions_and_none_without_it(tmp_path, monkeypatch):
    seen: list[str] = []
    family = train_toy_dit.FAMILIES["flux"]
    real = type(family).encode

    def keep(self, models, tokenizers, captions):
        seen.extend(captions)
        return real(self, models, tokenizers, captions)

    monkeypatch.setattr(type(family), "encode", keep)
    arguments = ["--vae", str(TOY_VAE), *DIT_ARGUMENTS, "--batch", "8", "--checkpoint-every", "0"]
    train_toy_dit.main(["--out", str(tmp_path / "plain"), *arguments])
    assert len(seen) == 32 and "" not in seen
    seen.clear()
    train_toy_dit.main(["--out", str(tmp_path / "dropped"), *arguments, "--caption-dropout", "0.5"])
    assert len(seen) == 32 and 6 <= seen.count("") <= 26


def test_dev_student_interrupted_and_rerun_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    train_toy_dit.main(["--vae", str(TOY_VAE), "--out", str(teacher), *DIT_ARGUMENTS, "--caption-dropout", "0.5"])
    arguments = [*DIT_ARGUMENTS, "--guidance-teacher", str(teacher), "--word-attention", "0.2", "--lr", "0.5"]
    train_toy_dit.main(["--out", str(tmp_path / "whole"), *arguments])
    out = tmp_path / "cut"
    train_cut_and_rerun(train_toy_dit, ["--out", str(out), *arguments], 3, monkeypatch, name="draw_scenes")
    assert_same_weights(tmp_path / "whole", out)
