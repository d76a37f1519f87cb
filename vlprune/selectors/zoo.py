"""ZOO-Prune (Kim et al., CVPR 2026, https://arxiv.org/abs/2509.24837): zeroth-order estimate of each visual
token's sensitivity through the projector, combined greedily with diversity. No official code is published; this
follows the paper."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selector

ROWS_PER_CALL = 1 << 17  # projector rows per call in sensitivity()


def sensitivity(
    x: torch.Tensor, project: Callable, directions: int, step: float, seed: int, chunk: int | None = None
) -> torch.Tensor:
    """``S(i) = mean_j || (M(x_i + h u_j) - M(x_i - h u_j)) / 2h ||_2`` for each row of ``x`` (n, Dv), with ``m =
    directions`` random unit directions ``u_j`` (seeded, shared by all tokens) and ``h = step``, in fp32.

    ``chunk`` directions are pushed through the projector per call; by default as many as fit in 2^17 rows (all
    64 in one call for a 576-token image), so memory is O(chunk * n * D)."""
    x = x.float()
    if chunk is None:
        chunk = max(1, min(directions, ROWS_PER_CALL // (2 * max(1, x.shape[0]))))
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(directions, x.shape[-1], generator=g), dim=-1).to(x.device)  # (m, Dv)
    total = torch.zeros(x.shape[0], device=x.device)
    for start in range(0, directions, chunk):
        du = step * u[start : start + chunk, None, :]  # (c, 1, Dv)
        both = torch.cat([x[None] + du, x[None] - du]).reshape(-1, x.shape[-1])  # (2c*n, Dv)
        plus, minus = project(both).reshape(2, du.shape[0], x.shape[0], -1).unbind(0)
        total += ((plus - minus) / (2 * step)).norm(dim=-1).sum(0)
    return total / directions


def sensitivity_diversity_greedy(scores: torch.Tensor, features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy: the most sensitive token first, then repeatedly ``argmax_i S(i) * (1 - max_{j chosen} cos(z_i,
    z_j))``. ``scores`` are min-max normalised first. O(n) memory (a running maximum cosine per token) and O(n D)
    per step on the scores' device, with no host round-trip (the pick stays a 1-element tensor)."""
    s = scores.float()
    spread = s.max() - s.min()
    s = torch.where(spread > 0, (s - s.min()) / spread.clamp_min(torch.finfo(s.dtype).tiny), torch.ones_like(s))
    z = F.normalize(features.float(), dim=-1).to(s.device)
    chosen = torch.empty(k, dtype=torch.long, device=s.device)
    taken = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    closest = torch.full_like(s, float("-inf"))  # max cosine to the chosen set
    pick = s.argmax().view(1)
    for step in range(k):
        chosen[step : step + 1] = pick
        taken.index_fill_(0, pick, True)
        closest = torch.maximum(closest, z @ z.index_select(0, pick)[0])
        pick = (s * (1 - closest)).masked_fill(taken, float("-inf")).argmax().view(1)
    return chosen.cpu()


@register_selector("zoo")
@dataclass
class ZOO(Selector):
    """ZOO-Prune before the LLM: sensitivity of each token's projector output to ``directions`` random unit
    perturbations of its vision feature (central differences with step ``step``, always in fp32 since a 0.01 step
    is near bf16 resolution), min-max normalised, then chosen greedily with a cosine diversity factor on the
    projected tokens. ``seed`` fixes the directions."""

    directions: int = 64
    step: float = 0.01
    seed: int = 0

    merges = False
    summary = "zeroth-order projector sensitivity x diversity, greedy, pre-LLM"
    paper = "https://arxiv.org/abs/2509.24837"

    def __post_init__(self) -> None:
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise ValueError(f"zoo directions must be an int >= 1, got {self.directions!r}")
        if not isinstance(self.step, (int, float)) or not self.step > 0:
            raise ValueError(f"zoo step must be a float > 0, got {self.step!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("projector"), SignalRequest("features")]

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        scores = sensitivity(view.vision_hidden, view.project, self.directions, self.step, self.seed)
        return sensitivity_diversity_greedy(scores, view.features, keep)
