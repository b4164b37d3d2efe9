"""The prompts section: classes, templates and fillers, or a JSONL of written prompts."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from maskmint.schemas.base import Section, format_error, resolve_input_file

CONCEPT_FIELD = "concept"
MAX_CONCEPTS = 3
# A template's concept slots: {concept}, {concept2}, {concept3}.
CONCEPT_SLOTS = [CONCEPT_FIELD] + [f"{CONCEPT_FIELD}{n}" for n in range(2, MAX_CONCEPTS + 1)]


class ConceptConfig(Section):
    name: str = Field(min_length=1)
    class_id: int = Field(ge=1, le=254)
    synonyms: list[str] = Field(default_factory=list)
    templates: list[str] = Field(
        default_factory=list,
        description="prompts for this concept only; each must contain {concept}, the concept name or a synonym",
    )

    @property
    def words(self) -> list[str]:
        return [self.name, *self.synonyms]


class Template(Section):
    prompt: str
    background: str | None = Field(
        default=None, description="prompt for the removed scene; default: the prompt without {concept}"
    )


def fields_of(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def concept_slots(text: str) -> int:
    """How many concepts a template names: {concept}, {concept2}, ... counted in order."""
    fields = fields_of(text)
    return next((n for n, slot in enumerate(CONCEPT_SLOTS) if slot not in fields), len(CONCEPT_SLOTS))


def filler_of(placeholder: str) -> str:
    """`{colour2}` draws from fillers['colour2'] if given, else from fillers['colour'] (a value
    other than the one `{colour}` got, while there are others)."""
    return placeholder.rstrip("0123456789") or placeholder


def read_concepts_file(path: str) -> list[ConceptConfig]:
    """One class name per line (ids 1, 2, ...), or `id,name[,synonym|synonym...]` on every line;
    blank lines and `#` comments are skipped."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append((number, [part.strip() for part in line.split(",")]))
    if not rows:
        raise ValueError(f"concepts_file: '{path}' lists no class")
    with_ids = [len(parts) > 1 for _, parts in rows]
    if any(with_ids) and not all(with_ids):
        number = rows[with_ids.index(not with_ids[0])][0]
        raise ValueError(f"concepts_file line {number}: mixes 'name' and 'id,name' lines; use one form throughout")
    concepts = []
    for position, (number, parts) in enumerate(rows, start=1):
        try:
            if len(parts) == 1:
                concepts.append(ConceptConfig(name=parts[0], class_id=position))
            else:
                synonyms = [w.strip() for w in parts[2].split("|") if w.strip()] if len(parts) > 2 else []
                if len(parts) > 3:
                    raise ValueError("expected id,name[,synonym|synonym...]")
                concepts.append(ConceptConfig(name=parts[1], class_id=int(parts[0]), synonyms=synonyms))
        except (ValueError, ValidationError) as error:
            detail = format_error(error) if isinstance(error, ValidationError) else str(error)
            raise ValueError(f"concepts_file line {number}: {detail}") from None
    return concepts


class LineConcept(Section):
    """One concept of a prompts.file line: the word as written in the prompt, and its class."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    word: str = Field(min_length=1)
    class_: str | int = Field(alias="class", description="class name or id")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"word": value, "class": value} if isinstance(value, str) else value


class PromptLine(Section):
    """One line of prompts.file (JSON): {"prompt": ..., "concepts": ["dog", {"word": "puppy", "class": "dog"}]};
    with "image" the sample annotates that image (relative to the file's folder) instead of
    generating one, and the prompt may be left to the templates."""

    prompt: str | None = Field(default=None, min_length=1)
    concepts: list[LineConcept] = Field(min_length=1)
    background: str | None = Field(default=None, description="default: the prompt without the concept words")
    image: str | None = Field(default=None, min_length=1, description="an image to annotate")

    @model_validator(mode="after")
    def _prompt_or_image(self) -> PromptLine:
        if self.prompt is None and self.image is None:
            raise ValueError("prompt: needed unless the line annotates an image")
        return self


class PromptsConfig(Section):
    concepts: list[ConceptConfig] = Field(
        default_factory=list, description="the classes; or give concepts_file or preset instead"
    )
    concepts_file: str | None = Field(
        default=None, description="class list: one name per line, or `id,name[,synonym|synonym...]` per line"
    )
    preset: Literal["voc", "coco"] | None = Field(default=None, description="a benchmark's class list with its ids")
    file: str | None = Field(
        default=None,
        description="JSONL of prompts written elsewhere, one per line naming its concept word(s) and class(es); "
        "sample i takes line i mod lines; templates and fillers are then unused",
    )
    templates: list[Template] = Field(
        default_factory=lambda: ["a photo of a {concept}"],
        description="a plain string is the prompt; a mapping may also give its background prompt; "
        "{concept2}, {concept3} make a template for several concepts",
    )
    concepts_per_image: int | list[int] = Field(
        default=1,
        description="concepts in each image; a list is taken in turns (e.g. [1, 2, 3]); "
        "each count needs templates with that many concept slots",
    )
    fillers: dict[str, list[str]] = Field(default_factory=dict)
    negative_prompt: str = ""

    @field_validator("templates", mode="before")
    @classmethod
    def _as_templates(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"prompt": t} if isinstance(t, str) else t for t in value]
        return value

    _files = field_validator("concepts_file", "file")(resolve_input_file)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> PromptsConfig:
        resolved = self._class_list()
        if resolved is not self.concepts:
            self = self.model_copy(update={"concepts": resolved})
        return self._check_templates()

    def _class_list(self) -> list[ConceptConfig]:
        """The classes, from exactly one source; a frozen config read back (concepts already
        filled in from its file or preset) passes."""
        if self.concepts_file is not None and self.preset is not None:
            raise ValueError("concepts_file and preset: give one of them")
        if self.preset is not None:
            from maskmint.schemas.presets import PRESETS

            loaded = [ConceptConfig(name=name, class_id=i) for i, name in PRESETS[self.preset].items()]
        elif self.concepts_file is not None:
            loaded = read_concepts_file(self.concepts_file)
        elif not self.concepts:
            raise ValueError("concepts: give the classes (concepts, concepts_file or preset)")
        else:
            return self.concepts
        if self.concepts and self.concepts != loaded:
            source = "preset" if self.preset else "concepts_file"
            raise ValueError(f"concepts: give the classes either here or by {source}, not both")
        return loaded

    @property
    def counts_per_image(self) -> list[int]:
        return [self.concepts_per_image] if isinstance(self.concepts_per_image, int) else list(self.concepts_per_image)

    def _check_templates(self) -> PromptsConfig:
        if not self.templates and not all(c.templates for c in self.concepts):
            raise ValueError("templates: empty, and not every concept has templates of its own")
        for i, template in enumerate(self.templates):
            where = f"templates.{i}"
            slots = concept_slots(template.prompt)
            if slots == 0:
                raise ValueError(f"{where}: '{template.prompt}' has no {{concept}} placeholder")
            stray = fields_of(template.prompt) & set(CONCEPT_SLOTS[slots:])
            if stray:
                raise ValueError(f"{where}: '{template.prompt}' uses {{{sorted(stray)[0]}}} without the slots before it")
            self._check_fillers(where, template.prompt, template.background)
        counts = self.counts_per_image
        if self.file is None:
            if not counts or min(counts) < 1 or max(counts) > min(MAX_CONCEPTS, len(self.concepts)):
                raise ValueError(
                    f"concepts_per_image: each count must be 1..{min(MAX_CONCEPTS, len(self.concepts))} "
                    "(at most 3, and no class twice in one image)"
                )
            for count in sorted(set(counts)):
                has = any(concept_slots(t.prompt) == count for t in self.templates)
                if not has and not (count == 1 and all(c.templates for c in self.concepts)):
                    raise ValueError(f"concepts_per_image: no template names {count} concept(s) ({{concept}} .. {{concept{count}}})")
        for c, concept in enumerate(self.concepts):
            for t, text in enumerate(concept.templates):
                where = f"concepts.{c}.templates.{t}"
                if CONCEPT_FIELD not in fields_of(text) and find_word(text, concept.words) is None:
                    raise ValueError(
                        f"{where}: concept '{concept.name}' does not occur in '{text}' "
                        "(use {concept}, the name or a synonym)"
                    )
                self._check_fillers(where, text, None)
        ids = [c.class_id for c in self.concepts]
        if len(set(ids)) != len(ids):
            raise ValueError("concepts: class_id values must be unique")
        return self

    def _check_fillers(self, where: str, *texts: str | None) -> None:
        for text in texts:
            if text is None:
                continue
            missing = {
                f for f in fields_of(text) - set(CONCEPT_SLOTS) if f not in self.fillers and filler_of(f) not in self.fillers
            }
            if missing:
                raise ValueError(f"{where}: placeholder(s) {sorted(missing)} have no entry in fillers")
        for name, options in self.fillers.items():
            if not options:
                raise ValueError(f"fillers.{name}: needs at least one option")


def find_word(text: str, words: list[str]) -> tuple[int, int] | None:
    """Character span of the first whole-word occurrence of any of `words`."""
    for word in words:
        match = re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE)
        if match:
            return match.span()
    return None


@dataclass(frozen=True)
class PromptsFileScan:
    """What one pass over a prompts file tells: where its non-blank lines start (and their
    1-based numbers), its sha256, and the images its lines name (as written, relative to its
    folder)."""

    offsets: np.ndarray
    numbers: np.ndarray
    sha256: str
    folder: str
    image_names: tuple[str, ...]

    @property
    def lines(self) -> int:
        return len(self.offsets)

    @property
    def image_lines(self) -> int:
        return len(self.image_names)

    @property
    def images(self) -> str:
        """The named images' signature: each one's path as written, size and modification time,
        stat'ed now (an image can change while the file does not), so a replaced or edited
        image makes it a different config; "" when no line names one."""
        if not self.image_names:
            return ""
        digest = hashlib.sha256()
        for image in self.image_names:
            try:
                stat = os.stat(os.path.join(self.folder, image))
                digest.update(f"{image}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{image}\0missing\n".encode())
        return digest.hexdigest()[:16]


def scan_prompts_file(path: str) -> PromptsFileScan:
    """The file read once for the sample count, the config hash, the line index and the
    plan; read again only when it changed."""
    stat = os.stat(path)
    return _scan(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _scan(path: str, _size: int, _mtime_ns: int) -> PromptsFileScan:
    content = hashlib.sha256()
    offsets, numbers, position, names = [], [], 0, []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            content.update(raw)
            if raw.strip():
                offsets.append(position)
                numbers.append(number)
            position += len(raw)
            if b'"image"' not in raw:
                continue
            try:
                image = json.loads(raw).get("image")
            except (ValueError, AttributeError):
                continue  # planning reports the line
            if isinstance(image, str):
                names.append(image)
    return PromptsFileScan(np.array(offsets, dtype=np.int64), np.array(numbers, dtype=np.int64),
                           content.hexdigest(), os.path.dirname(path), tuple(names))
