"""SparseVLM (Zhang et al., ICML 2025, https://arxiv.org/abs/2410.04417): text-guided sparsification inside the
LLM. Text "raters" relevant to the image score the visual tokens at a few layers; part of what is deleted is
recycled into a few averaged tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selection, Selector
from .shared import dpc_knn


def choose_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Indices of the text tokens that rate: ``m = mean over visual tokens of softmax over text of V T^T``; raters
    are the text tokens with ``m > mean(m)``. ``visual`` (N, D) and ``text`` (t, D) are input embeddings."""
    relevance = (visual.float() @ text.float().T).softmax(-1).mean(0)  # (t,)
    return torch.nonzero(relevance > relevance.mean()).flatten()


def recycled_counts(deleted: int, ratio: float) -> tuple[int, int]:
    """``(recycled, clusters)`` for ``deleted`` tokens: the top ``int(ratio * deleted) + 1`` deleted tokens (by
    score) are recycled into ``int(recycled / 10) + 1`` clusters."""
    if deleted <= 0:
        return 0, 0
    recycled = min(deleted, int(ratio * deleted) + 1)
    return recycled, min(recycled, int(recycled / 10) + 1)


@register_selector("sparsevlm")
@dataclass
class SparseVLM(Selector):
    """One SparseVLM (v1.5) sparsification stage before decoder layer ``L``, scored by layer ``L-1``'s attention.

    Raters are chosen from the input embeddings (:func:`choose_raters`, the image's own visual tokens against the
    text after it); a visual token's score is the attention it receives from the raters in layer ``L-1``, mean over
    heads, then over raters. The top-scored tokens are kept. With ``recycle`` (default, as v1/v1.5), the best
    ``recycle_ratio`` of the deleted tokens (by score) are clustered with :func:`dpc_knn` and each cluster is
    averaged into one token placed at its centre token's position (the official code appends them after the kept
    visual tokens and renumbers). ``exact=True`` (default) makes kept + recycled equal the budget; ``exact=False``
    keeps the budget and adds the recycled tokens on top, as the paper counts.

    The paper's schedule (v1.5) prunes after layers 2, 6 and 15, i.e. stages at layers 3, 7 and 16: see the
    ``sparsevlm-*`` presets, whose per-stage counts make the layer average 192/128/64.
    """

    recycle: bool = True
    recycle_ratio: float = 0.3
    exact: bool = True

    default_layer = 3
    merges = True
    summary = "text raters' attention at layer L-1, with DPC-KNN recycling of deleted tokens (v1.5: L = 3, 7, 16)"
    paper = "https://arxiv.org/abs/2410.04417"

    def __post_init__(self) -> None:
        if not isinstance(self.recycle_ratio, (int, float)) or not 0 <= self.recycle_ratio <= 1:
            raise ValueError(f"sparsevlm recycle_ratio must be in [0, 1], got {self.recycle_ratio!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer < 1:
            raise ValueError(
                f"sparsevlm reads layer L-1's attention and prunes before layer L: layer must be >= 1, got {layer}"
            )
        return [
            SignalRequest("text_attention", layer - 1),
            SignalRequest("features"),
            SignalRequest("embeddings"),
            SignalRequest("hidden"),
        ]

    def split(self, n: int, keep: int) -> tuple[int, int, int]:
        """``(kept, recycled, clusters)`` for a budget ``keep`` of ``n`` candidates."""
        if not self.recycle or keep >= n:
            return keep, 0, 0
        if not self.exact:
            return (keep, *recycled_counts(n - keep, self.recycle_ratio))
        kept = keep
        while kept > 0 and kept + recycled_counts(n - kept, self.recycle_ratio)[1] > keep:
            kept -= 1
        recycled, clusters = recycled_counts(n - kept, self.recycle_ratio)
        return kept, recycled, min(clusters, keep - kept)

    def count(self, view: TokenView, keep: int) -> int:
        kept, _, clusters = self.split(view.n, keep)
        return kept + clusters

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        kept, recycled, clusters = self.split(view.n, keep)
        (attention,) = view.text_attention.values()  # (t, n)
        raters = choose_raters(view.all_features, view.text.embeddings)
        if raters.numel() == 0:  # no text after the image: every text row counts
            raters = torch.arange(attention.shape[0])
        scores = attention[raters.to(attention.device)].float().mean(0).cpu()
        order = torch.sort(scores, descending=True, stable=True).indices
        keep_idx = order[:kept]
        if clusters == 0:
            return keep_idx
        pool = order[kept : kept + recycled]  # the best-scored deleted tokens
        centres, assignment = dpc_knn(view.hidden[pool.to(view.hidden.device)], clusters, k=clusters)
        into = torch.full((view.n,), -1, dtype=torch.long)
        weight = torch.zeros(view.n)
        into[keep_idx], weight[keep_idx] = torch.arange(kept), 1.0
        sizes = torch.bincount(assignment, minlength=clusters).float()
        into[pool], weight[pool] = kept + assignment, 1.0 / sizes[assignment]
        return Selection(torch.cat([keep_idx, pool[centres]]), into, weight)
