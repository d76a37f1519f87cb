"""PyramidDrop (Xing et al., CVPR 2025, https://arxiv.org/abs/2410.17247): drop visual tokens in stages inside the
LLM, ranked by the last instruction token's attention as the next layer would compute it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import ScoringSelector


@register_selector("pdrop")
@dataclass
class PDrop(ScoringSelector):
    """One PyramidDrop stage before decoder layer ``L``.

    The score of a visual token is the attention the last prompt token gives it in layer ``L`` itself, recomputed
    from layer ``L``'s input with that layer's input norm, q/k projections and rotary embedding (the official code
    ranks "with the next layer" at the end of layer ``L-1``), softmax over all keys, mean over heads. The paper's
    schedule is three stages, at layers 8, 16 and 24, each keeping half of the visual tokens (576 -> 288 -> 144 ->
    72 on LLaVA-1.5): see the ``pdrop-*`` presets, which also renumber positions contiguously as the official code
    does.
    """

    default_layer = 8
    summary = "last instruction token's attention recomputed at the stage layer; staged (8/16/24 by default)"
    paper = "https://arxiv.org/abs/2410.17247"

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer < 1:
            raise ValueError(f"pdrop ranks tokens inside the LLM: layer must be >= 1, got {layer}")
        return [SignalRequest("incoming_attention")]

    def score(self, view: TokenView) -> torch.Tensor:
        return view.incoming_attention
