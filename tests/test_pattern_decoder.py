"""The toy VAE taught the unseen background patterns, which distillation's benchmark decodes with."""

from __future__ import annotations

from pathlib import Path

from bench import train_toy_model
from bench.toyworld import render_scene

REPO = Path(__file__).resolve().parents[1]


def test_decoder_stage_draws_the_background_kinds_it_is_given(tmp_path, monkeypatch):
    drawn = []

    def recording(rng, n_objects=None, size=64, kinds=()):
        drawn.append(tuple(kinds))
        return render_scene(rng, n_objects, size, kinds)

    monkeypatch.setattr(train_toy_model, "render_scene", recording)
    train_toy_model.main(["--resume", str(REPO / "assets" / "tiny-sd"), "--out", str(tmp_path / "toy"),
                          "--vae-steps", "0", "--unet-steps", "0", "--decoder-steps", "1", "--decoder-batch", "2",
                          "--decoder-kinds", "coarse dots", "checkerboard"])
    assert drawn and set(drawn) == {("coarse dots", "checkerboard")}


def test_pattern_decoder_keeps_the_latent_space_and_draws_the_unseen_patterns_back(tmp_path):
    """assets/tiny-sd-pattern-decoder: the shipped toy VAE with its decoder taught checkerboards
    and dot grids, so distillation's figures measure removal rather than the toy VAE's tint."""
    import torch

    from bench import distill_toy
    from bench.toyworld import BACKGROUND_KINDS, COARSE_UNSEEN_KINDS

    decoder = REPO / "assets" / "tiny-sd-pattern-decoder"
    shipped, taught = distill_toy.toy_vae(), distill_toy.toy_vae(distill_toy.with_vae(tmp_path, decoder))
    for part in ("encoder", "quant_conv"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(shipped, part).state_dict().values(),
                                                     getattr(taught, part).state_dict().values()))
    assert not torch.equal(shipped.decoder.conv_out.weight, taught.decoder.conv_out.weight)
    assert (tmp_path / "model" / "unet").resolve() == (REPO / "assets" / "tiny-sd" / "unet").resolve()
    distill_toy.with_vae(tmp_path, REPO / "assets" / "tiny-sd")  # asked again with another VAE: it follows
    assert (tmp_path / "model" / "vae").resolve() == (REPO / "assets" / "tiny-sd" / "vae").resolve()
    distill_toy.with_vae(tmp_path, decoder)

    unseen = distill_toy.write_split(tmp_path / "unseen", 8, distill_toy.HELD_OUT_SEED, tuple(COARSE_UNSEEN_KINDS)).parent
    before, after = distill_toy.vae_round_trip(unseen, shipped), distill_toy.vae_round_trip(unseen, taught)
    assert after["background_error_in_objects"] < 0.6 * before["background_error_in_objects"]
    assert before["object_colour_left"] > 0.01 and after["object_colour_left"] == 0.0
    seen = distill_toy.write_split(tmp_path / "shipped", 8, distill_toy.HELD_OUT_SEED, BACKGROUND_KINDS).parent
    assert distill_toy.vae_round_trip(seen, taught)["background_error_in_objects"] < \
        distill_toy.vae_round_trip(seen, shipped)["background_error_in_objects"] + 1.5


def test_distill_benchmark_refuses_a_vae_folder_without_a_vae_in_one_line(tmp_path, capsys):
    import pytest

    from bench import distill_toy

    with pytest.raises(SystemExit) as exit_:
        distill_toy.main(["--out", str(tmp_path / "out"), "--vae", str(tmp_path)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--vae" in error and "no vae/ folder" in error and not (tmp_path / "out").exists()
