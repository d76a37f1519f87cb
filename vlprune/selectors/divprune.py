"""DivPrune (Alvar et al., CVPR 2025, https://arxiv.org/abs/2503.02175): keep a maximally diverse subset of the
projected visual tokens (greedy max-min diversity, cosine distance)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selector


def max_min_greedy(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Greedy max-min diversity selection of ``k`` rows of ``features`` (n, D) under cosine distance ``1 - cos``.

    First pick, as in the official code: the token whose nearest other token is farthest. Then repeatedly the token
    whose distance to the chosen set (its minimum distance to a chosen token) is largest. The official code builds
    the n x n distance matrix; this form keeps one running minimum per token, O(n) memory (the first pick streams
    the nearest-neighbour search in chunks of ``chunk`` rows), with the same choices.
    """
    x = F.normalize(features.float(), dim=-1)  # (n, D)
    n = x.shape[0]
    if k >= n:
        return torch.arange(n)
    nearest = torch.empty(n, device=x.device)  # distance of each token to its nearest other token
    for start in range(0, n, chunk):
        sim = x[start : start + chunk] @ x.T  # (c, n)
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + start] = float("-inf")
        nearest[start : start + chunk] = 1 - sim.max(dim=1).values
    # Each step is O(n D) and stays on the device: the pick is a 1-element tensor (no host round-trip), and only the
    # new pick is masked (a chosen token's distance is -inf, which the running minimum keeps).
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    pick = nearest.argmax().view(1)
    distance = torch.full((n,), float("inf"), device=x.device)  # (n,) distance to the chosen set
    for step in range(k):
        chosen[step : step + 1] = pick
        distance = torch.minimum(distance, 1 - x @ x.index_select(0, pick)[0])
        distance.index_fill_(0, pick, float("-inf"))
        pick = distance.argmax().view(1)
    return chosen.cpu()


@register_selector("divprune")
@dataclass
class DivPrune(Selector):
    """Max-min diverse subset of the projected visual tokens of each image, before the LLM (the paper's layer 0)."""

    summary = "greedy max-min diversity of projected tokens (cosine), pre-LLM"
    paper = "https://arxiv.org/abs/2503.02175"

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("features")]

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        return max_min_greedy(view.features, keep)
