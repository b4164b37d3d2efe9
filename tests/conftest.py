"""Tiny models built in-process and config helpers; nothing here touches the network."""

from __future__ import annotations

import copy
import os
import tarfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from maskmint.pipeline.testing.tiny_models import build_tiny_pipeline  # noqa: E402

TEST_IMAGE_SIZE = 32

BASE_CONFIG = {
    "name": "test",
    "model": {"path": None},
    "prompts": {
        "concepts": [
            {"name": "dog", "class_id": 1},
            {"name": "zebra", "class_id": 7},  # not in the tiny vocabulary: several tokens
        ],
        "templates": ["a photo of a {concept} in a {place}"],
        "fillers": {"place": ["park", "kitchen"]},
    },
    "generation": {"steps": 3, "guidance_scale": 5.0, "batch_size": 3},
    "removal": {"steps": 3},
    "filter": {"max_mask_fraction": 1.0, "max_components": 1000, "min_removal_delta": 0.0, "min_image_std": 0.0},
    "output": {"samples": 10, "shard_size": 4},
    "execution": {"cpu_threads": 1, "executor": "local"},
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_tiny_pipeline(seed=0, image_size=TEST_IMAGE_SIZE).save_pretrained(folder)
    return folder


@pytest.fixture
def config_dict(tiny_model_dir) -> dict:
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(tiny_model_dir)
    return data


@pytest.fixture
def small(config_dict) -> dict:
    """Three shards of two samples: enough to fail one while the others are whole."""
    data = copy.deepcopy(config_dict)
    data["output"] = {"samples": 6, "shard_size": 2}
    return data


def tar_fields(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {field: the bytes stored in the run's tars}, read with tarfile alone; a key's
    field stored twice fails."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                fields = samples.setdefault(key, {})
                assert field not in fields, f"{member.name} twice"
                fields[field] = tar.extractfile(member).read()
    return samples


@pytest.fixture
def write_config(tmp_path):
    def write(data: dict, name: str = "run.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def save_tiny_models(tmp_path_factory, names, seed: int) -> dict[str, Path]:
    """Each family's tiny pipeline saved as a model folder, by family name."""
    from maskmint.pipeline.testing.tiny_models import BUILDERS

    folders = {}
    for name in names:
        folders[name] = tmp_path_factory.mktemp("models") / f"tiny-{name}"
        BUILDERS[name](seed=seed, image_size=TEST_IMAGE_SIZE).save_pretrained(folders[name])
    return folders
