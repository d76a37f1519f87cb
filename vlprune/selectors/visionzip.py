"""VisionZip (Yang et al., CVPR 2025, https://arxiv.org/abs/2412.04467): dominant tokens by [CLS] attention, the
[CLS] state itself included, plus a few contextual tokens that merge the rest by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selection, Selector, only_layer0, top_k


def split_budget(keep: int, dominant: int | None, contextual: int | None) -> tuple[int, int]:
    """``(dominant, contextual)`` for a budget: the official LLaVA-1.5 splits are 162+30, 108+20 and 54+10, i.e.
    ``contextual = round(5 * keep / 32)``; one given value fixes the other."""
    if dominant is None and contextual is None:
        contextual = round(5 * keep / 32)
    if contextual is None:
        contextual = keep - dominant
    return keep - contextual, contextual


def visionzip_merge(
    cls_attention: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's choice for one image of ``n`` patches.

    Returns ``(dominant_patches, targets, assignment)``: the ``dominant - 1`` patches with the largest [CLS]
    attention (ascending; the [CLS] state is the remaining dominant token), the ``contextual`` target patches taken
    at a uniform stride ``max(1, r // contextual)`` over the ``r`` remaining patches (in index order), and for each
    remaining non-target patch (ascending), the index into ``targets`` of the target whose L2-normalised key has the
    largest dot product with its own.
    """
    n = cls_attention.shape[0]
    dominant_patches = torch.sort(top_k(cls_attention, dominant - 1)).values
    rest = torch.ones(n, dtype=torch.bool)
    rest[dominant_patches] = False
    remaining = torch.nonzero(rest).flatten()
    if contextual == 0:
        return dominant_patches, remaining[:0], remaining[:0]
    step = max(1, remaining.numel() // contextual)
    positions = torch.arange(0, remaining.numel(), step)[:contextual]
    targets = remaining[positions]
    others = remaining[~torch.isin(remaining, targets)]
    metric = F.normalize(keys.float(), dim=-1)
    similarity = metric[others.to(metric.device)] @ metric[targets.to(metric.device)].T  # (others, contextual)
    return dominant_patches, targets, similarity.argmax(-1).cpu()


@register_selector("visionzip")
@dataclass
class VisionZip(Selector):
    """VisionZip on the vision feature layer (the penultimate CLIP layer in LLaVA-1.5), before the projector.

    Of a budget ``keep``: ``dominant`` tokens = the [CLS] state plus the ``dominant - 1`` patches it attends to most
    (head mean here, head sum in the official code: the same ranking), and ``contextual`` tokens, each
    ``h_target + mean(h_assigned)`` (the official arithmetic: the target's own state plus the mean of the patches
    assigned to it, not an average over all). The LLM receives them in the official order, [CLS], dominant patches
    in raster order, contextual tokens, in the first ``keep`` placeholder slots of the image: with
    ``positions="renumber"`` the positions equal the official contiguous numbering; with the default
    ``"original"`` the image's tokens are contiguous and the text after it keeps its original positions. Needs a
    tower with a [CLS] token. At ``keep >= n`` every patch is kept as is.
    """

    dominant: int | None = None
    contextual: int | None = None

    space = "vision"
    merges = True
    summary = "dominant tokens by [CLS] attention (+[CLS]) and key-similarity contextual merges, pre-projector"
    paper = "https://arxiv.org/abs/2412.04467"

    def __post_init__(self) -> None:
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"visionzip {name} must be None or an int >= 0, got {value!r}")
        if self.dominant is not None and self.dominant < 1:
            raise ValueError(f"visionzip dominant counts the [CLS] token, so it must be >= 1, got {self.dominant}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        only_layer0("visionzip", layer)
        return [SignalRequest("cls_attention"), SignalRequest("vision_keys"), SignalRequest("vision_hidden", cls=True)]

    def count(self, view: TokenView, keep: int) -> int:
        if self.dominant is not None and self.contextual is not None:
            return min(view.n, self.dominant + self.contextual)
        return keep

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        n = view.n
        keep = min(self.count(view, keep), n)
        if keep >= n:
            return torch.arange(n)
        if view.cls_hidden is None:
            raise ValueError("visionzip needs the vision tower's [CLS] state")
        dominant, contextual = split_budget(keep, self.dominant, self.contextual)
        if dominant < 1 or contextual < 0:
            raise ValueError(
                f"visionzip cannot split keep={keep} into dominant={dominant} (>= 1, [CLS] included) "
                f"and contextual={contextual}"
            )
        (attention,) = view.cls_attention.values()
        patches, targets, assignment = visionzip_merge(attention, view.vision_keys, dominant, contextual)
        into = torch.full((n + 1,), -1, dtype=torch.long)  # sources: the n patches, then [CLS]
        weight = torch.zeros(n + 1)
        into[n], weight[n] = 0, 1.0
        into[patches], weight[patches] = torch.arange(1, dominant), 1.0
        into[targets], weight[targets] = torch.arange(dominant, keep), 1.0
        if assignment.numel():
            others = torch.nonzero(into[:n] < 0).flatten()
            sizes = torch.bincount(assignment, minlength=contextual).float()
            into[others] = dominant + assignment
            weight[others] = 1.0 / sizes[assignment]
        return Selection(torch.arange(keep), into, weight)
