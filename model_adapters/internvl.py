"""InternVL 2.5 / 3 (``InternVLForConditionalGeneration``): InternViT tower with [CLS] -> pixel shuffle (each LLM
token is a 2 x 2 block of patches) -> projector -> placeholders in a Qwen2 (or Llama) decoder with 1-D positions.

An image is one or more tiles (the processor's dynamic tiling); the model only sees a stack of tiles, so an image
is a contiguous run of placeholders in the prompt (the processor wraps each in ``<img>`` ... ``</img>``) and its
budget is shared by all its tiles (``per="tile"``: each tile has its own). [CLS] attention is the tower's [CLS] row
at the feature layer, mapped to LLM tokens by the model's own pixel shuffle (a token's score is the sum over its
2 x 2 patches).

Videos: the processor writes each frame as a one-tile image of its own (``Frame1: <img>...</img>``, ...), so the
prompt alone does not say which runs are frames of one video. The caller says it with
:meth:`vlprune.Pruned.set_videos` (the CLI, the demo and the lmms-eval model do); a video is then one budget unit of
``frames x h x w`` tokens (its frames are its tiles, for ``per="tile"``), and the text between its frames is text.
``received_attention`` (HoliTom, FastVID) is the attention each patch receives in the feature layer (softmax over
keys, mean over heads and queries, the [CLS] key dropped), summed over each token's 2 x 2 patches as [CLS] attention
is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import first_query_attention, head_mean_attention
from ..captures import VisionCaptures
from ..hooks import HookSet
from ..layout import SampleLayout
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import ATTENTION, SignalRequest
from .base import Adapter

SUPPORTED = ("features", "cls_attention", "received_attention", "grid", "frames", *DECODER_SIGNALS)
CAPTURED = {"tile_features": "features", "tile_cls": "cls_attention", "tile_received": "received_attention"}


def ordinals(hint: list[int | None]) -> list[int | None]:
    """Per image or video of a :meth:`vlprune.Pruned.set_videos` entry, its ordinal among the videos (``None``: an
    image)."""
    out, videos = [], 0
    for frames in hint:
        out.append(None if frames is None else videos)
        videos += frames is not None
    return out


@register_adapter("internvl")
class InternVLAdapter(Adapter):
    """Signals: ``features`` (projector output), ``cls_attention`` and ``received_attention`` (feature layer, via the
    pixel shuffle), every decoder-side signal, ``grid`` (single-tile images; each frame of a video), ``frames``
    (videos the caller described with :meth:`vlprune.Pruned.set_videos`)."""

    model_type = "internvl"
    summary = "InternVL 2.5 / 3: InternViT with [CLS], pixel shuffle, tiles sharing the budget, frames as tiles"
    signals = {name: "yes" for name in SUPPORTED}
    feature_layer_only = ("received_attention",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        base = self._bind_vlm(model)
        self.vision_tower = base.vision_tower
        self.projector = base.multi_modal_projector
        self.vision_depth = config.vision_config.num_hidden_layers
        self.tokens_per_tile = config.image_seq_length
        self.feature_hidden = config.vision_feature_layer

    def why_not(self, signals: list[str]) -> str:
        return "vlprune does not map InternViT's inner states through the pixel shuffle for these yet"

    # --- tokens ------------------------------------------------------------------------------------------------
    def image_token_counts(self, num_visual: int) -> list[int]:
        return [num_visual]  # unused: layouts() splits the placeholders into images itself

    def layouts(self, visual: torch.Tensor, store: VisionCaptures) -> list:
        hint = store.video_frames
        out, first, tiles = [], 0, []
        for b in range(visual.shape[0]):
            positions = torch.nonzero(visual[b].cpu()).flatten()
            breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
            edges = torch.cat([torch.tensor([0]), breaks, torch.tensor([len(positions)])])
            runs = [int(c) for c in torch.diff(edges) if c]
            counts, frames = self._units(b, runs, None if hint is None else hint[b])
            for c in counts:
                tiles.append(c // self.tokens_per_tile)
            image_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
            local = torch.cat([torch.arange(c) for c in counts]) if counts else torch.zeros(0, dtype=torch.long)
            tile = self.image_grid(self.tokens_per_tile)
            grids = [tile if c == self.tokens_per_tile * t else None for c, t in zip(counts, frames, strict=True)]
            tile_grids = [[tile] * (c // self.tokens_per_tile) for c in counts]
            out.append(
                SampleLayout(
                    positions,
                    image_of,
                    local,
                    list(range(first, first + len(counts))),
                    grids,
                    tile_of=local // self.tokens_per_tile,
                    tile_grids=tile_grids,
                    frames=frames,
                    video_of=None if hint is None else ordinals(hint[b]),
                )
            )
            first += len(counts)
        self._per_image(store, tiles)
        return out

    def _units(self, b: int, runs: list[int], hint: list[int | None] | None) -> tuple[list[int], list[int]]:
        """Token count and frame count of each image or video of sample ``b`` from its placeholder ``runs``: a run
        is an image, unless ``hint`` (per image or video in prompt order: ``None`` or its frame count) makes
        consecutive runs the frames of a video, each one tile."""
        per = self.tokens_per_tile
        for c in runs:
            if c % per:
                raise ValueError(
                    f"an image of sample {b} has {c} placeholders, not a multiple of this model's {per} tokens per tile"
                )
        if hint is None:
            return runs, [1] * len(runs)
        described = sum(1 if f is None else f for f in hint)
        if described != len(runs):
            raise ValueError(
                f"set_videos described sample {b} as {hint} ({described} image runs <img>...</img>, one per image and "
                f"one per video frame), but its prompt has {len(runs)}"
            )
        counts, frames, at = [], [], 0
        for f in hint:
            if f is None:
                counts.append(runs[at])
                frames.append(1)
                at += 1
                continue
            if any(c != per for c in runs[at : at + f]):
                raise ValueError(
                    f"set_videos described a video of {f} frames in sample {b}, but its runs have {runs[at : at + f]} "
                    f"placeholders; each frame of a video is one tile of {per}"
                )
            counts.append(per * f)
            frames.append(f)
            at += f
        return counts, frames

    @staticmethod
    def _per_image(store: VisionCaptures, tiles: list[int]) -> None:
        """Regroup the per-tile signals captured in the vision forward into one entry per image or video."""
        for key, target in CAPTURED.items():
            if key not in store.family:
                continue
            values = store.family[key]
            by_layer = isinstance(values, dict)
            for layer, value in values.items() if by_layer else [(None, values)]:
                if sum(tiles) != value.shape[0]:
                    continue  # check_vision reports the mismatch
                grouped = [part.reshape(-1, *part.shape[2:]) for part in value.split(tiles)]
                if by_layer:
                    getattr(store, target)[layer] = grouped
                else:
                    setattr(store, target, grouped)

    # --- signals -----------------------------------------------------------------------------------------------
    def check_request(self, request: SignalRequest, method: str) -> None:
        attention = {**ATTENTION, "received_attention": "vision_config"}  # InternVL scores it in the tower's attention
        if request.name == "cls_attention":
            self.vision_layer(request.layer)
        if request.name in attention:
            self._check_attention(attention[request.name], method)

    def scoring_configs(self, requests: list[SignalRequest]) -> list[str]:
        keys = super().scoring_configs(requests)
        if any(r.name == "received_attention" for r in requests) and "vision_config" not in keys:
            keys = sorted([*keys, "vision_config"])
        return keys

    def check_frames(self, store: VisionCaptures, layouts: list) -> None:
        if store.video_frames is None:
            raise ValueError(
                "InternVL's processor writes each video frame as an image of its own, so the prompt does not say which "
                "images are frames of one video: call pruned.set_videos(...) with, per sample, each image (None) or "
                "video (its frame count) in prompt order before the call"
            )

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        if any(r.name == "features" for r in requests):
            hooks.post(self.projector, lambda module, args, kwargs, out: store.family.__setitem__("tile_features", out))
        by_layer: dict[int, list] = {}
        for r in requests:
            if r.name == "cls_attention":
                by_layer.setdefault(self.vision_layer(r.layer), []).append(r.layer)
        received = any(r.name == "received_attention" for r in requests)
        feature_layer = self.vision_layer(None) if received else None
        for layer in sorted(set(by_layer) | ({feature_layer} if received else set())):
            scorer = self._scorer(store, by_layer.get(layer, []), received and layer == feature_layer)
            self.inject_scorer(hooks, self.vision_tower.encoder.layer[layer].attention, scorer)

    def _to_tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """(tiles, P) patch scores -> (tiles, P / 4) token scores: the model's pixel shuffle, summed per token."""
        side = round(patches.shape[1] ** 0.5)
        shuffle, ratio = self.base.pixel_shuffle, self.model.config.downsample_ratio
        return shuffle(patches.reshape(-1, side, side, 1), scale_factor=ratio).sum(-1).reshape(patches.shape[0], -1)

    def _scorer(self, store: VisionCaptures, keys: list, received: bool, chunk: int = 8):
        """A scorer for one tower attention: the [CLS] row under each of ``keys`` (``tile_cls``) and, with
        ``received``, the attention each patch receives (``tile_received``, ``chunk`` tiles at a time)."""

        def score(module, query, key, value, kwargs):
            scaling = kwargs.get("scaling")
            if keys:
                tokens = self._to_tokens(first_query_attention(query, key, scaling).detach()[:, 1:])
                for k in keys:
                    store.family.setdefault("tile_cls", {})[k] = tokens
            if received:
                with torch.no_grad():
                    parts = [
                        head_mean_attention(q, k, scaling, None).mean(1)[:, 1:]
                        for q, k in zip(query.split(chunk), key.split(chunk), strict=True)
                    ]
                store.family["tile_received"] = {None: self._to_tokens(torch.cat(parts))}

        return score
