"""model.quantize: int8 weights for the denoiser and T5 on the tiny MM-DiTs; plan's weight memory."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from maskmint import launch
from maskmint.pipeline.cost import device_weight_memory, weight_memory
from maskmint.schemas.config import CaptureConfig, GenerationConfig, RunConfig
from maskmint.stages.families import resolve_family
from maskmint.stages.generate import Generate
from maskmint.stages.tokens import token_slots
from tests.conftest import save_tiny_models
from tests.test_concept_attention import _two_object_batch

pytest.importorskip("optimum.quanto")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_models(tmp_path_factory, ("sd3", "flux"), seed=2)


def _config(folder, quantize: str) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"path": str(folder), "dtype": "float32", "quantize": None if quantize == "none" else quantize},
        "prompts": {"concepts": [{"name": "dog", "class_id": 1}], "templates": ["a {concept}"]},
    })


def _in_memory_gb(module) -> float:
    """Bytes of a loaded module's state, each storage once (quanto's int8 data and scales included)."""
    seen = {(t.data_ptr(), t.dtype, tuple(t.shape)): t.numel() * t.element_size() for t in module.state_dict().values()}
    return sum(seen.values()) / 1e9


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_weight_memory_is_what_the_loaded_components_hold(folders, name):
    for quantize in ("none", "int8"):
        config = _config(folders[name], quantize)
        family = resolve_family(config.model)
        pipe = family.load(config.model, torch.device("cpu"), torch.float32)
        estimate = weight_memory(config)[quantize]
        for component in family.quantized_components():
            assert estimate[component] == pytest.approx(_in_memory_gb(getattr(pipe, component)), rel=1e-3)
        if quantize == "int8":
            plain = weight_memory(config)["none"]
            assert estimate[family.denoiser_component] < 0.6 * plain[family.denoiser_component]
            assert type(family.denoiser(pipe).transformer_blocks[0].attn.to_q).__name__ == "QLinear"


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_device_memory_under_offload_is_the_largest_network_or_layer_loaded(folders, name):
    config = _config(folders[name], "none")
    family = resolve_family(config.model)
    pipe = family.load(config.model, torch.device("cpu"), torch.float32)
    held = device_weight_memory(config)
    networks = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
    assert held["none"]["none"] == pytest.approx(sum(_in_memory_gb(m) for m in networks), rel=1e-3)
    assert held["none"]["model"] == pytest.approx(max(_in_memory_gb(m) for m in networks), rel=1e-3)
    layers = [sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
              for network in networks for module in network.modules()]
    assert held["none"]["sequential"] == pytest.approx(max(layers) / 1e9, rel=1e-3)
    assert held["int8"]["model"] <= held["none"]["model"] and held["int8"]["none"] < held["none"]["none"]


@pytest.mark.parametrize("recipe", ["cross", "concept_attention"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_int8_maps_stay_close_to_the_full_precision_ones(folders, name, recipe):
    maps = {}
    for quantize in ("none", "int8"):
        config = _config(folders[name], quantize)
        pipe = resolve_family(config.model).load(config.model, torch.device("cpu"), torch.float32)
        batch, _ = _two_object_batch(pipe)
        generate = Generate(pipe, GenerationConfig(steps=3, guidance_scale=5.0), CaptureConfig(recipe=recipe))
        generate(batch)
        maps[quantize] = generate.store.heatmaps(token_slots(batch["concepts"])[1]).numpy()
    r = np.corrcoef(maps["none"][:, 0].ravel(), maps["int8"][:, 0].ravel())[0, 1]
    print(f"int8 map correlation {name} {recipe}: {r:.4f}")
    assert r > 0.95, r
    assert not np.array_equal(maps["none"], maps["int8"])  # it did quantize


def test_a_quantized_run_and_its_plan(folders, config_dict, write_config, tmp_path, capsys):
    data = copy.deepcopy(config_dict)
    data["model"] = {"path": str(folders["flux"]), "quantize": "int8"}
    data["output"] = {"samples": 2, "shard_size": 2}
    path = write_config(data)
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(path), "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["cost"]["weight_gb"]
    assert weights["int8"]["total"] < weights["none"]["total"]
    assert launch.main(["run", "--config", str(path), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["whole"]


def test_quantize_without_its_backend_is_one_line(config_dict, write_config, capsys, monkeypatch):
    import importlib.util

    data = copy.deepcopy(config_dict)
    data["model"]["quantize"] = "int8"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optimum.quanto" else real(name, *a))
    capsys.readouterr()
    assert launch.main(["plan", "--config", str(write_config(data))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimum-quanto" in err[0] and "maskmint[quantize]" in err[0], err
