"""Ragged per-sample keep indices, packed once so that a kernel (or the reference) can place them left-padded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ragged:
    """Per-sample ascending indices into a sequence, packed.

    Attributes
    ----------
    flat : LongTensor (N,)
        Every sample's indices, one sample after another.
    counts : LongTensor (B,)
        How many indices each sample keeps.
    starts : LongTensor (B,)
        Where each sample's indices begin in ``flat``.
    length : int
        The compacted length ``L'`` (the largest count): sample ``b`` fills the last ``counts[b]`` slots.
    """

    flat: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    length: int

    @property
    def batch(self) -> int:
        return self.counts.shape[0]

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, valid)``, both (B, L'): the input slot each output slot reads (0 where padded) and whether it is
        a kept token (False for the left padding)."""
        j = torch.arange(self.length, device=self.flat.device)
        pad = (self.length - self.counts)[:, None]  # (B, 1)
        valid = j >= pad  # (B, L')
        at = (self.starts[:, None] + j - pad).clamp(min=0, max=max(self.flat.numel() - 1, 0))
        if self.flat.numel() == 0:
            return torch.zeros_like(valid, dtype=torch.long), valid
        return torch.where(valid, self.flat[at], 0), valid

    def sample_of(self) -> torch.Tensor:
        """(N,) the sample each entry of ``flat`` belongs to."""
        return torch.repeat_interleave(torch.arange(self.batch, device=self.flat.device), self.counts)

    def out_slot(self) -> torch.Tensor:
        """(N,) the output slot each entry of ``flat`` is written to."""
        sample = self.sample_of()
        within = torch.arange(self.flat.numel(), device=self.flat.device) - self.starts[sample]
        return self.length - self.counts[sample] + within


def pack(keep: Sequence[torch.Tensor] | Ragged, length: int, device: torch.device) -> Ragged:
    """Pack ``keep[b]`` (ascending indices into a sequence of ``length`` tokens) for every sample ``b``.

    Raises ``TypeError`` for non-integer indices and ``ValueError`` for indices outside ``[0, length)``.
    """
    if isinstance(keep, Ragged):
        return keep
    if isinstance(keep, torch.Tensor) or not isinstance(keep, Sequence) or not keep:
        raise TypeError(f"keep must be a non-empty list of 1-D index tensors (one per sample), got {type(keep)}")
    for b, k in enumerate(keep):
        if not isinstance(k, torch.Tensor) or k.dim() != 1 or k.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"keep[{b}] must be a 1-D integer tensor, got {getattr(k, 'dtype', type(k))}")
    counts = torch.tensor([k.numel() for k in keep], dtype=torch.long)
    flat = torch.cat([k.to(device=device, dtype=torch.long) for k in keep])
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= length):
        raise ValueError(f"keep indices must lie in [0, {length}), got [{int(flat.min())}, {int(flat.max())}]")
    starts = torch.cumsum(counts, 0) - counts
    return Ragged(flat, counts.to(device), starts.to(device), int(counts.max()))


@dataclass(frozen=True)
class MergeTable:
    """Merge plans in the compacted layout, grouped by output slot (CSR), so that every output slot sums its own
    sources in a fixed order without atomics.

    Attributes
    ----------
    start, count : LongTensor (B, L')
        The sources of output slot ``(b, j)`` are ``source[start[b, j] : start[b, j] + count[b, j]]``; ``count`` 0
        means a plain gather.
    source : LongTensor (M,)
        Input slot of each source (within its own sample).
    weight : FloatTensor (M,)
        fp32 weight of each source.
    """

    start: torch.Tensor
    count: torch.Tensor
    source: torch.Tensor
    weight: torch.Tensor


def merge_table(ragged: Ragged, merges: Sequence, length: int) -> MergeTable:
    """Group ``merges[b] = (sources, targets, weights)`` (or ``None``) by the output slot of each target.

    Sources keep their order within a target (a stable sort), which is the order the reference accumulates in.
    Raises ``ValueError`` when a source is out of range or a target is not among the sample's kept indices.
    """
    device = ragged.flat.device
    b_count, new_len = ragged.batch, ragged.length
    if len(merges) != b_count:
        raise ValueError(f"merges must have one entry per sample ({b_count}), got {len(merges)}")
    out_of = torch.full((b_count, max(length, 1)), -1, dtype=torch.long, device=device)  # input slot -> output slot
    out_of[ragged.sample_of(), ragged.flat] = ragged.out_slot()
    keys, sources, weights = [], [], []
    for b, merge in enumerate(merges):
        if merge is None:
            continue
        src, dst, wts = (t.to(device) for t in merge)
        if not (src.shape == dst.shape == wts.shape) or src.dim() != 1:
            raise ValueError(f"merges[{b}]: sources, targets and weights must be 1-D of one length")
        ends = torch.cat([src, dst])
        if ends.numel() and (int(ends.min()) < 0 or int(ends.max()) >= length):
            raise ValueError(f"merges[{b}]: sources and targets must lie in [0, {length})")
        slot = out_of[b, dst]
        if slot.numel() and int(slot.min()) < 0:
            raise ValueError(f"merges[{b}]: every target must be a kept index")
        keys.append(b * new_len + slot)
        sources.append(src.long())
        weights.append(wts.float())
    count = torch.zeros(b_count * new_len, dtype=torch.long, device=device)
    if not keys:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return MergeTable(count.view(b_count, new_len), count.view(b_count, new_len), empty, empty.float())
    key = torch.cat(keys)
    order = torch.sort(key, stable=True).indices
    count += torch.bincount(key, minlength=b_count * new_len)
    start = torch.cumsum(count, 0) - count
    shape = (b_count, new_len)
    return MergeTable(start.view(shape), count.view(shape), torch.cat(sources)[order], torch.cat(weights)[order])
