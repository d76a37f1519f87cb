"""VTC-CLS (Wang et al., https://arxiv.org/abs/2412.05819): [CLS] attention summed over a range of vision layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import ScoringSelector


@register_selector("vtc_cls")
@dataclass
class VTCCLS(ScoringSelector):
    """Sum over vision layers ``start_layer .. end_layer-1`` of the head-mean [CLS]→patch attention; top ``keep``.

    The official code slices ``attentions[start_layer:-1]``: from ``start_layer`` (its default 16 of CLIP-L's 24)
    up to and including the penultimate layer, so ``end_layer=-1`` by default. Negative values count from the end.
    """

    start_layer: int = 16
    end_layer: int = -1
    summary = "[CLS] attention summed over vision layers, pre-LLM"
    paper = "https://arxiv.org/abs/2412.05819"

    def __post_init__(self) -> None:
        for name in ("start_layer", "end_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")

    def vision_layers(self, depth: int) -> list[int]:
        """Absolute vision layer indices summed over, for a tower of ``depth`` layers."""
        start = self.start_layer % depth if -depth <= self.start_layer < depth else self.start_layer
        end = self.end_layer + depth if self.end_layer < 0 else self.end_layer
        if not 0 <= start < end <= depth:
            raise ValueError(
                f"vtc_cls sums vision layers start_layer..end_layer-1, which must be a non-empty range within the "
                f"tower's {depth} layers; got start_layer={self.start_layer}, end_layer={self.end_layer}"
            )
        return list(range(start, end))

    @classmethod
    def small_model_params(cls, vision_layers: int) -> dict:
        """A tower of at most 16 layers has no layer 16 to start from: sum from layer 0."""
        return {"start_layer": 0} if vision_layers <= cls.start_layer else {}

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("cls_attention", v) for v in self.vision_layers(vision_depth)]

    def score(self, view: TokenView) -> torch.Tensor:
        return torch.stack(list(view.cls_attention.values())).sum(0)
