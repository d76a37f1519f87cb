"""What a stage reads, assembled per image: the :class:`StageInputs` of the current segment and the
:class:`~vlprune.signals.TokenView` each selector receives."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import llm_signals
from .captures import VisionCaptures
from .signals import TOKENWISE, VISION_LAYERED, TokenView


@dataclass
class StageInputs:
    """Everything a stage may read, aligned to the current segment's slots (``rows``, (B, Lc)).

    ``vision``: what the vision forward captured; ``llm``: the decoder-side signals (:mod:`vlprune.llm_signals`),
    ``{name: {layer or None: value}}`` with a row per slot (``(B, Lc, ...)``, or the signal's own form); ``spans``:
    per sample, :func:`~vlprune.layout.frame_spans` (with ``frames``); ``query``: the caller's questions and videos
    per sample (:meth:`vlprune.Pruned.set_query`); ``pads``: (B,) left-padding tokens of each sample (input row - pad =
    its position).
    """

    rows: torch.Tensor
    vision: VisionCaptures
    llm: dict[str, dict] = field(default_factory=dict)
    spans: list[torch.Tensor] | None = None
    query: tuple[list, list | None] | None = None
    pads: torch.Tensor | None = None


def stage_inputs(requests, vision: VisionCaptures, scored: dict, at_stage, attention_mask) -> StageInputs:
    """A decoder stage's inputs on the current segment (``at_stage.segment``): the scored signals it requested,
    recorded on earlier segments (``scored``: ``{name: {layer: (rows, value)}}``), re-laid on it, and its stage-time
    signals computed from ``at_stage`` (:mod:`vlprune.llm_signals`)."""
    rows = at_stage.segment.rows
    mask = attention_mask
    pads = (mask == 0).sum(1) if mask is not None and mask.dim() == 2 else None  # left padding, no sync
    inputs = StageInputs(rows=rows, vision=vision, pads=pads)
    for request in requests:
        name, key = request.name, request.layer
        if name in llm_signals.SCORED_BY and key in scored.get(name, {}):
            old_rows, value = scored[name][key]
            inputs.llm.setdefault(name, {})[key] = llm_signals.align(name, value, old_rows, rows)
        elif name in llm_signals.AT_STAGE:
            inputs.llm.setdefault(name, {})[key] = llm_signals.AT_STAGE[name](at_stage)
    return inputs


def _decoder_signals(view: TokenView, inputs: StageInputs, b: int, slots, row, wanted, text: bool) -> None:
    """Give ``view`` (sample ``b``'s ``slots``) the decoder-side signals the stage asked for (only those also given
    for the text, with ``text``)."""
    for name, layer in wanted:
        value = inputs.llm.get(name, {}).get(layer)
        if value is not None and (not text or name in TOKENWISE):
            llm_signals.fill(view, name, layer, value, b, slots, row)


def decoder_view(inputs: StageInputs, layout, b: int, j: int, grid, slots, ordinals, text_slots, wanted) -> TokenView:
    """The view of one budget unit (image ``j`` of sample ``b``, or one of its tiles) for a stage at a decoder layer:
    its candidates at ``slots`` of the current segment (``ordinals``: their indices among the sample's visual tokens),
    the ``text_slots`` after it, and the signals in ``wanted`` (``{(name, layer)}``, the stage's requests)."""
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
        view.all_features = vision.features[image]
        view.features = view.all_features[local.to(view.all_features.device)]
    for name in VISION_LAYERED:  # {layer: per image (N,)}: per-image tensors or a list of them
        for key, scores in getattr(vision, name).items():
            if (name, key) in wanted:
                scores = scores[image]
                getattr(view, name)[key] = scores[local.to(scores.device)]
    if wanted & {("vision_hidden", None), ("projector", None)}:
        hidden = vision.vision_hidden[image]  # (N, Dv) of this image
        view.vision_hidden = hidden[local.to(hidden.device)]
        view.project = vision.project
    _decoder_signals(view, inputs, b, slots, row, wanted, text=False)
    if any(name in TOKENWISE for name, _ in wanted):
        view.text = TokenView(index=text_slots, grid=None, image=j)
        view.text.rows, view.text.pad = row[text_slots], view.pad
        _decoder_signals(view.text, inputs, b, text_slots, row, wanted, text=True)
    return view


def vision_view(x: torch.Tensor, image: int, store: VisionCaptures, wanted, grid) -> TokenView:
    """The view of image ``image`` for a vision-space stage, on the projector's input ``x`` (n_img, N, Dv): every
    patch a candidate, with the [CLS] state and key when the tower has one."""
    n = x.shape[1]
    view = TokenView(index=torch.arange(n), grid=grid, image=image)
    view.vision_hidden = x[image]
    view.cls_hidden = store.cls_hidden[image] if store.cls_hidden is not None else None
    if store.vision_keys is not None:
        keys = store.vision_keys[image]
        view.vision_keys, view.cls_key = keys[-n:], (keys[0] if keys.shape[0] > n else None)
    for key, scores in store.cls_attention.items():
        if ("cls_attention", key) in wanted:
            view.cls_attention[key] = scores[image]
    return view
