"""Uniform baseline: keep tokens evenly spread over the image's token grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import TokenView
from .base import Selector


def lattice(h: int, w: int, k: int) -> torch.Tensor:
    """Raster indices of ``k`` points spread evenly over an ``h x w`` grid.

    A ``gh x gw`` lattice of cell centres is laid over the grid with ``gh * gw >= k`` and the aspect ratio of the
    grid; when it has more than ``k`` points, ``k`` of them are taken evenly along its raster order.
    """
    scale = math.sqrt(k / (h * w))
    gh = min(h, max(1, math.ceil(h * scale - 1e-9)))
    gw = min(w, max(1, math.ceil(k / gh)))
    while gh * gw < k:  # only when a side hit the grid's size
        gh = min(h, gh + 1)
        gw = min(w, math.ceil(k / gh))
    rows = ((torch.arange(gh) + 0.5) * h / gh).floor().long()
    cols = ((torch.arange(gw) + 0.5) * w / gw).floor().long()
    points = (rows[:, None] * w + cols[None, :]).flatten()  # (gh * gw,)
    pick = ((torch.arange(k) + 0.5) * points.numel() / k).floor().long()
    return points[pick]


@register_selector("uniform")
@dataclass
class Uniform(Selector):
    """Keep ``keep`` tokens on an even lattice over the image's ``(h, w)`` token grid (1-D spacing when the tokens
    do not form a grid). Candidates already removed by an earlier stage are skipped: the lattice is laid over the
    remaining candidates' positions in raster order."""

    summary = "tokens evenly spread over the grid (baseline)"

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        full = view.grid is not None and view.n == view.grid[0] * view.grid[1]
        h, w = view.grid if full else (1, view.n)
        return lattice(h, w, keep)
