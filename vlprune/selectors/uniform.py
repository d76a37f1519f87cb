"""Uniform baseline: keep tokens evenly spread over the image's token grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import TokenView
from .base import Selector
from .shared import lattice


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
