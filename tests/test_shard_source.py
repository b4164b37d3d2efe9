"""WebDataset shards of the user's images as the source: read in place, labelled by .cls or
by folder, and giving the same samples as the same images in a folder."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from maskmint import launch
from maskmint.schemas.config import load_config
from tests.conftest import tar_fields
from tests.test_folder_source import SOURCES, annotated_folder_run, folder_config, make_images, write

# each folder image's .cls label: a class name, a class_id, or none
LABELS = {"dog/a.png": "dog", "dog/b.png": "1", "zebra/c.png": "zebra", "zebra/d.png": "ZEBRA"}


def write_shards(images: Path, out: Path, labels: dict[str, str | None] = LABELS, keep_folders: bool = False) -> str:
    """SOURCES packed two per shard by webdataset's own writer; the brace pattern naming them."""
    out.mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        with wds.TarWriter(str(out / f"part-{shard:06d}.tar")) as sink:
            for name, _, _ in SOURCES[2 * shard: 2 * shard + 2]:
                key = name.removesuffix(".png") if keep_folders else Path(name).stem
                sample = {"__key__": key, "png": (images / name).read_bytes(), "txt": b"ignored"}
                if labels.get(name) is not None:
                    sample["cls"] = labels[name].encode()
                sink.write(sample)
    return str(out / "part-{000000..000001}.tar")


@pytest.fixture(scope="module")
def folder_and_shard_runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard-run")
    _, folder_out, images = annotated_folder_run(tiny_model_dir, root / "folder")
    pattern = write_shards(images, root / "shards")
    config = write(folder_config(tiny_model_dir, "shards/part-{000000..000001}.tar", input={"classes": "label"}),
                   root / "run.yaml")  # relative to the config's folder
    out = root / "run"
    assert launch.main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    return folder_out, out, pattern, config


def without_source_path(fields: dict[str, bytes]) -> dict:
    metadata = json.loads(fields["json"])
    metadata["source"].pop("path")
    return {**{k: v for k, v in fields.items() if k != "json"}, "json": metadata}


def test_shards_give_the_folder_runs_samples_read_in_place(folder_and_shard_runs):
    folder_out, out, pattern, _ = folder_and_shard_runs
    shards = sorted(Path(pattern).parent.glob("*.tar"))
    from_shards, from_folder = tar_fields(out), tar_fields(folder_out)
    assert sorted(from_shards) == sorted(from_folder) == [f"{i:010d}" for i in range(3)]
    for key in from_folder:  # the same pixels, masks, maps and digests; only where the file was differs
        assert without_source_path(from_shards[key]) == without_source_path(from_folder[key]), key
    stats = [json.loads(p.read_text()) for p in sorted((out / "shards").glob("*.json"))]
    sources = {k: v for s in stats for k, v in s["sources"].items()}
    assert sources == {f"{i:010d}": f"{shards[i // 2]}::{Path(name).stem}.png" for i, (name, _, _) in enumerate(SOURCES)}
    assert {k: v for s in stats for k, v in s["dropped"].items()} == {"0000000003": "unreadable_image"}
    classes = {k: v for s in stats for k, v in s["classes"].items()}
    assert classes == {"0000000000": [1], "0000000001": [1], "0000000002": [7], "0000000003": [7]}
    recorded = json.loads(from_shards["0000000001"]["json"])["source"]["path"]
    assert recorded == f"{shards[0]}::b.png"


def test_shard_images_are_stored_at_their_own_size(folder_and_shard_runs, tiny_model_dir, tmp_path):
    _, _, pattern, _ = folder_and_shard_runs
    out = tmp_path / "source-size"
    data = folder_config(tiny_model_dir, pattern, input={"classes": "label"}, annotate={"store_size": "source"})
    config = write(data, tmp_path / "run.yaml")
    assert launch.main(["run", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    stored = tar_fields(out)
    images = Path(pattern).parents[1] / "folder" / "images"
    for key, name in (("0000000000", "dog/a.png"), ("0000000001", "dog/b.png")):
        image = np.array(Image.open(io.BytesIO(stored[key]["jpg"] if "jpg" in stored[key] else stored[key]["png"])))
        source = np.array(Image.open(images / name).convert("RGB"))
        assert image.shape == source.shape
        assert np.abs(image.astype(int) - source).mean() < 3  # the source itself (through the run's jpg)
        assert np.array(Image.open(io.BytesIO(stored[key]["mask.png"]))).shape == source.shape[:2]


def test_a_tar_of_folders_takes_each_members_folder_as_its_class(tiny_model_dir, tmp_path, capsys):
    images = make_images(tmp_path / "images")
    pattern = write_shards(images, tmp_path / "shards", labels={}, keep_folders=True)
    config = write(folder_config(tiny_model_dir, pattern), tmp_path / "run.yaml")
    assert launch.main(["plan", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 4 and report["classes"] == {"dog": 2, "zebra": 2}
    assert [e["prompt"].split()[4] for e in report["examples"]] == ["dog", "dog", "zebra", "zebra"]


def test_a_changed_shard_is_a_different_config(tiny_model_dir, tmp_path):
    pattern = write_shards(make_images(tmp_path / "images"), tmp_path / "shards")
    config = write(folder_config(tiny_model_dir, pattern, input={"classes": "label"}), tmp_path / "run.yaml")
    before = load_config(config).config_hash()
    shard = tmp_path / "shards" / "part-000001.tar"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_config(config).config_hash() != before
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert load_config(config).config_hash() == before


@pytest.mark.parametrize("case, error", [
    ("missing", "error: input.images: '{shards}/part-{{000000..000002}}.tar': shard '{shards}/part-000002.tar' is "
                "not a file (relative paths are resolved against the config file's folder)"),
    ("unlabelled", "error: input.images '{shards}/part-000000.tar::b.png': has no .cls field to name its class "
                   "(or set input.classes: all)"),
    ("unknown", "error: input.images '{shards}/part-000001.tar::c.png': its label 'cat' is not one of the run's "
                "classes (names, synonyms or ids)"),
    ("folder", "error: input.classes: label reads a shard sample's .cls field; a folder's images take folder or all"),
])
def test_a_bad_shard_source_is_one_line(tiny_model_dir, tmp_path, capsys, case, error):
    images = make_images(tmp_path / "images")
    labels = {**LABELS, "dog/b.png": None} if case == "unlabelled" else {**LABELS, "zebra/c.png": "cat"}
    pattern = write_shards(images, tmp_path / "shards", labels=labels)
    source = {"missing": pattern.replace("000001}", "000002}"), "folder": str(images)}.get(case, pattern)
    config = write(folder_config(tiny_model_dir, source, input={"classes": "label"}), tmp_path / "run.yaml")
    for command in (["plan", "--config", str(config)], ["run", "--config", str(config), "--out", str(tmp_path / "o")]):
        assert launch.main(command) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == error.format(shards=tmp_path / "shards")
    assert not (tmp_path / "o").exists()
