"""Where each concept's tokens sit in the text sequence that attention sees.

SD 1.x/2.x and SDXL attend to one CLIP sequence (SDXL's two encoders agree on positions);
Flux attends to T5's; SD3 to CLIP's 77 followed by T5's. A layout is that list of segments,
each a tokenizer, the length its encoder is given and where it starts. Positions come from
the tokenizer's own character offsets, so any word-piece scheme (CLIP BPE, SentencePiece)
is located the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from maskmint.schemas.records import ConceptSpan


class PromptError(ValueError):
    """A prompt the model cannot take (e.g. the concept falls past the token limit)."""


@dataclass(frozen=True)
class TextSegment:
    tokenizer: Any
    length: int  # tokens its encoder is given (padded or truncated to this), specials included
    offset: int = 0  # its first position in the sequence attention sees

    def specials(self) -> tuple[int, int]:
        """How many special tokens the tokenizer puts before and after the text (CLIP 1, 1; T5 0, 1)."""
        offsets = self.tokenizer("a", return_offsets_mapping=True).offset_mapping
        real = [i for i, (start, end) in enumerate(offsets) if end > start]
        return real[0], len(offsets) - 1 - real[-1]


class TextLayout:
    def __init__(self, segments: list[TextSegment]):
        self.segments = segments
        self._specials = [segment.specials() for segment in segments]

    @classmethod
    def single(cls, tokenizer) -> TextLayout:
        """One tokenizer at the start of the sequence, as long as it says it is (CLIP's 77)."""
        return cls([TextSegment(tokenizer, tokenizer.model_max_length)])

    @property
    def room(self) -> int:
        """Text tokens every encoder keeps (its length less its special tokens)."""
        return min(s.length - before - after for s, (before, after) in zip(self.segments, self._specials))

    def count(self, text: str) -> int:
        """Text tokens of `text` in the tokenizer that makes the most of it."""
        return max(len(s.tokenizer(text, add_special_tokens=False).input_ids) for s in self.segments)

    def positions(self, prompt: str, span: tuple[int, int]) -> list[int]:
        """Positions in attention's text sequence of the tokens covering prompt[span], in every segment."""
        found = []
        for segment, (_, after) in zip(self.segments, self._specials):
            offsets = segment.tokenizer(prompt, return_offsets_mapping=True).offset_mapping
            hits = [i for i, (start, end) in enumerate(offsets) if end > start and start < span[1] and end > span[0]]
            if not hits or hits[-1] >= segment.length - after:
                raise PromptError(f"'{prompt}': concept falls outside the first {self.room} tokens")
            found += [segment.offset + i for i in hits]
        return found


def token_slots(concepts: list[list[ConceptSpan]]) -> tuple[torch.Tensor, torch.Tensor]:
    """token_index [B, T] and weights [B, C, T] so each concept averages its own tokens."""
    slots = max(sum(len(c.token_positions) for c in spans) for spans in concepts)
    n_concepts = max(len(spans) for spans in concepts)
    index = torch.zeros(len(concepts), slots, dtype=torch.long)
    weights = torch.zeros(len(concepts), n_concepts, slots)
    for b, spans in enumerate(concepts):
        t = 0
        for c, span in enumerate(spans):
            for position in span.token_positions:
                index[b, t] = position
                weights[b, c, t] = 1.0 / len(span.token_positions)
                t += 1
    return index, weights
