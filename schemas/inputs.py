"""Real images in: where they come from (input), how attention is read from them (annotate),
and what a folder or a set of WebDataset shards of them is (its files, sizes and modification
times) for the config hash."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Literal, NamedTuple

from braceexpand import braceexpand
from pydantic import Field, ValidationInfo, field_validator

from maskmint.schemas.base import RELATIVE_PATHS, Section, require_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
SHARD_MEMBER = "::"  # an image inside a WebDataset shard: SHARD.tar::member
LABEL_EXTENSION = "cls"  # WebDataset's class-label field: a class name, synonym or class_id as text


class InputConfig(Section):
    images: str | None = Field(
        default=None,
        description="a folder: every jpg, png and webp under it (recursive, sorted by path) is annotated, "
        "sample i the i-th image; or WebDataset shards: a .tar file or a brace pattern of them "
        "(shards/train-{000..009}.tar), each sample's first jpg, png or webp in shard order",
    )
    classes: Literal["folder", "all", "label"] = Field(
        default="folder",
        description="folder: an image's class is its parent folder's name (ImageFolder: DIR/dog/1.jpg; in a "
        "shard, the member's folder); all: every configured class is asked of every image; label: a shard "
        "sample's .cls field names it (a class name, synonym or class_id)",
    )

    @field_validator("images")
    @classmethod
    def _source(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not is_shards(value):
            return require_path(value, info, Path.is_dir, f"a folder or .tar shards ({RELATIVE_PATHS})")
        base = Path((info.context or {}).get("base_dir", "."))
        expanded = Path(value).expanduser()
        roots = [Path()] if expanded.is_absolute() else [base, Path.cwd()]  # find_path's, for every shard at once
        for root in roots:
            if all((root / Path(name).expanduser()).is_file() for name in braceexpand(value)):
                return os.path.abspath(root / expanded)
        missing = next(n for n in braceexpand(value) if not any((r / Path(n).expanduser()).is_file() for r in roots))
        raise ValueError(f"'{value}': shard '{missing}' is not a file ({RELATIVE_PATHS})")


class AnnotateConfig(Section):
    """How attention is read from a real image: its clean latent noised and denoised with its
    caption. Unset values take the family's defaults (see the README's annotate section)."""

    steps: int | None = Field(default=None, ge=1, le=1000, description="the noise schedule's steps")
    strength: float | None = Field(
        default=None, gt=0.0, le=1.0, description="the last steps x strength steps of the schedule are run from the image"
    )
    guidance_scale: float = Field(default=1.0, ge=0.0, description="1: the caption alone, no unconditional batch")
    fresh_noise: bool = Field(
        default=True, description="each step starts from the clean latent noised afresh to its level, not from the last step"
    )
    steps_per_call: int = Field(
        default=2, ge=1, le=1000,
        description="with fresh_noise the levels are independent: this many share one denoiser call, the batch "
        "stacked once per level (fewer, larger calls; activation memory grows with it; 2 is the rows of a "
        "guided generation call)",
    )
    fit: Literal["crop", "pad", "stretch"] = Field(
        default="crop", description="to the model's size: crop (cover, centred), pad (fit, black borders) or stretch"
    )
    min_side: int = Field(default=16, ge=1, description="images with a shorter side are dropped (image_too_small)")
    store_size: Literal["model", "source"] = Field(
        default="model",
        description="model: image, mask, background and maps stored as fitted to the model's size; source: at "
        "the source image's own size (the mask by nearest neighbour, 255 where a crop cut away)",
    )


def is_shards(source: str) -> bool:
    """input.images names WebDataset shards (a .tar, or a brace pattern of them), not a folder."""
    return all(name.endswith(".tar") for name in braceexpand(source))


class ShardSample(NamedTuple):
    image: str  # the member's name
    offset: int
    size: int
    label: str | None  # the sample's .cls field, when it has one


KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's grouping: key up to the first dot


def shard_samples(path: str) -> list[ShardSample]:
    """A shard's samples in order: headers read once per change of the file, then cached."""
    return _shard_samples(path, *_stamp(path))


def _stamp(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _members(path: str, size: int, mtime_ns: int) -> dict[str, ShardSample]:
    """A shard's samples by image member name: each read finds its member in constant time."""
    return {sample.image: sample for sample in _shard_samples(path, size, mtime_ns)}


@functools.lru_cache(maxsize=64)
def _shard_samples(path: str, _size: int, _mtime_ns: int) -> list[ShardSample]:
    samples, key, image, label = [], None, None, None
    with tarfile.open(path, "r:") as tar:
        for member in [*tar, None]:
            match = KEY_AND_EXTENSION.match(member.name) if member is not None and member.isfile() else None
            if member is not None and match is None:
                continue
            if member is None or match.group(1) != key:
                if image is not None:
                    samples.append(ShardSample(image.name, image.offset_data, image.size, label))
                if member is None:
                    break
                key, image, label = match.group(1), None, None
            extension = match.group(2).lower()
            if image is None and "." + extension in IMAGE_SUFFIXES:
                image = member
            elif extension == LABEL_EXTENSION and member.size <= 256:
                label = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
    return samples


def read_source_bytes(address: str) -> bytes:
    """An image file's bytes, or a shard member's (SHARD.tar::member); OSError when gone."""
    shard, separator, member = address.partition(SHARD_MEMBER)
    if not separator:
        with open(address, "rb") as handle:
            return handle.read()
    found = _members(shard, *_stamp(shard)).get(member)
    if found is None:
        raise OSError(f"{member} is not in {shard}")
    with open(shard, "rb") as handle:
        handle.seek(found.offset)
        return handle.read(found.size)


def list_images(root: str) -> list[str]:
    """Every image of a source, sorted: under a folder its path relative to root (posix), from
    the directory scan alone; in shards SHARD.tar::member, in shard order."""
    if is_shards(root):
        return [f"{shard}{SHARD_MEMBER}{sample.image}" for shard in braceexpand(root) for sample in shard_samples(shard)]
    found = []
    stack = [""]
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(root, relative)) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                if entry.is_dir():
                    stack.append(name)
                elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(name)
    found.sort()
    return found


def folder_signature(root: str) -> str:
    """What the folder's images are: each one's relative path, size and modification time
    (for shards, each shard's)."""
    digest = hashlib.sha256()
    if is_shards(root):
        for shard in braceexpand(root):
            stat = os.stat(shard)
            digest.update(f"{os.path.basename(shard)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]
    for name in list_images(root):
        stat = os.stat(os.path.join(root, name))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
