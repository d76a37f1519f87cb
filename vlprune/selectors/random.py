"""Random baseline: keep a seeded uniformly random subset of each image's tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import TokenView
from .base import Selector


@register_selector("random")
@dataclass
class Random(Selector):
    """Keep ``keep`` tokens drawn uniformly at random without replacement.

    The generator of each image is seeded with ``seed + image`` (the image's ordinal within its sample), so a
    sample gets the same choice alone or in a batch. Benchmark studies (UniPruneBench, arXiv 2511.02650) found
    random pruning a strong baseline.
    """

    seed: int = 0
    summary = "seeded uniformly random subset (baseline)"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + view.image)
        return torch.randperm(view.n, generator=generator)[:keep]
