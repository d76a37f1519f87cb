"""PyTorch references: the specification every kernel is tested against, and what runs where Triton does not.

Output layout: sample ``b`` keeps ``counts[b]`` tokens, right-aligned in ``L' = max(counts)`` slots (left padding).
A padding slot reads input slot 0 for hidden states and rotary tables (finite values the masks never let through),
and gets position id 1, row -1 and mask ``False``. Cache padding is zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .ragged import Ragged


class Compacted(NamedTuple):
    """What :func:`compact` and :func:`merge_compact` return; an input given as ``None`` comes back as ``None``.

    Attributes
    ----------
    hidden : (B, L', D)
    mask : BoolTensor (B, L')
        Kept and real in the input (the input mask gathered), ``False`` on padding.
    rows : LongTensor (B, L') or None
        The input's ``rows`` gathered, -1 on padding.
    position_ids : LongTensor (B, L') or (R, B, L') or None
        Gathered (every row), 1 on padding.
    cos, sin : (B, L', W) or None
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor | None
    position_ids: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B or 1, L, ...) gathered along dim 1 by ``index`` (B, L') -> (B, L', ...)."""
    if x.shape[0] != index.shape[0]:
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


def compact(ragged: Ragged, hidden, mask, rows=None, position_ids=None, cos=None, sin=None, merges=None) -> Compacted:
    """Gather every per-token tensor to the kept tokens; with ``merges[b] = (sources, targets, weights)``, each
    target's hidden state becomes the fp32 sum of ``weight * hidden[source]`` over its sources, in their order."""
    index, valid = ragged.slots()  # (B, L') each
    out = gather_tokens(hidden, index)
    for b, merge in enumerate(merges or ()):
        if merge is not None:
            out[b] = _merge_one(hidden[b], out[b], ragged, b, *merge)
    kept_mask = valid & torch.gather(mask.expand(index.shape[0], -1), 1, index)
    if rows is not None:
        rows = torch.where(valid, torch.gather(rows.expand(index.shape[0], -1), 1, index), -1)
    if position_ids is not None:
        many = position_ids.dim() == 3
        ids = position_ids if many else position_ids[None]  # (R, B|1, L)
        ids = ids.expand(ids.shape[0], index.shape[0], ids.shape[2])
        ids = torch.gather(ids, 2, index[None].expand(ids.shape[0], -1, -1)).masked_fill(~valid, 1)
        position_ids = ids if many else ids[0]
    cos = gather_tokens(cos, index) if cos is not None else None
    sin = gather_tokens(sin, index) if sin is not None else None
    return Compacted(out, kept_mask, rows, position_ids, cos, sin)


def _merge_one(hidden, gathered, ragged: Ragged, b: int, sources, targets, weights) -> torch.Tensor:
    device = hidden.device
    n = int(ragged.counts[b])
    start = int(ragged.starts[b])
    kept = ragged.flat[start : start + n]
    targets_at = ragged.length - n + torch.searchsorted(kept, targets.to(device))
    unique, group = torch.unique(targets_at, return_inverse=True)
    acc = torch.zeros(unique.numel(), hidden.shape[-1], device=device, dtype=torch.float32)
    acc.index_add_(0, group, hidden[sources.to(device)].float() * weights.to(device).float()[:, None])
    out = gathered.clone()
    out[unique] = acc.to(hidden.dtype)
    return out


def gather_cache(ragged: Ragged, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each (B, H, L, d) tensor gathered along ``L`` to (B, H, L', d), zeros on padding."""
    index, valid = ragged.slots()
    out = []
    for x in tensors:
        b, h, _, d = x.shape
        idx = index[:, None, :, None].expand(b, h, index.shape[1], d)
        out.append(torch.where(valid[:, None, :, None], torch.gather(x, 2, idx), 0))
    return out
