"""Decoding after a pruned prefill: the decoder-layer pre-hooks that give each layer a mask against its own (shorter)
KV cache, a decode-time cache stage's restriction (DyCoke), and the compaction of the earlier layers' cache after a
prefill whose stage asks for it (PruneVid). A mixin of :class:`vlprune.api.Pruned`, whose per-call state it reads:
``_call``, ``_session``, ``_cache``, ``adapter`` and ``_renumber``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import compaction, hf
from .attention import last_query_attention
from .guards import refuse_continuation

if TYPE_CHECKING:
    from .decode_cache import CacheRestriction
    from .model_adapters import Adapter
    from .state import Call, Session


class Decoding:
    """The decoding half of :class:`vlprune.api.Pruned` (see the module docstring)."""

    # the per-call state it reads, set by Pruned
    _call: Call | None
    _session: Session | None
    _cache: CacheRestriction | None
    adapter: Adapter
    _renumber: bool

    def _decode_entry(self, input_ids, args, kwargs):
        """The entry pre-hook of a decoding step after a pruned prefill. Layer 0 saw only the kept tokens, so its
        cache is shorter than the input: give the language model a 2-D mask and (when the caller gave none) the
        positions it would have had without pruning."""
        session, call = self._session, self._call
        first = session.layer_segment.get(0) if session else None
        if first is None:
            return None
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        seen = hf.cache_length(call.cache) - first.length  # tokens decoded so far
        mask = call.attention_mask
        if mask is not None and mask.shape[-1] != session.full_length + seen + q:
            self._call = None
            refuse_continuation(q, session.full_length + seen, mask.shape[-1])
        if kwargs.get("position_ids") is None:
            positions = session.full_length + seen + torch.arange(q, device=first.rows.device)
            kwargs["position_ids"] = self.adapter.decode_positions(positions[None].expand(first.rows.shape[0], q))
        kwargs["attention_mask"] = self._decode_mask2d(first, seen + q)
        return args, kwargs

    def _compact_earlier_cache(self, cache) -> None:
        """After a prefill whose stage at ``cache_back`` asks for it: the layers before it keep in their cache only
        the tokens that stage kept, and decode as its layers do."""
        session = self._session
        target = session.layer_segment[session.cache_back]
        if cache is not None:
            for layer in range(session.cache_back):
                segment = session.layer_segment.get(layer)
                full = torch.arange(session.full_length, device=target.rows.device).expand(target.rows.shape[0], -1)
                rows = segment.rows.to(full.device) if segment is not None else full
                compaction.compact_cache_layer(cache, layer, rows, target.rows)
        for layer in range(session.cache_back):
            session.layer_segment[layer] = target

    def _decode_mask2d(self, segment: compaction.Segment, new: int) -> torch.Tensor:
        """2-D mask of a segment's layers while decoding: the segment's own slots, then the ``new`` columns."""
        call = self._call
        if call.attention_mask is not None:
            tail = call.attention_mask[:, -new:].to(dtype=torch.bool, device=segment.mask.device)
        else:
            tail = segment.mask.new_ones(segment.mask.shape[0], new)
        return torch.cat([segment.mask, tail], dim=1)

    def _decode_layer(self, layer: int, args, kwargs):
        segment = self._session.layer_segment.get(layer) if self._session else None
        cache = self._cache
        scored = cache is not None and layer == cache.layer - 1
        restricted = cache is not None and layer >= cache.layer and cache.ready
        if segment is None and not (scored or restricted):
            return None
        call = self._call
        hidden = args[0] if args else kwargs["hidden_states"]
        if segment is not None:
            new = hf.cache_length(call.cache, layer) + hidden.shape[1] - segment.length  # decoded so far + this call
            mask2d = self._decode_mask2d(segment, new)
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
        if self._renumber and segment is not None:
            if id(segment) not in call.positions:
                position_ids = kwargs["position_ids"] - segment.shift[:, None].to(kwargs["position_ids"].device)
                call.positions[id(segment)] = (position_ids, self.adapter.rotary(hidden, position_ids))
            position_ids, embeddings = call.positions[id(segment)]
            kwargs["position_ids"] = position_ids
            kwargs["position_embeddings"] = embeddings
        return args, kwargs

    def _cache_scorer(self, module, query, key, value, kwargs):
        mask = self._call.cache_key_mask
        mask = None if mask is None else mask.to(device=key.device)
        self._call.cache_scores = last_query_attention(query.detach(), key.detach(), kwargs.get("scaling"), mask)


# --- public functions ------------------------------------------------------------------------------------------
