"""Triton kernels for :mod:`vlprune.kernels` (imported only when dispatching to them).

Each is one memory-bound pass: one program per output token (compaction, merging) or per (layer, sample, head,
block of slots) (cache), reading ragged keep indices directly so no (B, L') index tensor is materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .ragged import MergeTable, Ragged
from .reference import Compacted

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _to_bf16(x):
    """fp32 -> bf16, round to nearest even, by bit arithmetic: exact on GPUs and in Triton's interpreter (whose own
    casts truncate). Finite inputs only (a NaN may come out as infinity)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _compact_kernel(
    flat, counts, starts, length,
    m_start, m_count, m_source, m_weight,
    x, sxb, sxl, sxd, y, dim,
    mask_in, smb, sml, mask_out,
    rows_in, srb, srl, rows_out,
    pos_in, spr, spb, spl, pos_out, batch,
    cos_in, scb, scl, scd, cos_out, sin_in, ssb, ssl, ssd, sin_out, width,
    MERGE: tl.constexpr, BF16: tl.constexpr, HAS_ROWS: tl.constexpr, POS_ROWS: tl.constexpr, HAS_ROPE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64)
    pad = length - tl.load(counts + b)
    valid = j >= pad
    src = tl.load(flat + tl.load(starts + b) + j - pad, mask=valid, other=0)  # input slot; 0 on padding
    slot = b * length + j  # output slots are contiguous (B, L')

    if MERGE:
        first = tl.load(m_start + slot)
        n_src = tl.load(m_count + slot)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < dim
        value = tl.load(x + b * sxb + src * sxl + d * sxd, mask=in_d)
        if MERGE:  # a fixed order per output slot: deterministic, no atomics
            acc = value.to(tl.float32) * 0.0  # (tl.zeros is not callable here under the 3.9 interpreter)
            for k in range(first, first + n_src):
                s = tl.load(m_source + k)
                w = tl.load(m_weight + k)
                acc += tl.load(x + b * sxb + s * sxl + d * sxd, mask=in_d, other=0.0).to(tl.float32) * w
            if BF16:
                merged = _to_bf16(acc)
            else:
                merged = acc.to(value.dtype)
            value = tl.where(n_src > 0, merged, value)
        tl.store(y + slot * dim + d, value, mask=in_d)

    tl.store(mask_out + slot, tl.load(mask_in + b * smb + src * sml, mask=valid, other=0))
    if HAS_ROWS:
        tl.store(rows_out + slot, tl.load(rows_in + b * srb + src * srl, mask=valid, other=-1))
    for r in tl.static_range(POS_ROWS):
        p = tl.load(pos_in + r * spr + b * spb + src * spl, mask=valid, other=1)
        tl.store(pos_out + r * batch * length + slot, p)
    if HAS_ROPE:
        w_off = tl.arange(0, BLOCK_W)
        in_w = w_off < width
        c = tl.load(cos_in + b * scb + src * scl + w_off * scd, mask=in_w)
        tl.store(cos_out + slot * width + w_off, c, mask=in_w)
        s_ = tl.load(sin_in + b * ssb + src * ssl + w_off * ssd, mask=in_w)
        tl.store(sin_out + slot * width + w_off, s_, mask=in_w)


def _batch_strides(t: torch.Tensor, batch: int) -> tuple[int, ...]:
    """Strides with a broadcast batch of 1 read as stride 0."""
    strides = list(t.stride())
    if t.shape[0] == 1 and batch != 1:
        strides[0] = 0
    return tuple(strides)


def compact(
    ragged: Ragged, hidden, mask, rows=None, position_ids=None, cos=None, sin=None, table: MergeTable | None = None
) -> Compacted:
    """The fused form of :func:`vlprune.kernels.reference.compact` (merging when ``table`` is given)."""
    batch, _, dim = hidden.shape
    length = ragged.length
    device = hidden.device
    y = torch.empty(batch, length, dim, dtype=hidden.dtype, device=device)
    mask_out = torch.empty(batch, length, dtype=torch.uint8, device=device)
    rows_out = torch.empty(batch, length, dtype=torch.long, device=device) if rows is not None else None
    pos = None if position_ids is None else (position_ids if position_ids.dim() == 3 else position_ids[None])
    pos_out = torch.empty(pos.shape[0], batch, length, dtype=pos.dtype, device=device) if pos is not None else None
    rope = cos is not None
    cos_out = torch.empty(batch, length, cos.shape[-1], dtype=cos.dtype, device=device) if rope else None
    sin_out = torch.empty(batch, length, sin.shape[-1], dtype=sin.dtype, device=device) if rope else None
    if length and batch:
        dummy = ragged.flat  # stands in for absent tensors; the kernel's constexpr flags never read it

        def table_args(t, out, n_strides):  # pointer, strides (batch 1 read as stride 0), output pointer
            return (t, *_batch_strides(t, batch), out) if t is not None else (dummy, *[0] * n_strides, dummy)

        merge = table if table is not None else MergeTable(dummy, dummy, dummy, dummy)
        width = cos.shape[-1] if rope else 1
        pos_strides = (pos.stride(0), *_batch_strides(pos[0], batch)) if pos is not None else (0, 0, 0)
        _compact_kernel[(batch, length)](
            ragged.flat, ragged.counts, ragged.starts, length,
            merge.start, merge.count, merge.source, merge.weight,
            hidden, *_batch_strides(hidden, batch), y, dim,
            *table_args(mask.view(torch.uint8), mask_out, 2),
            *table_args(rows, rows_out, 2),
            pos if pos is not None else dummy, *pos_strides, pos_out if pos is not None else dummy, batch,
            *table_args(cos, cos_out, 3), *table_args(sin, sin_out, 3), width,
            MERGE=table is not None, BF16=hidden.dtype == torch.bfloat16, HAS_ROWS=rows is not None,
            POS_ROWS=0 if pos is None else pos.shape[0], HAS_ROPE=rope,
            BLOCK_D=min(triton.next_power_of_2(dim), 1024), BLOCK_W=triton.next_power_of_2(width),
        )  # fmt: skip
    if pos_out is not None and position_ids.dim() == 2:
        pos_out = pos_out[0]
    return Compacted(y, mask_out.view(torch.bool), rows_out, pos_out, cos_out, sin_out)


@triton.jit
def _gather_cache_kernel(
    addresses, out, flat, counts, starts, length, heads, dim,
    sb, sh, sl, sd,
    ELEM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    j = tl.program_id(2).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    pad = length - tl.load(counts + b)
    in_l = j < length
    valid = in_l & (j >= pad)
    src = tl.load(flat + tl.load(starts + b) + j - pad, mask=valid, other=0)  # (BLOCK_L,)
    x = tl.load(addresses + t).to(tl.pointer_type(ELEM))  # this layer's tensor: one launch for all of them
    n_bh = tl.num_programs(1).to(tl.int64)
    row_out = out + ((t * n_bh + bh) * length + j) * dim  # (BLOCK_L,) pointers; output is contiguous
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        in_d = d < dim
        v = tl.load(
            x + b * sb + h * sh + src[:, None] * sl + d[None, :] * sd, mask=valid[:, None] & in_d[None, :], other=0
        )
        tl.store(row_out[:, None] + d[None, :], v, mask=in_l[:, None] & in_d[None, :])


def gather_cache(ragged: Ragged, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The fused form of :func:`vlprune.kernels.reference.gather_cache`: every tensor in one launch. The results
    are views of one buffer (T, B, H, L', d)."""
    first = tensors[0]
    batch, heads, _, dim = first.shape
    length = ragged.length
    out = torch.empty(len(tensors), batch, heads, length, dim, dtype=first.dtype, device=first.device)
    if length and batch and heads:
        addresses = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=first.device)
        block_l = 16
        grid = (len(tensors), batch * heads, triton.cdiv(length, block_l))
        _gather_cache_kernel[grid](
            addresses, out, ragged.flat, ragged.counts, ragged.starts, length, heads, dim, *first.stride(),
            ELEM=_TL_DTYPES[first.dtype], BLOCK_L=block_l, BLOCK_D=min(triton.next_power_of_2(dim), 128),
        )  # fmt: skip
    return list(out.unbind(0))
