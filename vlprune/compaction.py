"""Compaction: gather the per-token tensors a run of decoder layers sees down to the kept tokens, per sample,
left-padded, and build the attention masks those layers need in prefill and while decoding with their own
(shorter) KV cache. The gathering itself is :mod:`vlprune.kernels` (Triton on CUDA, PyTorch elsewhere)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vlprune import hf, kernels
from vlprune.kernels.reference import gather_tokens


@dataclass
class Segment:
    """The tokens a run of decoder layers sees during one prefill.

    Attributes
    ----------
    rows : LongTensor (B, Lc)
        Index into the input sequence of the token in each slot; ``-1`` for padding slots added by compaction.
    mask : BoolTensor (B, Lc)
        ``True`` for real tokens (False for the input's own padding and for added padding).
    position_ids : LongTensor (B, Lc)
        Position id of each slot as the layers see it.
    cos, sin : Tensor (B, Lc, head_dim)
        Rotary embeddings of each slot.
    shift : LongTensor (B,)
        Real tokens removed so far per sample: decoding positions move down by this much under ``"renumber"``.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    shift: torch.Tensor
    masks: dict[str, Any] = field(default_factory=dict)  # prepared prefill attention masks, per layer type

    @property
    def length(self) -> int:
        return self.rows.shape[1]


def _expand(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x


def initial_segment(hidden: torch.Tensor, attention_mask, position_ids, position_embeddings) -> Segment:
    """The full sequence as the language model prepared it for its first layer."""
    b, length = hidden.shape[:2]
    device = hidden.device
    mask = torch.ones(b, length, dtype=torch.bool, device=device)
    if attention_mask is not None:
        mask = _expand(attention_mask.to(device=device, dtype=torch.bool), b)
    if position_ids is None:
        position_ids = torch.arange(length, device=device)[None]
    cos, sin = position_embeddings
    return Segment(
        rows=torch.arange(length, device=device).expand(b, length),
        mask=mask,
        position_ids=_expand(position_ids, b),
        cos=_expand(cos, b),
        sin=_expand(sin, b),
        shift=torch.zeros(b, dtype=torch.long, device=device),
    )


def compact(
    segment: Segment,
    hidden: torch.Tensor,
    keep_slots: list[torch.Tensor],
    renumber: bool,
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    merges: list | None = None,
) -> tuple[Segment, torch.Tensor]:
    """Keep ``keep_slots[b]`` (ascending slot indices of ``segment``) of each sample; right-align (left padding).

    ``merges[b]``, when not ``None``, is ``(source_slots, target_slots, weights)``: each target (a kept slot) becomes
    the weighted sum of its sources, accumulated in fp32. One pass of :func:`vlprune.kernels.merge_compact` (fused
    on CUDA) gathers hidden states, rows, mask, position ids and rotary tables. Returns the new segment and the
    hidden states (B, L', D).
    """
    out = kernels.merge_compact(
        keep_slots,
        merges,
        hidden,
        segment.mask.to(hidden.device),
        rows=segment.rows,
        position_ids=None if renumber else segment.position_ids,
        cos=None if renumber else segment.cos,
        sin=None if renumber else segment.sin,
    )
    mask = out.mask
    if renumber:
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        cos, sin = rotary(out.hidden, position_ids)
    else:
        position_ids, cos, sin = out.position_ids, out.cos, out.sin
    shift = segment.shift + segment.mask.sum(-1).to(mask.device) - mask.sum(-1)
    return Segment(out.rows, mask, position_ids, cos, sin, shift), out.hidden


def align(values: torch.Tensor, old_rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """``values`` (B, L_old, ...) laid out on slots ``old_rows`` re-laid on ``new_rows`` (B, L_new) (each new row
    is among the old ones; rows are ascending after leading ``-1`` padding)."""
    if old_rows.shape == new_rows.shape and torch.equal(old_rows, new_rows):
        return values
    index = torch.searchsorted(old_rows.to(new_rows.device).contiguous(), new_rows.contiguous())
    index = index.clamp(max=old_rows.shape[1] - 1).to(values.device)
    return gather_tokens(values, index)


def compact_cache_layer(cache, layer_idx: int, old_rows: torch.Tensor, new_rows: torch.Tensor) -> None:
    """Keep, in the KV cache of decoder layer ``layer_idx`` (its entries laid on slots ``old_rows`` (B, L_old)), the
    entries of the slots ``new_rows`` (B, L_new), each of which is among the old rows (leading ``-1`` padding slots
    are filled with any entry; their mask hides them)."""
    layer = cache.layers[layer_idx]
    index = torch.searchsorted(old_rows.contiguous(), new_rows.contiguous())
    index = index.clamp(max=old_rows.shape[1] - 1).to(layer.keys.device)
    if layer.keys.shape[2] != old_rows.shape[1]:
        raise RuntimeError(
            f"the cache of layer {layer_idx} holds {layer.keys.shape[2]} entries, not {old_rows.shape[1]}"
        )
    for name in ("keys", "values"):
        tensor = getattr(layer, name)
        full = index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3])
        setattr(layer, name, torch.gather(tensor, 2, full))


def layer_kind(config, layer_idx: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types else "full_attention"


def build_mask(config, layer_idx: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache, position_ids):
    """The attention mask layer ``layer_idx`` needs for queries ``hidden`` over its own cache, in the format of the
    model's attention implementation (transformers' own mask builders, sized against that layer's cache)."""
    kind = layer_kind(config, layer_idx)
    if kind not in ("full_attention", "sliding_attention"):
        raise NotImplementedError(f"vlprune cannot build masks for layer type {kind!r}")
    return hf.causal_mask(kind, config, hidden, mask2d, cache, position_ids, layer_idx)
