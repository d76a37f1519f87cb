"""HiPrune (arXiv 2508.00553): hierarchical attention inside the vision encoder, before the LLM. Anchor tokens are
the patches a middle layer's attention (object-centric there) goes to most, their four neighbours are kept as
buffers, and the rest of the budget goes to the "register" patches a deep layer attends to globally.

Follows the release ``Danielement321/HiPrune`` at commit ``6e83a1240874e99a25df34f54221a29bb24b7bc2``,
``LLaVA/llava/model/llava_arch.py::encode_images`` (the attention read through
``multimodal_encoder/clip_encoder.py::feature_select``, ``output_attentions=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selector, check_params, top_k


@register_selector("hiprune")
@dataclass
class HiPrune(Selector):
    """Per image: ``round(keep * alpha / 5)`` anchors by the attention each patch receives at vision layer
    ``object_layer`` (mean over heads and queries, the [CLS] column dropped: ``received_attention``), each with its
    raster neighbours ``-1, +1, -w, +w`` (clamped to the image; not row-aware, as in the release), then the
    remaining budget by the received attention of the feature layer, the buffers excluded.

    ``object_layer`` counts from 0 (the release's 1-based ``HIPRUNE_OBJECT_LAYER=9`` is ``8``, its LLaVA-1.5 and
    LLaVA-NeXT setting; 16 on Qwen2.5-VL is ``15``). Deviations: ties go to the lower index (``torch.topk`` leaves
    them unspecified); anchors and buffers beyond the budget (a budget under ``5 / alpha`` with ``alpha`` near 1,
    where the release asks ``topk`` for a negative count) are cut to the budget, anchors first; the grid width is the
    image's own (the release writes 24, LLaVA-1.5's).
    """

    alpha: float = 0.1
    object_layer: int = 8
    summary = "anchor, buffer and register patches by a middle and the last vision layer's attention, pre-LLM"
    paper = "https://arxiv.org/abs/2508.00553"

    def __post_init__(self) -> None:
        check_params("hiprune", {"alpha": self.alpha})
        if isinstance(self.object_layer, bool) or not isinstance(self.object_layer, int):
            raise TypeError(f"hiprune object_layer must be an int, got {self.object_layer!r}")

    @classmethod
    def small_model_params(cls, vision_layers: int) -> dict:
        """A tower of at most 9 layers has no layer 8 below its feature layer: its middle layer instead."""
        return {"object_layer": vision_layers // 2} if vision_layers <= cls.object_layer + 1 else {}

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("received_attention", self.object_layer), SignalRequest("received_attention")]

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        shallow = view.received_attention[self.object_layer].float().cpu()
        deep = view.received_attention[None].float().cpu().clone()
        width = view.grid[1] if view.grid is not None else round(view.n**0.5)
        raster = view.index.cpu()
        full = view.grid[0] * view.grid[1] if view.grid is not None else view.n
        anchors = raster[top_k(shallow, min(round(keep * self.alpha / 5), view.n))]
        near = torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, full - 1)
        near = torch.tensor(list(dict.fromkeys(near.tolist())), dtype=torch.long)  # each once, anchors first
        slots = torch.searchsorted(raster, near)  # the buffers still among the candidates (an earlier stage)
        present = (slots < view.n) & (raster[slots.clamp(max=view.n - 1)] == near)
        chosen = slots[present][:keep]
        deep[chosen] -= 1  # the release's exclusion: the received attention is below 1, so they rank last
        rest = top_k(deep, keep - chosen.numel())
        return torch.sort(torch.cat([chosen, rest])).values
