"""VisPruner (Zhang et al., ICCV 2025, https://arxiv.org/abs/2412.01818, the revision of FasterVLM): the patches the
vision tower's [CLS] attends to most, then diverse ones from the rest by removing near-duplicates, before the LLM.

Follows the release ``Theia-4869/VisPruner`` at commit ``aefa01adc7c7ce6334e880c88225e90cede760d1``,
``llava/model/llava_arch.py::encode_images`` (and ``multimodal_encoder/clip_encoder.py::feature_select`` for the
signals: the [CLS] row of the feature layer's attention, ``attentions[-2][:, :, 0, 1:]`` mean over heads, and that
layer's patch states, the projector's input).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selector, check_params

STEP = 8  # near-duplicates removed per round, as in the release


def remove_duplicates(features: torch.Tensor, candidates: torch.Tensor, keep: int, step: int = STEP) -> torch.Tensor:
    """The release's iterative matching: while more than ``keep`` of ``candidates`` (indices into ``features``
    (n, D), in the order given) remain, split them alternately into ``a`` (even places) and ``b`` (odd places),
    score each ``a`` by its largest cosine similarity to any ``b``, and drop the ``min(step, remaining - keep)`` most
    similar ``a``; the survivors are the other ``a`` (least similar last dropped, in descending score order) then
    every ``b``. Returns the ``keep`` survivors."""
    x = F.normalize(features.float(), dim=-1)
    residual = candidates
    while keep > 0:
        r = min(step, residual.numel() - keep, (residual.numel() + 1) // 2)  # never more than ``a`` holds
        if r <= 0:
            break
        a, b = residual[::2], residual[1::2]
        scores = (x[a] @ x[b].T).max(dim=-1).values  # (|a|,)
        distinct = torch.argsort(scores, descending=True, stable=True)[r:]
        residual = torch.cat([a[distinct.to(a.device)], b])
    return residual


@register_selector("vispruner")
@dataclass
class VisPruner(Selector):
    """``int(keep * important_ratio)`` important patches by [CLS] attention at the vision feature layer, then the
    other ``keep - int(keep * important_ratio)`` from the remaining patches by removing near-duplicates of their
    feature-layer states (:func:`remove_duplicates`), per image, before the LLM.

    Deviations, none of which the release's LLaVA-1.5 settings reach: an odd number of remaining patches, which the
    release's indexing cannot take (it assumes an even count, as ``576 - keep`` is for an even budget), splits as
    ``[::2]`` / ``[1::2]`` do; a round never drops more than ``a`` holds (the release fails there, on fewer than
    twice ``STEP`` patches left); ties in the attention and similarity orders go to the lower index
    (``torch.argsort`` leaves them unspecified).
    """

    important_ratio: float = 0.5
    summary = "[CLS]-attention important patches, then diverse ones by duplicate removal, pre-LLM"
    paper = "https://arxiv.org/abs/2412.01818"

    def __post_init__(self) -> None:
        check_params("vispruner", {"important_ratio": self.important_ratio})

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("cls_attention"), SignalRequest("vision_hidden")]

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        scores = view.cls_attention[None]
        order = torch.argsort(scores.float().cpu(), descending=True, stable=True)  # (n,)
        important = int(keep * self.important_ratio)
        chosen = order[:important]
        if keep > important:
            diverse = remove_duplicates(view.vision_hidden.cpu(), order[important:], keep - important)
            chosen = torch.cat([chosen, diverse])
        return torch.sort(chosen).values
