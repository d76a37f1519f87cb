"""The decoder-side signals: what the core computes inside the language model of every family, one producer per
signal. A signal described in :mod:`vlprune.signals` with ``captured="llm"`` is produced here:

* scored in the attention of a decoder layer ``K`` (``Signal.attention == "text_config"``): a function of
  :class:`Scoring` in :data:`SCORED_BY`, run by the scoring attention function of layer ``K`` during the prefill;
* at the stage's own layer: a function of :class:`AtStage` in :data:`AT_STAGE`, run by the stage's pre-hook on the
  hidden states entering that layer.

Each producer returns a tensor with one row per slot of the current segment, ``(B, Lc, ...)``; the core re-lays it on
later segments and gives each view its candidates' rows (and, for ``Signal.text``, the text's). A signal whose value
has another shape names its own re-laying and slicing in :data:`ALIGN` and :data:`FILL`. Adapters claim
:data:`DECODER_SIGNALS`, so a signal is offered exactly when it has a producer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import compaction
from .attention import last_query_attention, repeated_keys, text_attention
from .signals import LAYERED, TokenView


@dataclass
class Scoring:
    """What a scored signal reads, inside the attention of its decoder layer (prefill): ``query`` (B, H, Lc, d),
    ``key`` (B, Hk, Lc, d) after RoPE and ``value`` (B, Hk, Lc, d), the layer's ``scaling``, ``key_mask`` (B, Lc)
    bool or ``None``, the input row of each slot ``rows`` (B, Lc), and ``layouts()``, the samples'
    :class:`~vlprune.layout.SampleLayout`."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float | None
    key_mask: torch.Tensor | None
    rows: torch.Tensor
    layouts: Callable[[], list]


@dataclass
class AtStage:
    """What a stage-time signal reads, at the pre-hook of the stage's decoder layer ``layer``: the ``hidden`` states
    entering it (B, Lc, D), the current ``segment`` (its rows, rotary tables and mask), the family's ``adapter`` and
    the language model's input ``embeddings`` (B, L0, D) when they were captured."""

    layer: int
    hidden: torch.Tensor
    segment: compaction.Segment
    adapter: Any
    embeddings: torch.Tensor | None


def _incoming_attention(at: AtStage) -> torch.Tensor:
    """The last prompt token's attention row as the stage's own layer would compute it from its input."""
    segment = at.segment
    query, key, scaling = at.adapter.query_key(at.layer, at.hidden, segment.cos, segment.sin)
    return last_query_attention(query, key, scaling, segment.mask.to(key.device))


def _embeddings(at: AtStage) -> torch.Tensor:
    """The input embeddings of each slot's row (B, Lc, D) (padding slots, row -1, read row 0)."""
    rows = at.segment.rows.clamp(min=0).to(at.embeddings.device)
    return torch.gather(at.embeddings, 1, rows[..., None].expand(-1, -1, at.embeddings.shape[-1]))


SCORED_BY: dict[str, Callable[[Scoring], Any]] = {
    "llm_attention": lambda s: last_query_attention(s.query, s.key, s.scaling, s.key_mask),  # (B, Lc)
    "llm_keys": lambda s: repeated_keys(s.query, s.key),  # (B, Lc, H*d)
    "text_attention": lambda s: text_attention(s.query, s.key, s.scaling, s.key_mask, s.rows, s.layouts()),
}
AT_STAGE: dict[str, Callable[[AtStage], torch.Tensor]] = {
    "hidden": lambda at: at.hidden,
    "normed_hidden": lambda at: at.adapter.final_norm(at.hidden),
    "incoming_attention": _incoming_attention,
    "embeddings": _embeddings,
}
DECODER_SIGNALS = (*SCORED_BY, *AT_STAGE)


def scored_layers(requests) -> dict[int, set[str]]:
    """``{decoder layer: the scored signals requested there}``."""
    layers: dict[int, set[str]] = {}
    for request in requests:
        if request.name in SCORED_BY:
            layers.setdefault(request.layer, set()).add(request.name)
    return layers


def score(recorded: dict, layer: int, names, query, key, value, scaling, key_mask, rows, layouts) -> None:
    """In the scoring attention function of decoder ``layer`` (prefill): compute each of ``names`` and record it in
    ``recorded`` (``{name: {layer: (rows, value)}}``; ``rows`` (B, Lc): the input row of each slot it was computed
    on)."""
    if key_mask is not None:
        key_mask = key_mask.to(device=key.device, dtype=torch.bool)
    scoring = Scoring(query.detach(), key.detach(), value.detach(), scaling, key_mask, rows, layouts)
    for name in sorted(names):
        recorded.setdefault(name, {})[layer] = (rows, SCORED_BY[name](scoring))


def _align_text(value: list, old_rows: torch.Tensor, rows: torch.Tensor) -> list:
    """``text_attention``'s per-sample ``(query rows (t,), head mean (t, L), head max (t, L))``: the columns are
    the slots."""
    return [
        (queries, *(compaction.align(s.T[None], old_rows[b : b + 1], rows[b : b + 1])[0].T for s in scores))
        for b, (queries, *scores) in enumerate(value)
    ]


def _fill_text(view: TokenView, layer: int, value: list, b: int, slots: torch.Tensor, row: torch.Tensor) -> None:
    """The rows of the text tokens after the image, the columns of ``slots``."""
    queries, mean, top = value[b]
    after = (queries > row[slots].max()).to(mean.device)
    view.text_attention[layer] = mean[after][:, slots.to(mean.device)]
    view.text_attention_max[layer] = top[after][:, slots.to(top.device)]


ALIGN: dict[str, Callable[[Any, torch.Tensor, torch.Tensor], Any]] = {"text_attention": _align_text}
FILL: dict[str, Callable[..., None]] = {"text_attention": _fill_text}


def align(name: str, value, old_rows: torch.Tensor, rows: torch.Tensor):
    """``name``'s value computed on the slots ``old_rows`` (B, L_old), re-laid on the current slots ``rows``."""
    return ALIGN.get(name, compaction.align)(value, old_rows, rows)


def fill(view: TokenView, name: str, layer: int | None, value, b: int, slots: torch.Tensor, row: torch.Tensor) -> None:
    """Give ``view`` (sample ``b``'s tokens at ``slots``; ``row``: the input row of each of the sample's slots) its
    rows of ``name``'s value, under ``layer`` for a layered signal."""
    if name in FILL:
        FILL[name](view, layer, value, b, slots, row)
        return
    mine = value[b][slots.to(value.device)]
    if name in LAYERED:
        getattr(view, name)[layer] = mine
    else:
        setattr(view, name, mine)
