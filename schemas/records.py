"""Records that leave maskmint: per-sample metadata, shard stats, run manifest, summary."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from maskmint.schemas.config import SCHEMA_VERSION

# WebDataset field names (the part of the member name after the key's first dot).
IMAGE_FIELDS = {"jpg": "jpg", "png": "png"}
MASK_FIELD = "mask.png"
HEATMAP_FIELD = "heatmap.png"
METADATA_FIELD = "json"
IGNORE_INDEX = 255
BACKGROUND_ID = 0


def background_field(image_format: str) -> str:
    return f"background.{image_format}"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConceptSpan(Record):
    name: str
    class_id: int
    word: str = Field(description="the word as it appears in the prompt (name or synonym)")
    char_span: tuple[int, int]
    token_positions: list[int] = Field(description="indices into the tokenized prompt, BOS = 0")
    phrase: str | None = Field(default=None, description="the word with its modifiers in the prompt ('red circle')")
    phrase_positions: list[int] = Field(
        default_factory=list, description="indices of the noun phrase's tokens in the tokenized prompt (empty: the word's)")


class PlannedSample(Record):
    index: int
    key: str
    shard: int
    seed: int
    prompt: str
    background_prompt: str
    negative_prompt: str
    background_negative_prompt: str
    concepts: list[ConceptSpan]
    image: str | None = Field(default=None, description="the real image this sample annotates (absolute path)")


class SampleMetadata(Record):
    """KEY.json inside a shard."""

    key: str
    prompt: str
    background_prompt: str
    negative_prompt: str
    background_negative_prompt: str
    concepts: list[ConceptSpan]
    seed: int
    model: str
    width: int
    height: int
    parameters: dict = Field(description="stage parameters that shaped this sample")
    quality: dict[str, float] = Field(description="per-sample scores: mask fraction, components, agreement ...")
    source: dict | None = Field(default=None, description="an annotated image: its path, sha256 and upright size [rows, cols] before fitting")


class ShardStats(Record):
    """NNNNNN.json beside each shard tar."""

    shard: int
    planned: int
    written: list[str]
    dropped: dict[str, str] = Field(description="key -> reason")
    seconds: dict[str, float] = Field(description="wall time per stage")
    mask: dict[str, float] = Field(description="mean mask statistics over written samples")
    scores: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="written key -> its quality scores (for review without opening tars)"
    )
    classes: dict[str, list[int]] = Field(default_factory=dict, description="planned key -> its concepts' class ids")
    sources: dict[str, str] = Field(default_factory=dict, description="planned key -> the image it annotates, if any")
    decided_before_removal: list[str] = Field(
        default_factory=list, description="dropped keys whose reason the weak mask gave (removal can skip them)"
    )
    worker: dict[str, str] = Field(default_factory=dict)
    tar_bytes: int | None = Field(default=None, description="size of the shard's tar, checked on resume")
    tar_sha256: str | None = Field(default=None, description="digest of the shard's tar, checked by --verify")


class RunManifest(Record):
    """DIR/run.json: the frozen config and what it plans."""

    schema_version: int = SCHEMA_VERSION
    maskmint_version: str
    config_hash: str
    planned_samples: int
    planned_shards: int
    classes: dict[int, str]
    fields: dict[str, str]
    config: dict


class RunSummary(Record):
    """DIR/summary.json, rewritten at the end of every run, partial ones too."""

    planned_samples: int = Field(description="the planned range and every top-up round planned so far")
    planned_shards: int
    top_up_rounds: int = Field(default=0, description="rounds a quota (output.kept_per_class / kept) added")
    attempts_per_class: dict[str, int] = Field(default_factory=dict, description="whole shards' samples showing each class")
    kept_per_class: dict[str, int] = Field(default_factory=dict, description="of those, the kept ones")
    complete_shards: int
    pending_shards: list[int]
    failed_shards: dict[int, str] = Field(default_factory=dict)
    damaged_shards: dict[int, str] = Field(
        default_factory=dict, description="shards on disk that are not whole (redone by the next run)"
    )
    written: int
    dropped: int
    dropped_by_reason: dict[str, int]
    seconds_by_stage: dict[str, float]
    whole: bool


# What a shard worker reports as it goes (the executors count `samples` from either).
@dataclass(frozen=True)
class BatchDone:
    """A mini-batch has left the model: `samples` more are on their way into the shard."""

    samples: int


@dataclass(frozen=True)
class ShardWritten:
    """The shard is whole on disk; its samples were counted batch by batch already."""

    stats: ShardStats
    samples: int = 0
