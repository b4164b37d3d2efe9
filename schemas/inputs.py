"""Real images in: where they come from (input), how attention is read from them (annotate),
and what a folder of them is (its files, sizes and modification times) for the config hash."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from maskmint.schemas.base import RELATIVE_PATHS, Section, require_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class InputConfig(Section):
    images: str | None = Field(
        default=None,
        description="a folder: every jpg, png and webp under it (recursive, sorted by path) is annotated, "
        "sample i the i-th image",
    )
    classes: Literal["folder", "all"] = Field(
        default="folder",
        description="folder: an image's class is its parent folder's name (ImageFolder: DIR/dog/1.jpg); "
        "all: every configured class is asked of every image",
    )

    @field_validator("images")
    @classmethod
    def _folder(cls, value: str | None, info: ValidationInfo) -> str | None:
        return require_path(value, info, Path.is_dir, f"a folder ({RELATIVE_PATHS})")


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
    fit: Literal["crop", "pad", "stretch"] = Field(
        default="crop", description="to the model's size: crop (cover, centred), pad (fit, black borders) or stretch"
    )
    min_side: int = Field(default=16, ge=1, description="images with a shorter side are dropped (image_too_small)")
    store_size: Literal["model", "source"] = Field(
        default="model",
        description="model: image, mask, background and maps stored as fitted to the model's size; source: at "
        "the source image's own size (the mask by nearest neighbour, 255 where a crop cut away)",
    )


def list_images(root: str) -> list[str]:
    """The path (relative to root, posix) of every image under root, sorted; the directory
    scan alone, no file opened or stat'ed."""
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
    """What the folder's images are: each one's relative path, size and modification time."""
    digest = hashlib.sha256()
    for name in list_images(root):
        stat = os.stat(os.path.join(root, name))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
