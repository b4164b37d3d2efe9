"""A folder of the user's images as the source: its plan, its errors, its hash, its resume."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from maskmint import launch
from maskmint.pipeline.dataset import read_samples
from tests.conftest import BASE_CONFIG
from tests.test_annotate import save, scene

# (relative path, rows, cols): a square twice the model's size, a wide one the crop cuts, one
# at the model's size, and a zero-byte file that is dropped
SOURCES = [("dog/a.png", 64, 64), ("dog/b.png", 64, 96), ("zebra/c.png", 32, 32), ("zebra/d.png", 0, 0)]


def folder_config(model_dir: Path, images: Path, **changes) -> dict:
    data = copy.deepcopy(BASE_CONFIG)
    data["model"]["path"] = str(model_dir)
    data["input"] = {"images": str(images)}
    data["prompts"]["templates"] = ["a photo of a {concept} in a {place}", "a {concept} and a {concept2}"]
    data["output"] = {"shard_size": 2}
    data["annotate"] = {"steps": 4, "strength": 0.5}
    data["filter"] = {**data["filter"], "min_mask_fraction": 0.0}
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def write(data: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def make_images(root: Path) -> Path:
    for i, (name, rows, cols) in enumerate(SOURCES):
        if rows:
            save(root / name, scene(i, size=max(rows, cols))[:rows, :cols])
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"")
    return root


def annotated_folder_run(model_dir: Path, root: Path) -> tuple[Path, Path, Path]:
    """An annotate run over a folder source: (config path, run directory, images folder)."""
    images = make_images(root / "images")
    config = write(folder_config(model_dir, images), root / "run.yaml")
    out = root / "run"
    assert launch.main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return config, out, images


@pytest.fixture(scope="module")
def folder_run(tiny_model_dir, tmp_path_factory):
    return annotated_folder_run(tiny_model_dir, tmp_path_factory.mktemp("folder-run"))


def test_a_folder_plans_one_sample_per_image_its_class_its_folder(folder_run, capsys):
    config, out, images = folder_run
    assert launch.main(["plan", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 4  # output.samples defaults to one per image
    assert report["classes"] == {"dog": 2, "zebra": 2}
    words = [e["prompt"].split()[4] for e in report["examples"]]
    assert words == ["dog", "dog", "zebra", "zebra"]  # the templates caption each image by its folder
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]
    sources = {k: v for s in stats for k, v in s["sources"].items()}
    assert {k: Path(v).relative_to(images).as_posix() for k, v in sources.items()} == {
        f"{i:010d}": name for i, (name, _, _) in enumerate(SOURCES)}
    assert {k: v for s in stats for k, v in s["dropped"].items()} == {"0000000003": "unreadable_image"}
    classes = {k: v for s in stats for k, v in s["classes"].items()}
    assert classes == {"0000000000": [1], "0000000001": [1], "0000000002": [7], "0000000003": [7]}
    samples = {s.key: s for s in read_samples(out)}
    assert {k: s.metadata["source"]["size"] for k, s in samples.items()} == {
        "0000000000": [64, 64], "0000000001": [64, 96], "0000000002": [32, 32]}


def test_every_configured_class_of_every_image(tiny_model_dir, tmp_path, capsys):
    images = make_images(tmp_path / "images")
    save(images / "loose.png", scene(9))  # in the folder itself: fine when no folder names the class
    config = write(folder_config(tiny_model_dir, images, input={"classes": "all"}), tmp_path / "run.yaml")
    assert launch.main(["plan", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 5 and report["classes"] == {"dog": 5, "zebra": 5}
    assert report["examples"][0]["prompt"] == "a dog and a zebra"


@pytest.mark.parametrize("case, error", [
    ("loose", "error: input.images 'loose.png': lies in the folder itself; with input.classes: folder each image "
              "lies in a folder named by its class (or set input.classes: all)"),
    ("unknown", "error: input.images 'pets/cat/x.png': its folder 'cat' is not one of the run's classes (names or synonyms)"),
    ("empty", "error: input.images: '{images}' holds no jpg, png or webp image"),
    ("missing", "error: input.images: 'nowhere' is not a folder or .tar shards (relative paths are resolved against the config "
                "file's folder)"),
    ("both", "error: input.images: give the images by input.images or by prompts.file lines, not both"),
    ("too_many", "error: input.classes: all asks every class of every image, at most 3 (4 configured); use folder"),
    ("no_template", "error: prompts.templates: no template names 2 concept(s) to caption the images of input.images "
                    "({concept} .. {concept2})"),
])
def test_a_bad_folder_source_is_one_line(tiny_model_dir, tmp_path, capsys, case, error):
    images = tmp_path / "images"
    images.mkdir()
    data = folder_config(tiny_model_dir, images)
    if case == "loose":
        save(images / "loose.png", scene(0))
    elif case == "unknown":
        save(images / "pets" / "cat" / "x.png", scene(0))  # the class is the parent folder's name
    elif case == "missing":
        data["input"]["images"] = "nowhere"
    elif case == "both":
        (tmp_path / "lines.jsonl").write_text('{"prompt": "a dog", "concepts": ["dog"]}\n')
        data["prompts"]["file"] = str(tmp_path / "lines.jsonl")
    elif case == "too_many":
        data["input"]["classes"] = "all"
        data["prompts"]["concepts"] += [{"name": "cat", "class_id": 2}, {"name": "cow", "class_id": 3}]
    elif case == "no_template":
        data["input"]["classes"] = "all"
        data["prompts"]["templates"] = ["a photo of a {concept}"]
    config = write(data, tmp_path / "run.yaml")
    for command in (["plan", "--config", str(config)], ["run", "--config", str(config), "--out", str(tmp_path / "o")]):
        assert launch.main(command) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == error.replace("{images}", str(images))
    assert not (tmp_path / "o").exists()


def test_a_changed_folder_is_a_different_config(tiny_model_dir, tmp_path, capsys):
    images = make_images(tmp_path / "images")
    config = write(folder_config(tiny_model_dir, images, output={"samples": 4}), tmp_path / "run.yaml")
    from maskmint.schemas.config import load_config

    before = load_config(config).config_hash()
    save(images / "dog" / "e.png", scene(7))
    assert load_config(config).config_hash() != before  # a new image
    (images / "dog" / "e.png").unlink()
    assert load_config(config).config_hash() == before
    edited = images / "dog" / "a.png"
    stat = edited.stat()
    edited.write_bytes(edited.read_bytes() + b"\0")  # the same name, other bytes
    assert load_config(config).config_hash() != before
    edited.write_bytes(edited.read_bytes()[:-1])
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the same size, touched
    assert load_config(config).config_hash() != before
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_config(config).config_hash() == before
    moved = images.rename(tmp_path / "elsewhere")
    data = folder_config(tiny_model_dir, moved, output={"samples": 4})
    assert load_config(write(data, tmp_path / "moved.yaml")).config_hash() == before  # where it lies is not what it is


def test_a_killed_folder_run_resumes_exactly(folder_run, tmp_path, monkeypatch):
    """Shard 1 fails every try; the rerun makes it alone, and the tars equal an uninterrupted run's."""
    from bench.chaos import audit
    from maskmint.pipeline.testing.faults import FAULT_ENV
    from tests.conftest import tar_fields

    config, whole, _ = folder_run
    out = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "1")
    assert launch.main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 1
    monkeypatch.delenv(FAULT_ENV)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.tar")}
    assert sorted(kept) == ["000000.tar"]
    assert launch.main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    assert audit(out) == []
    assert (out / "shards" / "000000.tar").stat().st_mtime_ns == kept["000000.tar"]
    assert tar_fields(out) == tar_fields(whole)  # nothing lost, nothing twice, the same bytes
