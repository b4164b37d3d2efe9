"""The registry of model families: each is one module here implementing `base.Family`.

A new family is one module, one line in `FAMILIES`, its tiny builder
(`pipeline/testing/tiny_models.py`) and the shared contract tests (tests/test_family_contract.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from maskmint.schemas.config import ModelConfig
from maskmint.stages.families.base import Family, UnsupportedModel
from maskmint.stages.families.flux import Flux
from maskmint.stages.families.sd3 import StableDiffusion3
from maskmint.stages.families.unet import StableDiffusion, StableDiffusionXL

SD, SDXL, SD3, FLUX = StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux()
FAMILIES: dict[str, Family] = {family.name: family for family in (SD, SDXL, SD3, FLUX)}
DEFAULT = SD  # what a checkpoint that does not say its pipeline class is taken for

# Pipelines people ask for that maskmint does not run yet: a clear refusal, not a traceback.
NOT_YET = {
    "FluxFillPipeline": "flux-fill",
    "PixArtAlphaPipeline": "pixart",
    "HunyuanDiTPipeline": "hunyuan-dit",
}

__all__ = ["FAMILIES", "FLUX", "SD", "SD3", "SDXL", "Family", "UnsupportedModel", "family_of_pipeline",
           "offering", "resolve_family"]


def offering(has: Callable[[Family], bool]) -> str:
    """The names of the families that offer something, for a refusal that says where to go."""
    return ", ".join(f.name for f in FAMILIES.values() if has(f))


def family_of_pipeline(pipe) -> Family:
    """The family of an already loaded pipeline (benchmarks hand one in)."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    raise UnsupportedModel(f"a {name} is not a pipeline maskmint runs")


def _pipeline_class(source: str) -> str | None:
    index = Path(source) / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text()).get("_class_name")
    if Path(source).exists():
        return None
    try:  # a hub id: its model_index.json only (small; from the cache when offline)
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(source).get("_class_name")
    except Exception:  # noqa: BLE001 - not reachable or not a pipeline: the loader will say why
        return None


def _single_file_family(path: str) -> Family | None:
    if not path.endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        names = list(handle.keys())
    return next((f for f in FAMILIES.values() if any(n.startswith(f.single_file_marker) for n in names)), None)


def resolve_family(config: ModelConfig) -> Family:
    """The configured family, or the one the checkpoint says (`model.family: auto`)."""
    if config.family != "auto":
        return FAMILIES[config.family]
    single_file = Path(config.path).is_file()
    source = config.single_file_config if single_file else config.path
    class_name = _pipeline_class(source) if source else None
    if class_name is None and single_file:
        family = _single_file_family(config.path)
        if family is not None:
            return family
    if class_name is None:
        return DEFAULT  # the loader reports a checkpoint that is not one
    for family in FAMILIES.values():
        if class_name in family.pipeline_classes:
            return family
    hint = f" (family {NOT_YET[class_name]})" if class_name in NOT_YET else ""
    raise UnsupportedModel(
        f"model.path: a {class_name}{hint} is not a pipeline maskmint runs; "
        f"it runs {', '.join(f.pipeline_classes[0] for f in FAMILIES.values())} (model.family: {', '.join(FAMILIES)})"
    )
