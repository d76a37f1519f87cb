"""The dispatching ops of :mod:`vlprune.kernels` (re-exported there): Triton on CUDA, the reference elsewhere."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence

import torch

from . import reference
from .ragged import MergeTable, Ragged, merge_table, pack
from .reference import Compacted

__all__ = ["Compacted", "MergeTable", "Ragged", "backend", "compact", "gather_cache", "merge_compact", "pack"]

logger = logging.getLogger(__name__)
_MODES = ("auto", "reference", "triton")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_ops():
    """The Triton module, or ``None`` when Triton does not import."""
    try:
        from . import triton_ops
    except ImportError as error:  # no Triton (macOS, Windows, a CPU-only install)
        logger.debug("Triton unavailable, using the PyTorch reference: %s", error)
        return None
    return triton_ops


def backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"``: what the ops run with for tensors on ``device`` (see the module doc)."""
    mode = os.environ.get("VLPRUNE_KERNELS", "auto")
    if mode not in _MODES:
        raise ValueError(f"VLPRUNE_KERNELS={mode!r}; allowed: {', '.join(_MODES)}")
    if mode == "reference":
        return "reference"
    if mode == "triton":
        if _triton_ops() is None:
            raise ImportError("VLPRUNE_KERNELS=triton but Triton does not import; pip install triton")
        return "triton"
    return "triton" if torch.device(device).type == "cuda" and _triton_ops() is not None else "reference"


def _check_tokens(hidden, mask, rows, position_ids, cos, sin) -> None:
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.dtype not in _FLOATS:
        got = f"{tuple(hidden.shape)} {hidden.dtype}" if isinstance(hidden, torch.Tensor) else type(hidden)
        raise TypeError(f"hidden must be a (B, L, D) float32/float16/bfloat16 tensor, got {got}")
    batch, length = hidden.shape[:2]
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape[-1] != length or mask.dim() != 2:
        raise TypeError(f"mask must be a (B, {length}) bool tensor, got {getattr(mask, 'shape', type(mask))}")
    if rows is not None and (rows.dim() != 2 or rows.shape[-1] != length):
        raise ValueError(f"rows must be (B, {length}), got {tuple(rows.shape)}")
    if position_ids is not None and (position_ids.dim() not in (2, 3) or position_ids.shape[-1] != length):
        raise ValueError(f"position_ids must be (B, {length}) or (R, B, {length}), got {tuple(position_ids.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (t.dim() != 3 or t.shape[1] != length or t.shape[0] not in (1, batch)):
            raise ValueError(f"{name} must be (B or 1, {length}, W), got {tuple(t.shape)}")


def compact(
    keep: Sequence[torch.Tensor] | Ragged,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> Compacted:
    """Keep ``keep[b]`` of each sample's tokens in every per-token tensor at once, left-padded.

    Parameters
    ----------
    keep : per sample, ascending input slots (or a :class:`Ragged` from :func:`pack`).
    hidden : (B, L, D) float; mask : (B, L) bool, ``True`` for real tokens.
    rows : (B, L) int, optional; position_ids : (B, L) or (R, B, L) int (M-RoPE rows), optional.
    cos, sin : (B or 1, L, W), optional (both or neither).

    Returns
    -------
    :class:`Compacted` with the new mask (kept and real).
    """
    return merge_compact(keep, None, hidden, mask, rows=rows, position_ids=position_ids, cos=cos, sin=sin)


def merge_compact(
    keep: Sequence[torch.Tensor] | Ragged,
    merges: Sequence | None,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
) -> Compacted:
    """:func:`compact`, and each sample's merge plan ``merges[b] = (sources, targets, weights)`` (or ``None``):
    every target (a kept slot) becomes ``sum(weight * hidden[source])`` over its sources, accumulated in fp32 in
    the order given (so the result is deterministic; include the target itself among its sources to keep it).
    """
    _check_tokens(hidden, mask, rows, position_ids, cos, sin)
    ragged = pack(keep, hidden.shape[1], hidden.device)
    if ragged.batch != hidden.shape[0]:
        raise ValueError(f"keep has {ragged.batch} samples but hidden has {hidden.shape[0]}")
    if merges is not None and all(m is None for m in merges):
        merges = None
    table = merge_table(ragged, merges, hidden.shape[1]) if merges is not None else None  # also validates them
    if backend(hidden.device) == "reference":
        return reference.compact(ragged, hidden, mask, rows, position_ids, cos, sin, merges)
    return _triton_ops().compact(ragged, hidden, mask, rows, position_ids, cos, sin, table)


def gather_cache(
    keep: Sequence[torch.Tensor] | Ragged, tensors: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Keep ``keep[b]`` of each sample's positions in every (B, H, L, d) key/value tensor of a list of cache layers
    in one launch. All tensors share shape, dtype, strides and device.

    Returns the compacted tensors (B, H, L', d), zeros on padding, and the (B, L') bool mask of kept slots.
    """
    if isinstance(tensors, torch.Tensor) or not tensors:
        raise TypeError("tensors must be a non-empty list of (B, H, L, d) tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.dtype not in _FLOATS:
            raise TypeError(f"tensors[{i}] must be a (B, H, L, d) float tensor, got {getattr(t, 'shape', type(t))}")
        if (t.shape, t.dtype, t.stride(), t.device) != (first.shape, first.dtype, first.stride(), first.device):
            raise ValueError(f"tensors[{i}] differs from tensors[0] in shape, dtype, strides or device")
    ragged = pack(keep, first.shape[2], first.device)
    if ragged.batch != first.shape[0]:
        raise ValueError(f"keep has {ragged.batch} samples but the cache has {first.shape[0]}")
    valid = ragged.slots()[1]
    if backend(first.device) == "reference":
        return reference.gather_cache(ragged, tensors), valid
    return _triton_ops().gather_cache(ragged, tensors), valid
