"""The per-call state of a wrapped model, owned by its :class:`vlprune.api.Pruned` handle: what one forward call
has seen so far (:class:`Call`) and what decoding after a pruned prefill needs (:class:`Session`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import compaction


@dataclass
class Call:
    """State of one forward call of the wrapped model."""

    prefill: bool
    attention_mask: torch.Tensor | None
    cache: Any
    visual: torch.Tensor | None = None  # (B, L) placeholder mask; layouts are derived on first use
    layouts: list | None = None
    segment: compaction.Segment | None = None
    llm: dict[str, dict] = field(default_factory=dict)  # signal -> {layer: (slot rows then, value)}
    embeddings: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)  # decode: (segment id, layer kind) -> mask
    positions: dict = field(default_factory=dict)  # decode, renumbered: segment id -> (position_ids, cos, sin)
    cache_key_mask: torch.Tensor | None = None  # decode, cache stage: (B, Lk) mask of the scored layer
    cache_scores: torch.Tensor | None = None  # decode, cache stage: (B, Lk) the new token's attention there
    cache_keep: torch.Tensor | None = None  # decode, cache stage: (B, Lk) entries the later layers attend to


@dataclass
class Session:
    """What decoding after a pruned prefill needs: the segment each decoder layer saw."""

    full_length: int
    layer_segment: dict[int, compaction.Segment]
    cache_back: int = 0  # a stage at this layer drops its tokens from the earlier layers' cache after the prefill
