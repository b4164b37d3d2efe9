"""Where a run's lines come from: a JSONL of written prompts (or images to annotate), or a
folder of images. Either is a sequence of PromptLines, each with where it is for messages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from braceexpand import braceexpand
from pydantic import ValidationError

from maskmint.schemas.inputs import LABEL_EXTENSION, SHARD_MEMBER, InputConfig, is_shards, list_images, shard_samples
from maskmint.schemas.prompts import ConceptConfig, LineConcept, PromptLine, scan_prompts_file
from maskmint.stages.tokens import PromptError


class LineIndex:
    """Byte offsets of the non-blank lines of a JSONL file: line i is read on demand, so a
    file of millions of prompts costs 8 bytes a line in memory."""

    def __init__(self, path: str):
        self.path = path
        scan = scan_prompts_file(path)
        if not scan.lines:
            raise PromptError(f"prompts.file: '{path}' holds no prompt")
        self.offsets, self.numbers = scan.offsets, scan.numbers

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int) -> tuple[int, str]:
        """(1-based line number in the file, the line's text)."""
        with open(self.path, "rb") as handle:
            handle.seek(int(self.offsets[i]))
            return int(self.numbers[i]), handle.readline().decode("utf-8", errors="replace")


class JsonLines:
    """prompts.file as lines: line i parsed on demand, image paths relative to the file's folder."""

    def __init__(self, path: str):
        self.index = LineIndex(path)
        self.base = Path(path).parent

    def __len__(self) -> int:
        return len(self.index)

    def line(self, i: int) -> tuple[str, PromptLine]:
        """(where the line is, for messages; the line)."""
        return self._parse(*self.index.read(i))

    def stream(self) -> Iterator[tuple[str, PromptLine]]:
        """Every line in order, the file read once through (for checks over all of them)."""
        with open(self.index.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield self._parse(number, raw.decode("utf-8", errors="replace"))

    @staticmethod
    def _parse(number: int, text: str) -> tuple[str, PromptLine]:
        where = f"prompts.file line {number}"
        try:
            return where, PromptLine.model_validate_json(text)
        except ValidationError as error:
            problem = error.errors()[0]
            message = problem["msg"].removeprefix("Value error, ")
            field = ".".join(str(p) for p in problem["loc"])
            if not field and not re.match(r"^[a-z_]+: ", message):  # a check across fields names its field
                field = "line"
            raise PromptError(f"{where}: {field + ': ' if field else ''}{message}") from None


class ImageFolder:
    """input.images as lines: image i of the sorted folder, its classes its parent folder's name
    (a class name or synonym) or every configured class; the templates caption it."""

    def __init__(self, config: InputConfig, concepts: list[ConceptConfig]):
        self.shards = is_shards(config.images)
        self.base = Path("" if self.shards else config.images)  # shard members are named in full
        self.files = list_images(config.images)
        if not self.files:
            raise PromptError(f"input.images: '{config.images}' holds no jpg, png or webp image")
        self.classes = config.classes
        self.every = [c.name for c in concepts] if config.classes == "all" else None
        self.by_word = {word.lower(): c.name for c in concepts for word in c.words}
        self.by_word |= {str(c.class_id): c.name for c in concepts}  # a .cls label may be the class_id
        self.labels = ({f"{shard}{SHARD_MEMBER}{s.image}": s.label for shard in braceexpand(config.images)
                        for s in shard_samples(shard)} if config.classes == "label" else {})

    def first_of_each_folder(self) -> list[int]:
        """One image index per distinct class source (parent folder, or .cls label): what classes
        the source has is known from these (a folder of 100,000 images has a handful)."""
        seen: dict[str | None, int] = {}
        for i, name in enumerate(self.files):
            seen.setdefault(self._class_source(name), i)
        return sorted(seen.values())

    def _class_source(self, name: str) -> str | None:
        return self.labels.get(name) if self.classes == "label" else name.rpartition("/")[0]

    def class_counts(self, samples: int) -> dict[str, int]:
        """class name -> samples of a run of `samples` showing it."""
        cycles, rest = divmod(samples, len(self.files))
        counts: dict[str, int] = {}
        by_folder: dict[str | None, list[int]] = {}
        for i, name in enumerate(self.files[: min(samples, len(self.files))]):
            by_folder.setdefault(self._class_source(name), []).append(i)
        for indices in by_folder.values():
            _, line = self.line(indices[0])
            times = sum(cycles + (i < rest) for i in indices)
            for item in line.concepts:
                counts[item.word] = counts.get(item.word, 0) + times
        return counts

    def __len__(self) -> int:
        return len(self.files)

    def line(self, i: int) -> tuple[str, PromptLine]:
        name = self.files[i]
        where = f"input.images '{name}'"
        if self.every is not None:
            classes = self.every
        elif self.classes == "label":
            label = self.labels.get(name)
            if label is None:
                raise PromptError(f"{where}: has no .{LABEL_EXTENSION} field to name its class (or set input.classes: all)")
            if label.lower() not in self.by_word:
                raise PromptError(f"{where}: its label '{label}' is not one of the run's classes (names, synonyms or ids)")
            classes = [self.by_word[label.lower()]]
        else:
            folder = name.partition(SHARD_MEMBER)[2 if self.shards else 0].rpartition("/")[0].rpartition("/")[2]
            if not folder:
                raise PromptError(f"{where}: lies in the folder itself; with input.classes: folder each image lies "
                                  "in a folder named by its class (or set input.classes: all)")
            if folder.lower() not in self.by_word:
                raise PromptError(f"{where}: its folder '{folder}' is not one of the run's classes (names or synonyms)")
            classes = [self.by_word[folder.lower()]]
        return where, PromptLine(image=name, concepts=[LineConcept(word=c, class_=c) for c in classes])
