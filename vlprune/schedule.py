"""Resolving a :class:`PruneConfig` against a model (validation before anything is installed), and turning one
stage's signals into kept slots and a :class:`KeepPlan`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .compaction import layer_kind
from .config import PruneConfig, Stage
from .plan import KeepPlan
from .registry import create_selector
from .selectors.base import Selection, Selector
from .signals import TOKENWISE, SignalRequest, TokenView
from .support import missing_signals


@dataclass
class ResolvedStage:
    stage: Stage
    selector: Selector
    layer: int
    requests: list[SignalRequest]


@dataclass
class SampleLayout:
    """Where one sample's visual tokens are: ``positions`` (n,) in the input sequence, the ``image_of`` each (n,)
    (ordinal within the sample), its ``local`` index within that image (n,), and per image of the sample its global
    index in the batch's feature tensors (``images``) and token grid (``grids``). ``fixed``: positions of image
    placeholders that are always kept and are not candidates (LLaVA-NeXT's row-end newlines); they count neither as
    visual tokens nor as text. For tiled images, ``tile_of`` (n,) gives each visual token's tile within its image and
    ``tile_grids`` per image the token grid of each tile (budgets ``per="tile"``). ``frames`` per image: its frame
    count (videos; ``None``: every image has one frame, and then ``grids`` are whole images). ``video_of`` per image:
    its ordinal among the sample's videos, ``None`` for an image (``None``: a sample holds images or videos, not both,
    and the ordinals are the images')."""

    positions: torch.Tensor
    image_of: torch.Tensor
    local: torch.Tensor
    images: list[int]
    grids: list[tuple[int, int] | None]
    fixed: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    tile_of: torch.Tensor | None = None
    tile_grids: list[list[tuple[int, int] | None]] | None = None
    frames: list[int] | None = None
    video_of: list[int | None] | None = None

    def units(self, j: int, per: str) -> list[tuple[torch.Tensor | None, tuple[int, int] | None]]:
        """The budget units of image ``j``: ``(tile mask over the sample's visual tokens or None, grid)`` each."""
        if per == "tile" and self.tile_of is not None:
            return [(self.tile_of == t, grid) for t, grid in enumerate(self.tile_grids[j])]
        return [(None, self.grids[j])]


def token_grids(layout: SampleLayout) -> list[tuple[int, int, int] | None]:
    """Per image of ``layout``, ``(frames, h, w)`` of its tokens, or ``None`` when they form no single grid."""
    frames = layout.frames or [1] * len(layout.grids)
    return [None if grid is None else (t, *grid) for grid, t in zip(layout.grids, frames, strict=True)]


def resolve(config: PruneConfig, adapter) -> list[ResolvedStage]:
    """Instantiate the selectors and check every stage against the model; raises before anything is installed."""
    resolved = []
    num_layers = adapter.num_layers
    for stage in config.stages:
        selector = create_selector(stage.method, **stage.params)
        layer = selector.default_layer if stage.layer is None else stage.layer
        if not 0 <= layer < num_layers:
            raise ValueError(
                f"layer={layer} is outside the language model's layers: use 0 (before the LLM) to "
                f"{num_layers - 1} (this {adapter.model_type} model has {num_layers} decoder layers)"
            )
        if resolved and layer <= resolved[-1].layer:
            raise ValueError(f"stage layers must be strictly increasing, got {[r.layer for r in resolved] + [layer]}")
        if selector.space == "vision" and (layer != 0 or resolved):
            where = "inside the vision tower" if selector.tower else "on the vision tower's output"
            raise ValueError(
                f"{stage.method!r} acts {where}: it must be the first stage, at layer 0 "
                f"(got layer={layer}{' after another stage' if resolved else ''})"
            )
        missing = missing_signals(selector, adapter.signals, layer)
        if missing:
            why = adapter.why_not(missing)
            if "frames" in missing:  # a video method on a family without video geometry
                why = "vlprune has no video geometry for it yet (vlprune.registry.video_models() lists those it has)"
            raise ValueError(
                f"method {stage.method!r} needs {missing}, which {adapter.model_type} cannot provide: {why} "
                "(see vlprune.support_table())"
            )
        requests = selector.requests(layer, adapter.vision_depth)
        inside = sorted({r.name for r in requests} & {"cls_attention", "vision_hidden", "vision_keys", "projector"})
        if resolved and resolved[0].selector.tower and inside:
            raise ValueError(
                f"{stage.method!r} reads {inside} from inside the vision tower, where {resolved[0].stage.method!r} "
                "has already removed tokens; a later stage may read the projected features and LLM signals only"
            )
        for request in requests:
            adapter.check_request(request, stage.method)
        if selector.feeds_order() and config.positions != "renumber":
            raise ValueError(
                f"{stage.method!r} with order='release' feeds the release's token order, which the release reads at "
                "contiguous positions: use positions='renumber' (or order='position')"
            )
        if selector.compacts_earlier_cache(layer):
            kinds = {layer_kind(adapter.text_config, i) for i in range(layer)}
            if layer == 0 or kinds - {"full_attention"}:
                raise ValueError(
                    f"{stage.method!r} at layer {layer} drops tokens from the cache of the layers before it, which "
                    f"needs layer > 0 and full-attention layers there (got {sorted(kinds) or 'none'})"
                )
        resolved.append(ResolvedStage(stage, selector, layer, requests))
    caching = [(rs.stage.method, cache) for rs in resolved if (cache := rs.selector.cache_stage()) is not None]
    if caching:
        method, cache = caching[0]
        if len(caching) > 1 or not 1 <= cache.layer < num_layers or resolved[-1].layer >= cache.layer:
            raise ValueError(
                f"{method!r} prunes the KV cache from decoder layer {cache.layer} while decoding: that layer must be "
                f"1 to {num_layers - 1}, after every prefill stage, with one such stage per schedule"
            )
        adapter.check_request(SignalRequest("llm_attention", cache.layer - 1), method)
    return resolved


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
class StageInputs:
    """Everything a stage may read, aligned to the current segment's slots (``rows``, (B, Lc)).

    ``llm`` / ``keys`` / ``incoming`` / ``hidden`` / ``normed``: (B, Lc, ...) tensors; ``text_attention``:
    ``{layer: [(query_rows (t,), head-mean scores (t, Lc), head-max scores (t, Lc)) per sample]}``; ``embeddings``:
    (B, L0, D) indexed by input row; ``spans``: per sample, :func:`frame_spans` (with ``frames``); ``query``: the
    caller's questions and videos per sample (:meth:`vlprune.Pruned.set_query`).
    """

    rows: torch.Tensor
    vision: dict
    llm: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    text_attention: dict[int, list] = field(default_factory=dict)
    incoming: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    spans: list[torch.Tensor] | None = None
    query: tuple[list, list | None] | None = None
    pads: torch.Tensor | None = None  # (B,) left-padding tokens of each sample (input row - pad = its position)


def _tokenwise(view: TokenView, inputs: StageInputs, b: int, slots: torch.Tensor, rows: torch.Tensor, wanted) -> None:
    """Fill the token-wise LLM signals of ``view`` for the given slots (and input ``rows``) of sample ``b``."""
    for name, value in (("hidden", inputs.hidden), ("normed_hidden", inputs.normed)):
        if value is not None and (name, None) in wanted:
            setattr(view, name, value[b][slots.to(value.device)])
    if inputs.embeddings is not None and ("embeddings", None) in wanted:
        view.embeddings = inputs.embeddings[b][rows.to(inputs.embeddings.device)]
    for key, value in inputs.keys.items():
        if ("llm_keys", key) in wanted:
            view.llm_keys[key] = value[b][slots.to(value.device)]


def frame_spans(plans: list[KeepPlan], layouts: list[SampleLayout]) -> list[torch.Tensor]:
    """Per sample, for each visual token (ordinal), the first and last frame ``(nvis, 2)`` of the tokens whose values
    reached it through the merges of ``plans`` (the earlier stages of this prefill, in order): its own frame twice
    when nothing was merged into it (frame 0 for an image). Rows of discarded tokens are meaningless."""
    out = []
    for b, layout in enumerate(layouts):
        frame = torch.zeros(layout.positions.numel(), dtype=torch.long)
        for j, grid in enumerate(layout.grids):
            if layout.frames and layout.frames[j] > 1 and grid is not None:
                mine = layout.image_of == j
                frame[mine] = layout.local[mine] // (grid[0] * grid[1])
        span = torch.stack([frame, frame], dim=1)
        for plan in plans:
            into = plan.merged_into[b]
            source = torch.nonzero(into >= 0).flatten()
            target = into[source]
            if plan.merge_pairs is not None and plan.merge_pairs[b] is not None:
                source, target = plan.merge_pairs[b][0], plan.merge_pairs[b][1]
            new = span.clone()
            new[:, 0].scatter_reduce_(0, target, span[source, 0], "amin")
            new[:, 1].scatter_reduce_(0, target, span[source, 1], "amax")
            span = new
        out.append(span)
    return out


def _view(inputs: StageInputs, layout, b: int, j: int, grid, slots, ordinals, text_slots, wanted):
    image = layout.images[j]
    vision, row = inputs.vision, inputs.rows[b].cpu()
    local = layout.local[ordinals]
    view = TokenView(index=local, grid=grid, image=j, frames=layout.frames[j] if layout.frames else 1)
    view.rows, view.pad = row[slots], (inputs.pads[b] if inputs.pads is not None else 0)
    if inputs.spans is not None and ("frames", None) in wanted:
        view.frame_span = inputs.spans[b][ordinals]
    if inputs.query is not None and ("query", None) in wanted:
        questions, videos = inputs.query
        view.question = questions[b]
        video = j if layout.video_of is None else layout.video_of[j]
        view.raw_frames = (
            videos[b][video] if videos is not None and video is not None and video < len(videos[b]) else None
        )
    if ("features", None) in wanted:
        view.all_features = vision["features"][image]
        view.features = view.all_features[local.to(view.all_features.device)]
    for key, scores in vision.get("cls_attention", {}).items():
        if ("cls_attention", key) in wanted:
            scores = scores[image]  # (N,) of this image (per-image tensors or a list of them)
            view.cls_attention[key] = scores[local.to(scores.device)]
    if ("received_attention", None) in wanted:
        scores = vision["received_attention"][image]
        view.received_attention = scores[local.to(scores.device)]
    if wanted & {("vision_hidden", None), ("projector", None)}:
        hidden = vision["vision_hidden"][image]  # (N, Dv) of this image
        view.vision_hidden = hidden[local.to(hidden.device)]
        view.project = vision.get("project")
    for key, scores in inputs.llm.items():
        if ("llm_attention", key) in wanted:
            view.llm_attention[key] = scores[b][slots.to(scores.device)]
    if inputs.incoming is not None and ("incoming_attention", None) in wanted:
        view.incoming_attention = inputs.incoming[b][slots.to(inputs.incoming.device)]
    for key, per_sample in inputs.text_attention.items():
        if ("text_attention", key) in wanted:
            queries, mean, top = per_sample[b]
            after = (queries > row[slots].max()).to(mean.device)
            view.text_attention[key] = mean[after][:, slots.to(mean.device)]
            view.text_attention_max[key] = top[after][:, slots.to(top.device)]
    _tokenwise(view, inputs, b, slots, row[slots], wanted)
    if any(name in TOKENWISE for name, _ in wanted):
        view.text = TokenView(index=text_slots, grid=None, image=j)
        view.text.rows, view.text.pad = row[text_slots], view.pad
        _tokenwise(view.text, inputs, b, text_slots, row[text_slots], wanted)
    return view


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
    decided = inputs.vision.get("decided") if rs.selector.space == "vision" else None
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
                view = _view(inputs, layout, b, j, grid, slots, sample.slot_ordinal[slots], text_slots, wanted)
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


def decide_vision(rs: ResolvedStage, x: torch.Tensor, store: dict, adapter) -> tuple[torch.Tensor, list[Selection]]:
    """A vision-space first stage, run on the projector's input ``x`` (n_img, N, Dv): decide per image and write the
    outputs of merging selectors into the kept slots (the others are removed before decoder layer 0).

    Returns the new projector input and each image's checked :class:`Selection` (used again at layer 0)."""
    wanted = {(r.name, r.layer) for r in rs.requests}
    decided, out = [], x.clone()
    n = x.shape[1]
    for image in range(x.shape[0]):
        view = TokenView(index=torch.arange(n), grid=adapter.image_grid(n), image=image)
        view.vision_hidden = x[image]
        view.cls_hidden = store["cls_hidden"][image] if "cls_hidden" in store else None
        if "vision_keys" in store:
            keys = store["vision_keys"][image]
            view.vision_keys, view.cls_key = keys[-n:], (keys[0] if keys.shape[0] > n else None)
        for key, scores in store.get("cls_attention", {}).items():
            if ("cls_attention", key) in wanted:
                view.cls_attention[key] = scores[image]
        budget = rs.stage.budget(n)
        view.ratio = rs.stage.ratio
        sources = x[image] if view.cls_hidden is None else torch.cat([x[image], view.cls_hidden[None]])
        chosen = rs.selector.select(view, budget)
        k = min(rs.selector.count(view, budget), n)
        selection = check_selection(rs.stage.method, chosen, n, sources.shape[0], k)
        decided.append(selection)
        out[image, selection.keep.to(x.device)] = selection.apply(sources)
    return out, decided
