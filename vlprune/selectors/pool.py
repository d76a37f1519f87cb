"""Average pooling baseline: the visual token grid pooled down to the budget. Plain downsampling, which benchmark
studies of token pruning (for example https://arxiv.org/abs/2506.10302) found to beat many published methods, so
every comparison should include it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import TokenView
from .base import Selection, Selector
from .shared import lattice


def pooled_grid(h: int, w: int, k: int) -> tuple[int, int]:
    """The ``(gh, gw)`` pooled grid for ``k`` cells on an ``h x w`` grid: a factor pair of ``k`` that fits
    (``gh <= h``, ``gw <= w``) with the closest aspect ratio; when none fits, the fitting grid with the fewest cells
    ``>= k`` (closest aspect ratio on ties)."""
    target = math.log(h / w)

    def distortion(pair):  # rounded so that mirrored pairs tie exactly; ties go to fewer rows
        return round(abs(math.log(pair[0] / pair[1]) - target), 9), pair[0]

    pairs = [(gh, k // gh) for gh in range(1, min(h, k) + 1) if k % gh == 0 and k // gh <= w]
    if pairs:
        return min(pairs, key=distortion)
    fits = [(gh, gw) for gh in range(1, h + 1) for gw in range(1, w + 1) if gh * gw >= k]
    return min(fits, key=lambda pair: (pair[0] * pair[1], *distortion(pair)))


def bands(size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, non-overlapping bands covering ``0..size-1``: ``[floor(i*size/parts),
    floor((i+1)*size/parts))`` (equal to ``avg_pool`` windows when ``parts`` divides ``size``)."""
    return [(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


@register_selector("pool")
@dataclass
class Pool(Selector):
    """Average-pool each image's token grid to ``keep`` cells.

    The grid is cut into ``gh x gw = keep`` non-overlapping windows (:func:`pooled_grid`, :func:`bands`); each
    window becomes the mean of its tokens, placed at the window's centre token (so positions stay in raster order).
    When ``keep`` has no factor pair that fits the grid, the smallest grid with more cells is pooled and ``keep`` of
    its cells are kept on a regular lattice (the others are dropped). Tokens without a grid, or already thinned by an
    earlier stage, are pooled in 1-D runs of consecutive candidates. Acts on the decoder's hidden states at its
    layer (``layer=0``: the projected visual tokens).
    """

    merges = True
    summary = "average-pool the token grid to the budget (baseline)"
    paper = "https://arxiv.org/abs/2506.10302"

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        n = view.n
        if keep >= n:
            return torch.arange(n)
        if view.grid is not None and view.grid[0] * view.grid[1] == n:
            h, w = view.grid
            gh, gw = pooled_grid(h, w, keep)
            cells = [(r, c) for r in bands(h, gh) for c in bands(w, gw)]
            chosen = lattice(gh, gw, keep) if gh * gw > keep else torch.arange(keep)
            cells = [cells[int(i)] for i in torch.sort(chosen).values]
        else:
            cells = [((0, 1), band) for band in bands(n, keep)]
            w = n
        into = torch.full((n,), -1, dtype=torch.long)
        weight = torch.zeros(n)
        centres = []
        for i, ((r0, r1), (c0, c1)) in enumerate(cells):
            rows, cols = torch.arange(r0, r1), torch.arange(c0, c1)
            members = (rows[:, None] * w + cols[None, :]).flatten()
            into[members] = i
            weight[members] = 1.0 / members.numel()
            centres.append((r0 + (r1 - r0 - 1) // 2) * w + c0 + (c1 - c0 - 1) // 2)
        return Selection(torch.tensor(centres), into, weight)
