"""Turning one stage's signals into kept slots and a :class:`KeepPlan`: each budget unit (an image, a tile) of each
sample decided by the stage's selector, checked, and recorded in the plan and the merges to apply."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .captures import VisionCaptures
from .layout import SampleLayout, token_grids
from .plan import KeepPlan
from .resolve import ResolvedStage
from .selectors.base import Selection
from .views import StageInputs, decoder_view, vision_view


def check_selection(method: str, chosen, n: int, sources: int, k: int) -> Selection:
    selection = chosen if isinstance(chosen, Selection) else Selection.pruned(chosen)
    keep = torch.as_tensor(selection.keep).reshape(-1).long().cpu()
    if keep.numel() != k or (keep.numel() and (keep.min() < 0 or keep.max() >= n)):
        raise RuntimeError(f"selector {method!r} returned {keep.numel()} indices for keep={k} of {n} tokens")
    if torch.unique(keep).numel() != keep.numel():
        raise RuntimeError(f"selector {method!r} returned duplicate indices")
    into, weight, source = selection.into, selection.weight, selection.source
    if into is not None:
        into, weight = into.reshape(-1).long().cpu(), weight.reshape(-1).float().cpu()
        count = sources if source is None else source.numel()
        bad = into.numel() != count or weight.numel() != count or bool((into >= k).any() or (into < -1).any())
        if source is not None:
            source = source.reshape(-1).long().cpu()
            bad = bad or bool(source.numel() and (source.min() < 0 or source.max() >= sources))
        if bad:
            raise RuntimeError(f"selector {method!r} returned a merge map that does not fit {sources} sources -> {k}")
    return Selection(keep, into, weight, source, selection.ordered)


def in_llm_order(selection: Selection, sources: int) -> tuple[Selection, torch.Tensor]:
    """The selection and the candidate whose slot each output occupies: ``keep[i]``, or for an ``ordered``
    selection the ``i``-th kept candidate in position order (a reordering becomes a merge of weight 1)."""
    if not selection.ordered:
        return selection, selection.keep
    target = torch.sort(selection.keep).values
    if torch.equal(target, selection.keep):
        return selection, selection.keep
    if selection.into is None:
        into = torch.full((sources,), -1, dtype=torch.long)
        into[selection.keep] = torch.arange(selection.keep.numel())
        selection = Selection(selection.keep, into, torch.ones(sources), ordered=True)
    return selection, target


@dataclass
class _SampleDecision:
    """What one stage decided for one sample, gathered unit by unit (see :func:`decide`)."""

    row: torch.Tensor  # (Lc,) input row of each slot
    slot_visual: torch.Tensor  # (Lc,) the slot holds a visual token
    slot_ordinal: torch.Tensor  # (Lc,) its index among the sample's visual tokens, -1 for other slots
    into: torch.Tensor  # (n_visual,) the plan's merged_into
    weight: torch.Tensor  # (n_visual,) the plan's merge_weight
    kept: list = field(default_factory=list)  # slot indices that stay
    merge: list = field(default_factory=list)  # (source slots, target slots, weights) to combine after the gather
    pairs: list = field(default_factory=list)  # the pair-form merges, in visual indices

    def add(self, slots: torch.Tensor, selection: Selection, target: torch.Tensor, sources: int, gather: bool):
        """A unit's ``selection`` over its candidate ``slots``; output ``i`` occupies the slot of candidate
        ``target[i]``. ``gather``: its merges still have to be applied to the hidden states (not so for a vision-space
        stage, applied before the projector)."""
        self.kept.append(slots[selection.keep])
        ordinals = self.slot_ordinal[slots]
        if selection.into is None:
            self.into[ordinals[selection.keep]] = ordinals[selection.keep]
            self.weight[ordinals[selection.keep]] = 1.0
            return
        source, into, weight = selection.pairs(sources)
        candidate = source < slots.numel()  # not the [CLS] source of a vision-space stage
        source, into, weight = source[candidate], into[candidate], weight[candidate]
        # the plan names one target per token: a token feeding several, the one it weighs most in (first on ties)
        order = torch.argsort(weight, descending=True, stable=True)
        order = order[torch.argsort(source[order], stable=True)]
        first = torch.ones(order.numel(), dtype=torch.bool)
        first[1:] = source[order][1:] != source[order][:-1]
        pick = order[first]
        self.into[ordinals[source[pick]]] = ordinals[target[into[pick]]]
        self.weight[ordinals[source[pick]]] = weight[pick]
        if selection.source is not None:
            self.pairs.append((ordinals[source], ordinals[target[into]], weight))
        if gather:
            self.merge.append((slots[source], slots[target[into]], weight))


def _slots_of(layout: SampleLayout, row: torch.Tensor) -> _SampleDecision:
    """Which of a sample's current slots (input rows ``row``) hold its visual tokens, and which one each."""
    nvis = layout.positions.numel()
    found = torch.searchsorted(layout.positions, row).clamp(max=max(nvis - 1, 0))
    slot_visual = (row >= 0) & (nvis > 0)
    if nvis:
        slot_visual &= layout.positions[found] == row
    slot_ordinal = torch.where(slot_visual, found, -1)
    into, weight = torch.full((nvis,), -1, dtype=torch.long), torch.zeros(nvis)
    return _SampleDecision(row, slot_visual, slot_ordinal, into, weight)


def _units(layout: SampleLayout, sample: _SampleDecision, per: str) -> list[tuple]:
    """``(image index, feature index, grid, candidate slots)`` of each unit a stage decides on (an image, a tile)."""
    units = []
    for j, image in enumerate(layout.images):
        in_image = sample.slot_visual & (layout.image_of[sample.slot_ordinal.clamp(min=0)] == j)
        for tile, grid in layout.units(j, per):
            in_unit = in_image if tile is None else in_image & tile[sample.slot_ordinal.clamp(min=0)]
            units.append((j, image, grid, torch.nonzero(in_unit).flatten()))
    return units


def _decided_sources(chosen: Selection, candidates: int) -> int:
    """The sources of a vision-space stage's selection: its candidates, plus the [CLS] state when it used it."""
    if chosen.into is None:
        return candidates
    if chosen.source is not None:  # contributions, not sources: the [CLS] source is the only extra
        return max(candidates, int(chosen.source.max()) + 1 if chosen.source.numel() else 0)
    return int(chosen.into.numel())


def decide(rs: ResolvedStage, inputs: StageInputs, layouts: list[SampleLayout]):
    """Apply one stage to the current segment.

    Returns
    -------
    keep_slots : per sample, ascending slot indices to keep.
    merges : per sample, ``None`` or ``(source_slots, target_slots, weights)`` to combine after the gather.
    plan : the stage's :class:`KeepPlan`.
    """
    wanted = {(r.name, r.layer) for r in rs.requests}  # a view carries only this stage's own signals
    decided = inputs.vision.decided if rs.selector.space == "vision" else None
    samples = []
    for b, layout in enumerate(layouts):
        sample = _slots_of(layout, inputs.rows[b].cpu())
        row = sample.row
        text = (row >= 0) & ~sample.slot_visual
        sample.kept.append(torch.nonzero(text).flatten())  # text, fixed placeholders and the input's padding stay
        text &= ~torch.isin(row, layout.fixed)
        for j, image, grid, slots in _units(layout, sample, "image" if decided is not None else rs.stage.per):
            if slots.numel() == 0:
                continue
            if decided is not None:
                chosen = decided[image]
                k, sources = int(chosen.keep.numel()), _decided_sources(chosen, slots.numel())
            else:
                text_slots = torch.nonzero(text & (torch.arange(row.numel()) > slots.max())).flatten()
                view = decoder_view(inputs, layout, b, j, grid, slots, sample.slot_ordinal[slots], text_slots, wanted)
                view.ratio = rs.stage.ratio
                k = rs.stage.budget(int(slots.numel()))
                chosen, sources = rs.selector.select(view, k), view.n
                k = min(rs.selector.count(view, k), view.n)
            selection = check_selection(rs.stage.method, chosen, slots.numel(), sources, k)
            if decided is None:
                selection, target = in_llm_order(selection, int(sources))
            else:
                target = selection.keep
            sample.add(slots, selection, target, int(sources), gather=decided is None)
        samples.append(sample)
    return _outcome(rs, layouts, samples)


def _outcome(rs: ResolvedStage, layouts: list[SampleLayout], samples: list[_SampleDecision]):
    """:func:`decide`'s result from each sample's decisions."""
    keep_slots, merges, keep_visual = [], [], []
    for sample in samples:
        slots = torch.sort(torch.cat(sample.kept)).values
        keep_slots.append(slots)
        merges.append(tuple(torch.cat(part) for part in zip(*sample.merge, strict=True)) if sample.merge else None)
        keep_visual.append(torch.sort(sample.slot_ordinal[slots][sample.slot_visual[slots]]).values)
    pairs = [tuple(torch.cat(p) for p in zip(*s.pairs, strict=True)) if s.pairs else None for s in samples]
    plan = KeepPlan(
        layer=rs.layer,
        method=rs.stage.method,
        keep_visual=keep_visual,
        keep_tokens=[s.row[slots] for s, slots in zip(samples, keep_slots, strict=True)],
        image_of=[layout.image_of[v] for layout, v in zip(layouts, keep_visual, strict=True)],
        num_visual=[int(layout.positions.numel()) for layout in layouts],
        visual_rows=[layout.positions for layout in layouts],
        grids=[token_grids(layout) for layout in layouts],
        merged_into=[s.into for s in samples],
        merge_weight=[s.weight for s in samples],
        merge_pairs=pairs if any(p is not None for p in pairs) else None,
        space=rs.selector.space,
    )
    return keep_slots, merges, plan


def decide_vision(
    rs: ResolvedStage, x: torch.Tensor, store: VisionCaptures, adapter
) -> tuple[torch.Tensor, list[Selection]]:
    """A vision-space first stage, run on the projector's input ``x`` (n_img, N, Dv): decide per image and write the
    outputs of merging selectors into the kept slots (the others are removed before decoder layer 0).

    Returns the new projector input and each image's checked :class:`Selection` (used again at layer 0)."""
    wanted = {(r.name, r.layer) for r in rs.requests}
    decided, out = [], x.clone()
    n = x.shape[1]
    for image in range(x.shape[0]):
        view = vision_view(x, image, store, wanted, adapter.image_grid(n))
        budget = rs.stage.budget(n)
        view.ratio = rs.stage.ratio
        sources = x[image] if view.cls_hidden is None else torch.cat([x[image], view.cls_hidden[None]])
        chosen = rs.selector.select(view, budget)
        k = min(rs.selector.count(view, budget), n)
        selection = check_selection(rs.stage.method, chosen, n, sources.shape[0], k)
        decided.append(selection)
        out[image, selection.keep.to(x.device)] = selection.apply(sources)
    return out, decided
