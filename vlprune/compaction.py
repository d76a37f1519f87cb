"""Compaction: gather the per-token tensors a run of decoder layers sees down to the kept tokens, per sample,
left-padded, and build the attention masks those layers need in prefill and while decoding with their own
(shorter) KV cache. PyTorch reference implementation; the same results on every device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` (B or 1, L, ...) gathered along dim 1 by ``index`` (B, L') -> (B, L', ...)."""
    x = _expand(x, index.shape[0])
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


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
    the weighted sum of its sources, accumulated in fp32. Returns the new segment and the hidden states (B, L', D).
    """
    b = hidden.shape[0]
    device = hidden.device
    new_len = max(int(k.numel()) for k in keep_slots)
    index = torch.zeros(b, new_len, dtype=torch.long, device=device)
    valid = torch.zeros(b, new_len, dtype=torch.bool, device=device)
    for i, slots in enumerate(keep_slots):
        n = int(slots.numel())
        if n:
            index[i, new_len - n :] = slots.to(device)
            valid[i, new_len - n :] = True
    rows = torch.where(valid, torch.gather(segment.rows, 1, index), -1)
    mask = valid & torch.gather(segment.mask, 1, index)
    new_hidden = gather_tokens(hidden, index)  # (B, L', D)
    for i, merge in enumerate(merges or ()):
        if merge is not None:
            new_hidden[i] = merge_tokens(
                hidden[i], new_hidden[i], keep_slots[i], new_len - int(keep_slots[i].numel()), *merge
            )
    if renumber:
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        cos, sin = rotary(new_hidden, position_ids)
    else:
        position_ids = torch.gather(segment.position_ids, 1, index).masked_fill(~valid, 1)
        cos, sin = gather_tokens(segment.cos, index), gather_tokens(segment.sin, index)
    shift = segment.shift + segment.mask.sum(-1) - mask.sum(-1)
    return Segment(rows, mask, position_ids, cos, sin, shift), new_hidden


def merge_tokens(hidden, gathered, kept, offset, sources, targets, weights) -> torch.Tensor:
    """One sample: ``gathered`` (L', D) with each target slot replaced by the weighted sum of its source slots of
    ``hidden`` (L, D). ``kept`` are the ascending kept slots, placed from ``offset`` on."""
    device = hidden.device
    targets_at = offset + torch.searchsorted(kept.to(device), targets.to(device))
    unique, group = torch.unique(targets_at, return_inverse=True)
    acc = torch.zeros(unique.numel(), hidden.shape[-1], device=device, dtype=torch.float32)
    acc.index_add_(0, group, hidden[sources.to(device)].float() * weights.to(device)[:, None])
    out = gathered.clone()
    out[unique] = acc.to(hidden.dtype)
    return out


def align(values: torch.Tensor, old_rows: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """``values`` (B, L_old, ...) laid out on slots ``old_rows`` re-laid on ``new_rows`` (B, L_new) (each new row
    is among the old ones; rows are ascending after leading ``-1`` padding)."""
    if old_rows.shape == new_rows.shape and torch.equal(old_rows, new_rows):
        return values
    index = torch.searchsorted(old_rows.to(new_rows.device).contiguous(), new_rows.contiguous())
    index = index.clamp(max=old_rows.shape[1] - 1).to(values.device)
    return gather_tokens(values, index)


def layer_kind(config, layer_idx: int) -> str:
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types else "full_attention"


def build_mask(config, layer_idx: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache, position_ids):
    """The attention mask layer ``layer_idx`` needs for queries ``hidden`` over its own cache, in the format of the
    model's attention implementation (transformers' own mask builders, sized against that layer's cache)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kind = layer_kind(config, layer_idx)
    if kind not in ("full_attention", "sliding_attention"):
        raise NotImplementedError(f"vlprune cannot build masks for layer type {kind!r}")
    fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return fn(
        config=config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        past_key_values=cache,
        position_ids=position_ids,
        layer_idx=layer_idx,
    )
