"""Prompts: concepts x templates x fillers, and where each concept sits in the token sequence."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from schemas.config import CONCEPT_FIELD, ConceptConfig, PromptsConfig, find_word
from schemas.records import ConceptSpan

Tokenize = Callable[[str], list[int]]  # text -> token ids without BOS/EOS


class PromptError(ValueError):
    """A prompt the model cannot take (e.g. the concept falls past the token limit)."""


def _drop_concept(text: str, word: str) -> str:
    # "a photo of a dog in a park" -> "a photo of in a park": the article goes with the word.
    text = re.sub(rf"\b(?:an?|the)\s+{re.escape(word)}\b", "", text, count=1, flags=re.IGNORECASE)
    text = re.sub(rf"\b{re.escape(word)}\b", "", text, count=1, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" ,")


def token_positions(tokenize: Tokenize, prompt: str, span: tuple[int, int], max_length: int) -> list[int]:
    """Token indices (BOS = 0) covering prompt[span]; CLIP tokenizes word by word, so prefixes line up."""
    before = len(tokenize(prompt[: span[0]]))
    through = len(tokenize(prompt[: span[1]]))
    positions = list(range(1 + before, 1 + through))
    if not positions or positions[-1] >= max_length - 1:
        raise PromptError(f"'{prompt}': concept falls outside the first {max_length - 2} tokens")
    return positions


class PromptBuilder:
    """Deterministic prompt for a sample index: concepts cycle so classes stay balanced."""

    def __init__(self, config: PromptsConfig, tokenize: Tokenize, max_length: int):
        self.config = config
        self.tokenize = tokenize
        self.max_length = max_length

    def _choices(self, concept_index: int) -> list[tuple[str, str | None, str]]:
        """(prompt template, background template, where it is configured)."""
        concept = self.config.concepts[concept_index]
        own = [(t, None, f"prompts.concepts.{concept_index}.templates.{i}") for i, t in enumerate(concept.templates)]
        return own + [(t.prompt, t.background, f"prompts.templates.{i}") for i, t in enumerate(self.config.templates)]

    def concept_counts(self, samples: int) -> dict[int, int]:
        """class id -> samples of that class in a run of `samples` (concepts take turns)."""
        concepts = self.config.concepts
        return {c.class_id: samples // len(concepts) + (i < samples % len(concepts)) for i, c in enumerate(concepts)}

    def __call__(self, index: int, rng: np.random.Generator) -> tuple[str, str, str, list[ConceptSpan]]:
        concept_index = index % len(self.config.concepts)  # turns: see concept_counts
        concept = self.config.concepts[concept_index]
        choices = self._choices(concept_index)
        template, background, _ = choices[int(rng.integers(len(choices)))]
        fills = {name: options[int(rng.integers(len(options)))] for name, options in sorted(self.config.fillers.items())}
        word = concept.words[int(rng.integers(len(concept.words)))]
        return self._render(concept, template, background, fills, word)

    def check_all(self) -> None:
        """Every template with every concept word and the longest filler options (most tokens,
        so the concept sits as late as it ever will): a prompt the model cannot take is found
        before any work, whatever the run's size."""
        longest = {
            name: max(options, key=lambda option: len(self.tokenize(option)))
            for name, options in self.config.fillers.items()
        }
        for concept_index, concept in enumerate(self.config.concepts):
            for template, background, where in self._choices(concept_index):
                for word in concept.words:
                    try:
                        self._render(concept, template, background, longest, word)
                    except PromptError as error:
                        raise PromptError(f"{where}: {error}") from None

    def _render(
        self, concept: ConceptConfig, template: str, background: str | None, fills: dict[str, str], word: str
    ) -> tuple[str, str, str, list[ConceptSpan]]:
        marker = "\x00"
        prompt = template.format(**fills, **{CONCEPT_FIELD: marker})
        if marker in prompt:
            start = prompt.index(marker)
            prompt = prompt.replace(marker, word, 1).replace(marker, word)
            span = (start, start + len(word))
        else:  # the concept's own template names it literally
            span = find_word(prompt, concept.words)
            word = prompt[span[0] : span[1]]
        positions = token_positions(self.tokenize, prompt, span, self.max_length)

        if background is not None:
            background_prompt = background.format(**fills, **{CONCEPT_FIELD: ""}).strip()
        else:
            background_prompt = _drop_concept(prompt, word)
        negative = ", ".join(w for w in [*concept.words, self.config.negative_prompt] if w)
        spans = [
            ConceptSpan(name=concept.name, class_id=concept.class_id, word=word, char_span=span, token_positions=positions)
        ]
        return prompt, background_prompt, negative, spans
