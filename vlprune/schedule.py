"""Resolving a :class:`PruneConfig` against a model (validation before anything is installed), and turning one
stage's signals into kept slots and a :class:`KeepPlan`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import PruneConfig, Stage
from .plan import KeepPlan
from .registry import create_selector
from .selectors.base import Selector
from .signals import SignalRequest, TokenView


@dataclass
class ResolvedStage:
    stage: Stage
    selector: Selector
    layer: int
    requests: list[SignalRequest]


@dataclass
class SampleLayout:
    """Where one sample's visual tokens are: ``positions`` (n,) in the input sequence, the ``image_of`` each (n,)
    (ordinal within the sample), its ``local`` raster index within that image (n,), and per image of the sample its
    global index in the batch's feature tensors (``images``) and token grid (``grids``)."""

    positions: torch.Tensor
    image_of: torch.Tensor
    local: torch.Tensor
    images: list[int]
    grids: list[tuple[int, int] | None]


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
        requests = selector.requests(layer, adapter.vision_depth)
        for request in requests:
            adapter.check_request(request, stage.method)
        resolved.append(ResolvedStage(stage, selector, layer, requests))
    return resolved


def _check_selection(method: str, chosen: torch.Tensor, n: int, k: int) -> torch.Tensor:
    chosen = torch.as_tensor(chosen).reshape(-1).long().cpu()
    if chosen.numel() != k or (chosen.numel() and (chosen.min() < 0 or chosen.max() >= n)):
        raise RuntimeError(f"selector {method!r} returned {chosen.numel()} indices for keep={k} of {n} tokens")
    chosen = torch.sort(chosen).values
    if chosen.numel() > 1 and bool((chosen[1:] == chosen[:-1]).any()):
        raise RuntimeError(f"selector {method!r} returned duplicate indices")
    return chosen


def decide(
    rs: ResolvedStage,
    rows: torch.Tensor,
    layouts: list[SampleLayout],
    vision: dict,
    llm: dict[int, torch.Tensor],
) -> tuple[list[torch.Tensor], KeepPlan]:
    """Apply one stage to the current segment.

    Parameters
    ----------
    rows : LongTensor (B, Lc)
        Input-sequence index of each slot of the current segment (``-1`` for added padding).
    layouts : per-sample visual token layout.
    vision : ``{"features": (n_img, N, D), "cls_attention": {layer: (n_img, N)}}`` as captured.
    llm : ``{decoder_layer: (B, Lc)}`` attention of the last prompt token over the current slots.

    Returns
    -------
    keep_slots : per sample, ascending slot indices to keep.
    plan : the stage's :class:`KeepPlan`.
    """
    wanted = {(r.name, r.layer) for r in rs.requests}  # a view carries only this stage's own signals
    cls = {k: v for k, v in vision.get("cls_attention", {}).items() if ("cls_attention", k) in wanted}
    llm = {k: v for k, v in llm.items() if ("llm_attention", k) in wanted}
    features = vision.get("features") if ("features", None) in wanted else None
    keep_slots, keep_visual, keep_tokens, image_of = [], [], [], []
    for b, layout in enumerate(layouts):
        row = rows[b].cpu()
        found = torch.searchsorted(layout.positions, row).clamp(max=max(layout.positions.numel() - 1, 0))
        slot_visual = (row >= 0) & (layout.positions.numel() > 0)
        if layout.positions.numel():
            slot_visual &= layout.positions[found] == row
        slot_ordinal = torch.where(slot_visual, found, -1)  # (Lc,) index into the sample's visual tokens
        kept = [torch.nonzero((row >= 0) & ~slot_visual).flatten()]  # text (and the input's padding) stays
        for j, image in enumerate(layout.images):
            slots = torch.nonzero(slot_visual & (layout.image_of[slot_ordinal.clamp(min=0)] == j)).flatten()
            if slots.numel() == 0:
                continue
            local = layout.local[slot_ordinal[slots]]
            view = TokenView(index=local, grid=layout.grids[j], image=j)
            if features is not None:
                view.features = features[image][local.to(features.device)]
            for key, scores in cls.items():
                view.cls_attention[key] = scores[image][local.to(scores.device)]
            for key, scores in llm.items():
                view.llm_attention[key] = scores[b][slots.to(scores.device)]
            k = rs.stage.budget(int(slots.numel()))
            kept.append(slots[_check_selection(rs.stage.method, rs.selector.select(view, k), view.n, k)])
        slots_b = torch.sort(torch.cat(kept)).values
        keep_slots.append(slots_b)
        visual_b = torch.sort(slot_ordinal[slots_b][slot_visual[slots_b]]).values
        keep_visual.append(visual_b)
        image_of.append(layout.image_of[visual_b])
        keep_tokens.append(row[slots_b])
    plan = KeepPlan(
        layer=rs.layer,
        method=rs.stage.method,
        keep_visual=keep_visual,
        keep_tokens=keep_tokens,
        image_of=image_of,
        num_visual=[int(layout.positions.numel()) for layout in layouts],
    )
    return keep_slots, plan
