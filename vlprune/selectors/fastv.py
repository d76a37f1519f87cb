"""FastV (Chen et al., ECCV 2024, https://arxiv.org/abs/2403.06764): keep the visual tokens that the last prompt
token attends to most in decoder layer K-1, and drop the rest before layer K."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import ScoringSelector


@register_selector("fastv")
@dataclass
class FastV(ScoringSelector):
    """FastV's in-LLM rule.

    With ``layer=K`` (default 2, the paper's K), the score of a visual token is the attention it receives from the
    last prompt token in decoder layer ``K-1``, averaged over heads (the official code's in-place variant); the
    top ``keep`` per image survive and layers ``K..`` see only them. Kept tokens keep their original positions.
    """

    default_layer = 2
    summary = "last prompt token's attention at decoder layer K-1, pruned before layer K"
    paper = "https://arxiv.org/abs/2403.06764"

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer < 1:
            raise ValueError(
                f"fastv scores tokens with decoder layer K-1 and prunes before layer K, so layer must be >= 1, "
                f"got layer={layer}"
            )
        return [SignalRequest("llm_attention", layer - 1)]

    def score(self, view: TokenView) -> torch.Tensor:
        return next(iter(view.llm_attention.values()))
