"""Decoding after a pruned prefill: the decoder-layer pre-hooks that give each layer a mask against its own (shorter)
KV cache, a decode-time cache stage's restriction (DyCoke), and the compaction of the earlier layers' cache after a
prefill whose stage asks for it (PruneVid). :class:`Decoder` is owned by the :class:`vlprune.api.Pruned` handle,
which hands it the call's state (:class:`~vlprune.state.Call`, :class:`~vlprune.state.Session`) on every hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import compaction, hf
from .attention import last_query_attention
from .guards import refuse_continuation

if TYPE_CHECKING:
    from .decode_cache import CacheRestriction
    from .model_adapters import Adapter
    from .state import Call, Session


class Decoder:
    """The decoding half of a wrapped model: ``adapter`` (the family), ``renumber`` (positions renumbered while
    decoding) and the decode-time cache stage's ``restriction`` (or ``None``)."""

    def __init__(self, adapter: Adapter, renumber: bool, restriction: CacheRestriction | None) -> None:
        self.adapter = adapter
        self.renumber = renumber
        self.restriction = restriction

    def entry(self, call: Call, session: Session | None, input_ids, args, kwargs):
        """The entry pre-hook of a decoding step after a pruned prefill. Layer 0 saw only the kept tokens, so its
        cache is shorter than the input: give the language model a 2-D mask and (when the caller gave none) the
        positions it would have had without pruning. A call that re-feeds earlier tokens is a ``ValueError``."""
        first = session.layer_segment.get(0) if session else None
        if first is None:
            return None
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        seen = hf.cache_length(call.cache) - first.length  # tokens decoded so far
        mask = call.attention_mask
        if mask is not None and mask.shape[-1] != session.full_length + seen + q:
            refuse_continuation(q, session.full_length + seen, mask.shape[-1])
        if kwargs.get("position_ids") is None:
            positions = session.full_length + seen + torch.arange(q, device=first.rows.device)
            kwargs["position_ids"] = self.adapter.decode_positions(positions[None].expand(first.rows.shape[0], q))
        kwargs["attention_mask"] = self.mask2d(call, first, seen + q)
        return args, kwargs

    @staticmethod
    def compact_earlier_cache(session: Session, cache) -> None:
        """After a prefill whose stage at ``cache_back`` asks for it: the layers before it keep in their cache only
        the tokens that stage kept, and decode as its layers do."""
        target = session.layer_segment[session.cache_back]
        if cache is not None:
            for layer in range(session.cache_back):
                segment = session.layer_segment.get(layer)
                full = torch.arange(session.full_length, device=target.rows.device).expand(target.rows.shape[0], -1)
                rows = segment.rows.to(full.device) if segment is not None else full
                compaction.compact_cache_layer(cache, layer, rows, target.rows)
        for layer in range(session.cache_back):
            session.layer_segment[layer] = target

    @staticmethod
    def mask2d(call: Call, segment: compaction.Segment, new: int) -> torch.Tensor:
        """2-D mask of a segment's layers while decoding: the segment's own slots, then the ``new`` columns."""
        if call.attention_mask is not None:
            tail = call.attention_mask[:, -new:].to(dtype=torch.bool, device=segment.mask.device)
        else:
            tail = segment.mask.new_ones(segment.mask.shape[0], new)
        return torch.cat([segment.mask, tail], dim=1)

    def layer(self, call: Call, session: Session | None, layer: int, args, kwargs):
        """The pre-hook of decoder ``layer`` at a decoding step: its mask against its own cache (restricted to the
        cache stage's entries from its layer on), and its renumbered positions."""
        segment = session.layer_segment.get(layer) if session else None
        cache = self.restriction
        scored = cache is not None and layer == cache.layer - 1
        restricted = cache is not None and layer >= cache.layer and cache.ready
        if segment is None and not (scored or restricted):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if segment is not None:
            new = hf.cache_length(call.cache, layer) + hidden.shape[1] - segment.length  # decoded so far + this call
            mask2d = self.mask2d(call, segment, new)
        elif call.attention_mask is not None:
            mask2d = call.attention_mask.to(torch.bool)
        else:
            mask2d = torch.ones(hidden.shape[0], hf.cache_length(call.cache, layer) + hidden.shape[1], dtype=torch.bool)
        if scored:
            call.cache_key_mask = mask2d
            if segment is None:
                return None
        if restricted:
            if call.cache_keep is None:  # decided once per step, at the first restricted layer
                rows = segment.rows if segment is not None else None
                call.cache_keep = cache.keep(call.cache_scores, rows, mask2d.shape[1])
            mask2d = mask2d.to(hidden.device) & call.cache_keep.to(hidden.device)
        key = (id(segment), compaction.layer_kind(self.adapter.text_config, layer), restricted)
        if key not in call.masks:
            call.masks[key] = compaction.build_mask(
                self.adapter.text_config, layer, hidden, mask2d, call.cache, kwargs.get("position_ids")
            )
        kwargs["attention_mask"] = call.masks[key]
        if self.renumber and segment is not None:
            if id(segment) not in call.positions:
                position_ids = kwargs["position_ids"] - segment.shift[:, None].to(kwargs["position_ids"].device)
                call.positions[id(segment)] = (position_ids, self.adapter.rotary(hidden, position_ids))
            position_ids, embeddings = call.positions[id(segment)]
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = embeddings
        return args, kwargs

    @staticmethod
    def cache_scorer(current: Callable[[], Call | None]):
        """The scorer of the cache stage's layer while decoding: the new token's attention over the cache, recorded
        in the current call (``current()``)."""

        def scorer(module, query, key, value, kwargs):
            call = current()
            mask = call.cache_key_mask
            mask = None if mask is None else mask.to(device=key.device)
            call.cache_scores = last_query_attention(query.detach(), key.detach(), kwargs.get("scaling"), mask)

        return scorer
