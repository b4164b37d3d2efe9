"""model.offload: diffusers' CPU-offload hooks on every pipeline a run builds. The hooks only
move weights, so a run's shard members are byte-identical to the plain run's. Under sequential offload
`pipe.device` names where the weights wait (the CPU), not where they compute: the tests make it
say "meta", so that work placed by it instead of by the execution device fails here as it
would on a GPU machine. Sequential offload is refused on the CPU: accelerate's layer hooks
break on CPU-to-CPU moves."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from maskmint import launch
from maskmint.schemas.config import RunConfig
from maskmint.stages.families import resolve_family
from tests.conftest import TEST_IMAGE_SIZE, save_tiny_models, tar_fields

pytest.importorskip("accelerate")

FAMILIES = ["sd", "sdxl", "sd3", "flux"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, FAMILIES, seed=4)


def _run(data: dict, write_config, out: Path, offload_mode: str) -> dict:
    data = copy.deepcopy(data)
    data["model"]["offload"] = offload_mode
    assert launch.main(["run", "--config", str(write_config(data, f"{offload_mode}.yaml")), "--out", str(out),
                        "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["whole"], summary
    return tar_fields(out)


def _data(config_dict: dict, folder: Path) -> dict:
    data = copy.deepcopy(config_dict)
    data["model"] = {"path": str(folder), "device": "cpu", "dtype": "float32"}
    data["output"] = {"samples": 2, "shard_size": 2}
    data["generation"] = {**data.get("generation", {}), "steps": 3, "batch_size": 2}
    return data


@pytest.fixture
def device_names_the_cpu_weights(monkeypatch):
    """As on a GPU machine under offload: `pipe.device` is where the weights wait, here "meta",
    which no work can run on; the hooks still compute on the CPU. Gives the classes of the
    pipelines offloaded."""
    from diffusers import DiffusionPipeline

    real = DiffusionPipeline.device

    def device(pipe):
        return torch.device("meta") if getattr(pipe, "_all_hooks", None) else real.fget(pipe)

    monkeypatch.setattr(DiffusionPipeline, "device", property(device))
    offloaded = []
    enable = DiffusionPipeline.enable_model_cpu_offload

    def spy(pipe, *args, **kwargs):
        offloaded.append(type(pipe).__name__)
        return enable(pipe, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "enable_model_cpu_offload", spy)
    return offloaded


@pytest.mark.parametrize("name,recipe", [(name, "cross") for name in FAMILIES] + [("flux", "concept_attention")])
def test_an_offloaded_run_writes_the_plain_runs_bytes(folders, name, recipe, config_dict, write_config, tmp_path,
                                                       device_names_the_cpu_weights):
    data = _data(config_dict, folders[name])
    data["capture"] = {"recipe": recipe}
    plain = _run(data, write_config, tmp_path / "none", "none")
    assert plain
    assert _run(data, write_config, tmp_path / "model", "model") == plain
    family = resolve_family(RunConfig.model_validate(data).model)
    assert {family.text_to_image, family.inpainting} <= set(device_names_the_cpu_weights)


def test_an_offloaded_annotate_run_writes_the_plain_runs_bytes(folders, config_dict, write_config, tmp_path,
                                                               device_names_the_cpu_weights):
    """The image-to-image pipeline annotate builds on the offloaded networks is offloaded too."""
    images = tmp_path / "images" / "dog"
    images.mkdir(parents=True)
    for i in range(2):
        pixels = torch.full((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), 90, dtype=torch.uint8)
        pixels[8:24, 6 + 4 * i:22 + 4 * i] = torch.tensor([200, 40, 40], dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"{i}.png")
    for name in ("sd", "flux"):
        data = _data(config_dict, folders[name])
        data["input"] = {"images": str(tmp_path / "images"), "classes": "folder"}
        data["output"] = {"shard_size": 2}
        plain = _run(data, write_config, tmp_path / name / "none", "none")
        assert _run(data, write_config, tmp_path / name / "model", "model") == plain
        assert resolve_family(RunConfig.model_validate(data).model).image_to_image in device_names_the_cpu_weights


def test_offload_keeps_the_config_hash(folders, config_dict):
    data = _data(config_dict, folders["sd"])
    hashes = set()
    for mode in ("none", "model", "sequential"):
        data["model"]["offload"] = mode
        hashes.add(RunConfig.model_validate(data).config_hash())
    assert len(hashes) == 1


def test_sequential_offload_on_the_cpu_is_one_line(folders, config_dict, write_config, tmp_path, capsys):
    data = _data(config_dict, folders["sd"])
    data["model"]["offload"] = "sequential"
    capsys.readouterr()
    assert launch.main(["run", "--config", str(write_config(data)), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.offload: sequential" in err[0], err


def test_offload_of_int8_weights_writes_the_int8_runs_bytes(folders, config_dict, write_config, tmp_path,
                                                            device_names_the_cpu_weights):
    pytest.importorskip("optimum.quanto")
    data = _data(config_dict, folders["flux"])
    data["model"]["quantize"] = "int8"
    plain = _run(data, write_config, tmp_path / "none", "none")
    assert _run(data, write_config, tmp_path / "model", "model") == plain


def test_compile_with_offload_is_one_line(config_dict, write_config, capsys):
    data = copy.deepcopy(config_dict)
    data["model"]["offload"] = "model"
    data["generation"]["compile"] = True
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(write_config(data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "generation.compile" in err[0] and "model.offload" in err[0], err
