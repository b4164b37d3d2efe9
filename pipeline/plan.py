"""The plan: sample index -> key, prompt, concept tokens and seed, the same on every machine."""

from __future__ import annotations

import hashlib

import numpy as np

from maskmint.pipeline import quota
from maskmint.schemas.config import RunConfig
from maskmint.schemas.records import PlannedSample
from maskmint.stages.prompts import PromptBuilder
from maskmint.stages.tokens import TextLayout

# Enough samples to meet every template/concept pairing of a normal config up front.
PREFLIGHT_SAMPLES = 256


def sample_key(index: int) -> str:
    return f"{index:010d}"


def sample_seed(run_seed: int, key: str) -> int:
    digest = hashlib.blake2b(f"{run_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shard_range(config: RunConfig, shard: int, rounds: list[quota.TopUp] = ()) -> range:
    """Sample indices of `shard`: the planned range's, then the top-up rounds' (quotas)."""
    return quota.shard_range(config.output.samples, config.output.shard_size, list(rounds), shard)


class Plan:
    """Deterministic per-sample plan; shards are planned lazily, so a run of millions starts at once."""

    def __init__(self, config: RunConfig, layout: TextLayout, root=None):
        """`root`: the run directory, whose top-up rounds (quotas) extend the plan as they are planned."""
        self.config = config
        self.layout = layout
        self.root = root
        self.builder = PromptBuilder(config.prompts, layout, config.input)

    def rounds(self) -> list[quota.TopUp]:
        return quota.read_rounds(self.root) if self.root is not None else []

    def sample(self, index: int, rounds: list[quota.TopUp] | None = None) -> PlannedSample:
        key = sample_key(index)
        seed = sample_seed(self.config.execution.seed, key)
        rng = np.random.default_rng(seed)
        top_up = None
        if index >= self.config.output.samples:
            found = quota.round_of(index, self.rounds() if rounds is None else rounds)
            if found is None:
                raise IndexError(f"sample {index} is past the plan")
            top_up = found[0].first_classes[found[1]], found[1]
        (prompt, background, background_negative, concepts), image = self.builder.planned(index, rng, top_up)
        return PlannedSample(
            index=index,
            key=key,
            shard=index // self.config.output.shard_size,
            seed=seed,
            prompt=prompt,
            background_prompt=background,
            negative_prompt=self.config.prompts.negative_prompt,
            background_negative_prompt=background_negative,
            concepts=concepts,
            image=image,
        )

    def shard(self, shard: int) -> list[PlannedSample]:
        rounds = self.rounds()
        return [self.sample(i, rounds) for i in shard_range(self.config, shard, rounds)]

    def preflight(self) -> list[PlannedSample]:
        """Every template, concept and worst-case filling, then the first samples as they will
        be drawn (returned): a prompt the model cannot take fails before anything is written."""
        self.builder.check_all()
        return [self.sample(index) for index in range(min(PREFLIGHT_SAMPLES, self.config.output.samples))]


def plan_report(config: RunConfig, plan: Plan, samples: list[PlannedSample], examples: int = 5) -> dict:
    """What a run of this config will make, before any weights are loaded; `samples` are the
    first ones planned (the preflight's)."""
    looked_at = len(samples)
    room = plan.layout.room
    tokens = [plan.layout.count(s.prompt) for s in samples]
    names = config.class_names()
    return {
        "samples": config.output.samples,
        "shards": config.num_shards,
        "shard_size": config.output.shard_size,
        "classes": {names[k]: n for k, n in plan.builder.concept_counts(config.output.samples).items()},
        "token_limit": room,
        "max_prompt_tokens": max(tokens),
        "truncated_prompts": [s.prompt for s, n in zip(samples, tokens) if n > room],
        "prompts_checked": looked_at,
        "examples": [
            {"key": s.key, "prompt": s.prompt, "background_prompt": s.background_prompt, "tokens": n}
            for s, n in zip(samples[:examples], tokens)
        ],
    }


def planned_keys(config: RunConfig) -> list[str]:
    return [sample_key(i) for i in range(config.output.samples)]
