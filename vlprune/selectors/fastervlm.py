"""FasterVLM (Zhang et al., https://arxiv.org/abs/2412.01818, now VisPruner): keep the patches the vision tower's
[CLS] token attends to most, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import ScoringSelector


@register_selector("fastervlm")
@dataclass
class FasterVLM(ScoringSelector):
    """[CLS]→patch attention of one vision layer, mean over heads, top ``keep`` per image.

    ``vision_layer=None`` (default) uses the layer the model takes its features from (LLaVA: ``-2``), as the
    official code does; the [CLS]→[CLS] entry is dropped without renormalising.
    """

    vision_layer: int | None = None
    summary = "[CLS] attention at the vision feature layer, pre-LLM"
    paper = "https://arxiv.org/abs/2412.01818"

    def __post_init__(self) -> None:
        layer = self.vision_layer
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"vision_layer must be an int or None, got {self.vision_layer!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("cls_attention", self.vision_layer)]

    def score(self, view: TokenView) -> torch.Tensor:
        return view.cls_attention[self.vision_layer]
