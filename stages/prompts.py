"""Prompts: concepts x templates x fillers, and where each concept sits in the token sequence."""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from maskmint.schemas.inputs import SHARD_MEMBER, InputConfig
from maskmint.schemas.prompts import (
    CONCEPT_SLOTS,
    ConceptConfig,
    PromptLine,
    PromptsConfig,
    fields_of,
    concept_slots,
    filler_of,
    find_word,
)
from maskmint.schemas.records import ConceptSpan
from maskmint.stages.sources import ImageFolder, JsonLines
from maskmint.stages.tokens import PromptError, TextLayout


# Words that end a noun phrase's modifiers: "a photo of a dog" keeps "a photo of".
JOINING_WORDS = r"(?:a|an|the|of|in|on|at|with|and|or|by|near|under|over|behind|from|to|for|into|onto|beside)"


# Up to three words between an article and its noun that no joining word ends.
MODIFIERS = rf"(?:(?!{JOINING_WORDS}\b)[\w-]+\s+){{0,3}}"


def _drop_concept(text: str, word: str) -> str:
    # "a photo of a dog in a park" -> "a photo of in a park": the article goes with the word,
    # and so do up to three modifiers between them ("a green square on ..." -> "on ..."), so
    # that removal is not asked for a green thing.
    text = re.sub(rf"\b(?:an?|the)\s+{MODIFIERS}{re.escape(word)}\b", "", text, count=1, flags=re.IGNORECASE)
    text = re.sub(rf"\b{re.escape(word)}\b", "", text, count=1, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" ,")


def noun_phrase(prompt: str, span: tuple[int, int]) -> str:
    """The concept word with the modifiers the prompt puts between it and its article ("a red
    striped circle" -> "red striped circle"); the word alone where no article precedes it."""
    found = re.search(rf"\b(?:an?|the)\s+({MODIFIERS})$", prompt[: span[0]], flags=re.IGNORECASE)
    return ((found.group(1) if found else "") + prompt[span[0] : span[1]]).strip()


def _drop_dangling_joins(text: str) -> str:
    # "a dog and a cat in a park" -> "and in a park" -> "in a park": an 'and' or comma that
    # joined dropped concepts joins nothing now.
    words = text.replace(",", " , ").split()
    joins = {"and", ","}
    kept = [w for i, w in enumerate(words) if not (w.lower() in joins and (
        i == 0 or i == len(words) - 1 or words[i + 1].lower() in joins))]
    while kept and kept[0].lower() in joins:
        kept.pop(0)
    return " ".join(kept).replace(" ,", ",")


Rendered = tuple[str, str, str, list[ConceptSpan]]  # prompt, background prompt, removal negative, concepts


class PromptBuilder:
    """Deterministic prompt for a sample index. From templates, concepts take turns so classes
    stay balanced; from a prompts file, sample i takes line i mod lines."""

    def __init__(self, config: PromptsConfig, layout: TextLayout, images: InputConfig | None = None):
        self.config = config
        self.layout = layout
        self.lines: JsonLines | ImageFolder | None = None
        if images is not None and images.images is not None:
            self.lines = ImageFolder(images, config.concepts)
        elif config.file is not None:
            self.lines = JsonLines(config.file)
        self.by_class = {c.class_id: c for c in config.concepts}
        self.by_name = {c.name.lower(): c for c in config.concepts}

    def _choices(self, concept_index: int, count: int = 1) -> list[tuple[str, str | None, str]]:
        """(prompt template, background template, where it is configured) naming `count` concepts."""
        concept = self.config.concepts[concept_index]
        own = [(t, None, f"prompts.concepts.{concept_index}.templates.{i}") for i, t in enumerate(concept.templates)]
        shared = [
            (t.prompt, t.background, f"prompts.templates.{i}")
            for i, t in enumerate(self.config.templates)
            if concept_slots(t.prompt) == count
        ]
        return (own if count == 1 else []) + shared

    def count_of(self, index):
        """How many concepts sample `index` (an int or an int array) names. The count moves on
        once every class has had its turn first, so each class comes first with each count alike
        (stepping both with the index would tie them: three classes and counts [1, 2, 3] would
        always show the first class alone)."""
        counts = np.asarray(self.config.counts_per_image)
        return counts[(index // len(self.config.concepts)) % len(counts)]

    def concept_counts(self, samples: int) -> dict[int, float]:
        """class id -> samples showing that class in a run of `samples`. From templates the
        first concept takes turns (exact); further concepts are drawn from the other classes,
        so their part is the expected count."""
        concepts = self.config.concepts
        if self.lines is None:
            index = np.arange(samples)
            first = index % len(concepts)
            extra = self.count_of(index) - 1
            firsts = np.bincount(first, minlength=len(concepts)).astype(float)
            extra_of_first = np.bincount(first, weights=extra, minlength=len(concepts))
            if len(concepts) > 1:
                firsts += (extra_of_first.sum() - extra_of_first) / (len(concepts) - 1)
            return {c.class_id: float(round(n, 1)) if n % 1 else int(n) for c, n in zip(concepts, firsts)}
        counts = dict.fromkeys((c.class_id for c in concepts), 0)
        if isinstance(self.lines, ImageFolder):
            for name, n in self.lines.class_counts(samples).items():
                counts[self.by_name[name.lower()].class_id] += n
            return counts
        cycles, rest = divmod(samples, len(self.lines))
        for i, (where, line) in zip(range(min(samples, len(self.lines))), self.lines.stream()):
            for concept in self._classes(where, line):
                counts[concept.class_id] += cycles + (i < rest)
        return counts

    def __call__(self, index: int, rng: np.random.Generator, top_up: tuple[int, int] | None = None) -> Rendered:
        if self.lines is not None:
            return self.from_line(index % len(self.lines))
        concepts = self.config.concepts
        if top_up is None:
            first = index % len(concepts)  # turns: see concept_counts
            count = int(self.count_of(index))
        else:  # the class the top-up is for; counts take turns along the round
            class_id, place = top_up
            first = next(i for i, c in enumerate(concepts) if c.class_id == class_id)
            counts = self.config.counts_per_image
            count = int(counts[place % len(counts)])
        choices = self._choices(first, count)
        template, background, _ = choices[int(rng.integers(len(choices)))]
        fills = {name: options[int(rng.integers(len(options)))] for name, options in sorted(self.config.fillers.items())}
        chosen = [concepts[first]]
        if count > 1:  # the others from the remaining classes: no class twice in one image
            others = [c for i, c in enumerate(concepts) if i != first]
            chosen += [others[int(i)] for i in rng.choice(len(others), size=count - 1, replace=False)]
            fills |= self._suffixed_fills(template, background, fills, rng)
        words = [c.words[int(rng.integers(len(c.words)))] for c in chosen]
        return self._from_template(chosen, template, background, fills, words)

    def _suffixed_fills(
        self, template: str, background: str | None, fills: dict[str, str], rng: np.random.Generator
    ) -> dict[str, str]:
        """`{colour2}`-style placeholders drawn on their own from their base filler, avoiding
        the values already drawn for it when others are left ("a red dog and a blue cat")."""
        fields = fields_of(template) | (fields_of(background) if background else set())
        drawn: dict[str, str] = {}
        for name in sorted(f for f in fields - set(CONCEPT_SLOTS) if f not in self.config.fillers):
            base = filler_of(name)
            taken = {fills.get(base), *(v for k, v in drawn.items() if filler_of(k) == base)}
            options = [o for o in self.config.fillers[base] if o not in taken] or self.config.fillers[base]
            drawn[name] = options[int(rng.integers(len(options)))]
        return drawn

    def check_all(self) -> None:
        """Every prompt the run can draw is one the model can take, found before any work.
        Templates: each with every concept word and the longest filler options (most tokens,
        so the concept sits as late as it ever will); templates of several concepts with the
        longest words of distinct classes, longest first, and suffixed fillers drawn apart.
        A prompts file: every line with a prompt; the lines the templates caption, once per
        distinct set of words and classes, with every template that can caption them at its
        longest. A folder: every folder's classes, then the templates as above."""
        if isinstance(self.lines, JsonLines):
            captioned: dict[tuple, tuple[str, list[ConceptConfig]]] = {}
            for where, line in self.lines.stream():
                self._image(where, line)
                if line.prompt is None:
                    chosen = self._classes(where, line)
                    key = (tuple(c.class_id for c in chosen), tuple(item.word for item in line.concepts), line.background)
                    captioned.setdefault(key, (where, chosen))
                else:
                    self._rendered(where, line, 0)
            for (_, words, background), (where, chosen) in captioned.items():
                self._check_caption(where, chosen, list(words), background)
            return
        counts = self.config.counts_per_image
        if isinstance(self.lines, ImageFolder):
            counts = {len(self._classes(*self.lines.line(i))) for i in self.lines.first_of_each_folder()}
        self._check_templates(counts)

    @functools.cached_property
    def _fillers_by_length(self) -> dict[str, list[str]]:
        return {name: self._by_length(options) for name, options in self.config.fillers.items()}

    def _by_length(self, words: list[str]) -> list[str]:
        return sorted(words, key=lambda w: -self.layout.count(w))

    def _worst_fills(self, template: str) -> dict[str, str]:
        """The template's fillers at their longest (most tokens); suffixed ones the next-longest."""
        fillers = self._fillers_by_length
        fills = {name: options[0] for name, options in fillers.items()}
        for field in sorted(fields_of(template) - set(CONCEPT_SLOTS) - set(fills)):
            options = fillers[filler_of(field)]
            used = sum(1 for f in fills if filler_of(f) == filler_of(field))
            fills[field] = options[min(used, len(options) - 1)]
        return fills

    def _check_caption(self, where: str, chosen: list[ConceptConfig], words: list[str], background: str | None) -> None:
        """Every template that may caption these words and classes, at its longest."""
        choices = self._choices(self.config.concepts.index(chosen[0]), len(chosen))
        if not choices:
            raise PromptError(f"{where}: no template names {len(chosen)} concept(s); give the line a prompt")
        for template, template_background, _ in choices:
            try:
                self._from_template(chosen, template, background or template_background, self._worst_fills(template), words)
            except PromptError as error:
                raise PromptError(f"{where}: {error}") from None

    def _check_templates(self, counts) -> None:
        concepts = self.config.concepts
        # several concepts: each slot the longest word of another class, longest first, so
        # every slot sits as late as it can; suffixed fillers the next-longest values
        ranked = sorted(((self._by_length(c.words)[0], c) for c in concepts), key=lambda wc: -self.layout.count(wc[0]))
        for count in sorted(set(counts)):
            firsts = enumerate(concepts) if count == 1 else [(0, ranked[0][1])]
            for concept_index, concept in firsts:
                for template, background, where in self._choices(concept_index, count):
                    fills = self._worst_fills(template)
                    if count == 1:
                        tries = [([concept], [word]) for word in concept.words]
                    else:
                        tries = [([c for _, c in ranked[:count]], [w for w, _ in ranked[:count]])]
                    for chosen, words in tries:
                        try:
                            self._from_template(chosen, template, background, fills, words)
                        except PromptError as error:
                            raise PromptError(f"{where}: {error}") from None

    def planned(self, index: int, rng: np.random.Generator,
                top_up: tuple[int, int] | None = None) -> tuple[Rendered, str | None]:
        """Sample `index`'s prompt, and the image it annotates (an absolute path) or None: its
        line read and parsed once for both. `top_up` (class id, place in its round): a quota's
        top-up sample, which names that class first."""
        if self.lines is None:
            return self(index, rng, top_up), None
        i = index % len(self.lines)
        where, line = self.lines.line(i)
        image = self._image(where, line)
        return self._rendered(where, line, i), image

    def _image(self, where: str, line: PromptLine) -> str | None:
        if line.image is None:
            return None
        if SHARD_MEMBER in line.image:  # a shard member, named in full
            return line.image
        path = os.path.normpath(os.path.join(self.lines.base, line.image))
        if isinstance(self.lines, JsonLines) and not os.path.isfile(path):  # a folder's images were found there
            raise PromptError(f"{where}: image '{line.image}' is not a file (paths are relative to the prompts file)")
        return path

    def from_line(self, i: int) -> Rendered:
        where, line = self.lines.line(i)
        self._image(where, line)  # a missing image is a planning error naming the line
        return self._rendered(where, line, i)

    def _rendered(self, where: str, line: PromptLine, i: int) -> Rendered:
        if line.prompt is None:  # an image with its classes only: the templates caption it
            return self._caption(where, line, np.random.default_rng(i))
        found = []
        for item in line.concepts:
            concept = self._class_of(item.class_)
            if concept is None:
                raise PromptError(f"{where}: class {item.class_!r} is not one of the run's classes")
            span = find_word(line.prompt, [item.word])
            if span is None:
                raise PromptError(f"{where}: the word '{item.word}' does not occur in the prompt")
            found.append((concept, span))
        try:
            return self._render(line.prompt, found, line.background)
        except PromptError as error:
            raise PromptError(f"{where}: {error}") from None

    def _caption(self, where: str, line: PromptLine, rng: np.random.Generator) -> Rendered:
        """A prompt for an image's classes from the templates that name that many concepts."""
        chosen = self._classes(where, line)
        choices = self._choices(self.config.concepts.index(chosen[0]), len(chosen))
        if not choices:
            raise PromptError(f"{where}: no template names {len(chosen)} concept(s); give the line a prompt")
        template, background, _ = choices[int(rng.integers(len(choices)))]
        fills = {name: options[int(rng.integers(len(options)))] for name, options in sorted(self.config.fillers.items())}
        if len(chosen) > 1:
            fills |= self._suffixed_fills(template, background, fills, rng)
        words = [item.word for item in line.concepts]
        try:
            return self._from_template(chosen, template, line.background or background, fills, words)
        except PromptError as error:
            raise PromptError(f"{where}: {error}") from None

    def _classes(self, where: str, line: PromptLine) -> list[ConceptConfig]:
        chosen = []
        for item in line.concepts:
            concept = self._class_of(item.class_)
            if concept is None:
                raise PromptError(f"{where}: class {item.class_!r} is not one of the run's classes")
            chosen.append(concept)
        return chosen

    def _class_of(self, name_or_id: str | int) -> ConceptConfig | None:
        if isinstance(name_or_id, int):
            return self.by_class.get(name_or_id)
        return self.by_name.get(name_or_id.lower())

    def _from_template(
        self, concepts: list[ConceptConfig], template: str, background: str | None, fills: dict[str, str],
        words: list[str],
    ) -> Rendered:
        markers = [chr(1 + n) for n in range(len(concepts))]  # control characters no template holds
        prompt = template.format(**fills, **dict(zip(CONCEPT_SLOTS, markers)))
        spans: list[tuple[int, int] | None] = [None] * len(concepts)
        while any(m in prompt for m in markers):  # left to right, so earlier words shift later spans
            start, n = min((prompt.index(m), n) for n, m in enumerate(markers) if m in prompt)
            prompt = prompt[:start] + words[n] + prompt[start + 1 :]
            if spans[n] is None:
                spans[n] = (start, start + len(words[n]))
        if spans[0] is None:  # a concept's own template names it literally
            spans[0] = find_word(prompt, concepts[0].words)
        if background is not None:
            background = re.sub(r"\s+", " ", background.format(**fills, **dict.fromkeys(CONCEPT_SLOTS, ""))).strip()
        return self._render(prompt, list(zip(concepts, spans)), background)

    def _render(self, prompt: str, found: list[tuple[ConceptConfig, tuple[int, int]]], background: str | None) -> Rendered:
        """Token positions of each concept, the background prompt (every concept word dropped
        with its article unless given) and the removal negative (every concept's words)."""
        spans = []
        for concept, span in found:
            word = prompt[span[0] : span[1]]
            positions = self.layout.positions(prompt, span)
            phrase = noun_phrase(prompt, span)  # ends at the word: its modifiers are the text just before it
            spans.append(ConceptSpan(name=concept.name, class_id=concept.class_id, word=word, char_span=span,
                                     token_positions=positions, phrase=phrase,
                                     phrase_positions=self.layout.positions(prompt, (span[1] - len(phrase), span[1]))))
        if background is None:
            background = prompt
            for span in spans:
                background = _drop_concept(background, span.word)
            background = _drop_dangling_joins(background)
        words = [w for concept, _ in found for w in concept.words]
        negative = ", ".join(dict.fromkeys(w for w in [*words, self.config.negative_prompt] if w))
        return prompt, background, negative, spans
