"""Building blocks that several selectors share: an even lattice over a token grid, density-peak clustering
(DPC-KNN) and largest-remainder rounding. Each is written once here, so that no method imports another's module."""

from __future__ import annotations

import math

import torch

from .base import top_k


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


def dpc_knn(x: torch.Tensor, clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours (DPC-KNN) of the rows of ``x`` (m, C).

    Distances ``||x_i - x_j|| / sqrt(C)``; density ``exp(-mean of the squared distances to the k nearest rows``
    (itself included)); ``delta`` = distance to the nearest denser row (the largest distance for the densest);
    centres = the ``clusters`` rows with the largest ``delta * density``; every row joins its nearest centre.
    Returns ``(centres, assignment)`` with ``assignment[i]`` an index into ``centres``. Needs the m x m distance
    matrix, as the method does (m is a fraction of the deleted tokens). Ties go to the lower index (the official
    code adds tiny random noise to densities instead).
    """
    x = x.float()
    distance = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = torch.topk(distance, min(k, x.shape[0]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, distance, distance.max()).min(-1).values
    centres = top_k((delta * density).cpu(), clusters)
    assignment = distance[:, centres.to(distance.device)].argmin(-1).cpu()
    assignment[centres] = torch.arange(clusters)
    return centres, assignment


def ascending_clusters(x: torch.Tensor, clusters: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dpc_knn` with the centres in ascending row order: ``(centres, assignment)``, ``assignment[i]`` the index
    into ``centres`` of row ``i``'s cluster."""
    centres, assignment = dpc_knn(x, clusters, k)
    order = torch.argsort(centres)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(clusters)
    return centres[order], rank[assignment]


def largest_remainder(quotas: list[float], caps: list[int], total: int) -> list[int]:
    """Integers ``c_i <= caps[i]`` summing to ``min(total, sum(caps))``: the floors of ``quotas``, then one more to
    the largest fractional parts (ties to the lower index), then to any group with room left."""
    counts = [min(math.floor(q), cap) for q, cap in zip(quotas, caps, strict=True)]
    left = min(total, sum(caps)) - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    for pass_ in range(2):
        for i in order:
            if left <= 0:
                return counts
            if counts[i] < caps[i] and (pass_ == 1 or quotas[i] > counts[i]):
                counts[i] += 1
                left -= 1
    return counts
