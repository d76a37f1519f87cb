"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, model_type ``llava_next``): LLaVA-1.5's CLIP tower and
projector applied to every tile of an "anyres" image (a downscaled base tile plus the crops of a grid of tiles), then
packed by the model: the base tile's tokens, followed by the crops' tokens as one unpadded token grid with a learned
newline token at the end of each row.

Tokens and budgets:

* The newline tokens are never pruned. They are image placeholders that are not *visual tokens* for vlprune: plans
  do not count them (``KeepPlan.visual_rows`` lists the visual tokens' positions) and they always reach the LLM.
* ``keep`` / ``ratio`` apply per image, across all its tiles.
* An image's visual tokens are numbered in the order the model packs them (base tile in raster order, then the
  unpadded grid row by row); single-tile images have a ``grid``, anyres images none.

Signals: per-tile captures (projector output, [CLS] attention, the projector's input) are mapped to the packed
tokens by running the model's own ``pack_image_features`` on tile/patch indices. ``generate`` computes the image
features before the first forward and passes neither ``pixel_values`` nor ``image_sizes`` to it, so vlprune
shadows ``pack_image_features`` on this one model instance while wrapped (the class is untouched) to see the image
sizes. Methods acting on the projector's input or inside the tower (VisionZip, FlowCut) run per tile in their
papers and are not mapped through the packing yet.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..captures import VisionCaptures
from ..hooks import HookSet
from ..layout import SampleLayout
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import SignalRequest
from .llava import LlavaAdapter

TILE_LEVEL = ("vision_keys", "vision_qkv")  # VisionZip and FlowCut act on each tile before the packing
IMAGE_SIDE = ("features", "cls_attention", "vision_hidden", "projector", "grid")  # tiles packed, none of TILE_LEVEL


@register_adapter("llava_next")
class LlavaNextAdapter(LlavaAdapter):
    """Signals: ``features`` (packed, newlines excluded), ``cls_attention`` and ``vision_hidden`` / ``projector``
    mapped from each tile to the packed tokens, every decoder-side signal, ``grid`` (single-tile images)."""

    model_type = "llava_next"
    summary = "LLaVA-NeXT / 1.6: anyres tiles packed with row-end newlines (never pruned)"
    signals = {name: "yes" for name in (*IMAGE_SIDE, *DECODER_SIGNALS)}  # no video

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.pack = self.base.pack_image_features
        self.pack_arguments = inspect.signature(self.pack)

    def why_not(self, signals: list[str]) -> str:
        return (
            "these methods act on each tile before the model packs the tiles into one anyres token grid, and vlprune "
            "does not map them through the packing yet; use a method reading [CLS] attention, features or the LLM"
        )

    # --- tokens ------------------------------------------------------------------------------------------------
    def image_token_counts(self, num_visual: int) -> list[int]:
        raise ValueError(
            f"the prompt has {num_visual} image tokens but the images were not encoded during this call; pass "
            f"pixel_values and image_sizes to the wrapped {self.model_type} model so vlprune sees each image's tiles"
        )

    def image_sizes(self, store: VisionCaptures) -> list[int] | None:
        packed = store.family.get("packed")
        return None if packed is None else [int(p.numel()) for p in packed]

    def layouts(self, visual: torch.Tensor, store: VisionCaptures) -> list:
        out = []
        for layout in super().layouts(visual, store):
            newline = [store.family["packed"][i] == 0 for i in layout.images]
            tiles = [self._tiles(store, i) for i in layout.images]
            newline = torch.cat(newline) if newline else torch.zeros(0, dtype=torch.bool)
            tile_of = [t for t, _ in tiles]
            out.append(
                SampleLayout(
                    positions=layout.positions[~newline],
                    image_of=layout.image_of[~newline],
                    local=torch.cat([torch.arange(len(t)) for t in tile_of]) if tiles else torch.zeros(0).long(),
                    images=layout.images,
                    grids=[
                        self.image_grid(len(t)) if store.family["tiles"][i] == 1 else None
                        for i, t in zip(layout.images, tile_of, strict=True)
                    ],
                    fixed=layout.positions[newline],
                    tile_of=torch.cat(tile_of) if tiles else torch.zeros(0).long(),
                    tile_grids=[grids for _, grids in tiles],
                )
            )
        return out

    def _tiles(self, store: VisionCaptures, image: int) -> tuple[torch.Tensor, list]:
        """Tile (within the image) of each visual token of the batch's ``image``-th image, and each tile's token grid.
        Where the model interpolated the crops' tokens (LLaVA-OneVision), they form one unit after the base tile."""
        sources = store.family["packed"][image]
        sources = sources[sources != 0] - 1
        per_tile = self.tokens_per_image
        first = sum(store.family["tiles"][:image])
        base = torch.arange(len(sources)) >= per_tile
        if not torch.equal(sources, sources.round()):
            rest = len(sources) - per_tile
            return base.long(), [self.image_grid(per_tile), None] if rest else [self.image_grid(per_tile)]
        tile = sources.long() // per_tile - first
        patch = sources.long() % per_tile
        side = self.image_grid(per_tile)
        grids = []
        for t in range(store.family["tiles"][image]):
            here = patch[tile == t]
            if side is None or not len(here):
                grids.append(None)
                continue
            rows, cols = torch.unique(here // side[1]).numel(), torch.unique(here % side[1]).numel()
            grids.append((rows, cols) if rows * cols == len(here) else None)
        return tile, grids

    # --- signals -----------------------------------------------------------------------------------------------
    def visual_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        video = getattr(self.model.config, "video_token_id", None)
        if input_ids is not None and video is not None and (input_ids == video).any():
            raise ValueError(
                f"vlprune does not prune {self.model_type} video inputs yet; unwrap the model for prompts with videos"
            )
        return super().visual_mask(input_ids, inputs_embeds)

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        super().install_vision(requests, store, hooks)  # per-tile captures, regrouped per image below
        hooks.method(self.base, "pack_image_features", lambda original: self._packer(original, store))

    def _packer(self, original, store: VisionCaptures):
        """``pack_image_features`` that also records, per image, where each packed token comes from: ``0`` for a
        newline, else ``1 +`` its flat (tile, patch) index among the batch's tiles (fractional where the model
        interpolates), and regroups the per-tile signals per image in packed order, newlines excluded."""
        signature = self.pack_arguments

        def pack(*args, **kwargs):
            out = original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            tiles = list(bound.arguments["image_features"])
            index, start = [], 1
            for t in tiles:
                n = t.shape[0] * t.shape[1]
                index.append(torch.arange(start, start + n, dtype=torch.float64).reshape(t.shape[0], t.shape[1], 1))
                start += n
            bound.arguments["image_features"] = index
            if bound.arguments.get("image_newline") is not None:
                bound.arguments["image_newline"] = torch.zeros(1, dtype=torch.float64)
            packed = [p[:, 0].cpu() for p in original(*bound.args, **bound.kwargs)[0]]
            store.family["packed"], store.family["tiles"] = packed, [t.shape[0] for t in tiles]
            self._per_image(store, packed, [p.detach() for p in out[0]])
            return out

        return pack

    def _per_image(self, store: VisionCaptures, packed: list[torch.Tensor], features: list[torch.Tensor]) -> None:
        if store.has("features"):
            store.features = [f[p != 0] for f, p in zip(features, packed, strict=True)]
        tiled = dict(store.cls_attention)
        if not tiled and not store.has("vision_hidden"):
            return
        sources = []
        for p in packed:
            p = p[p != 0]
            if not torch.equal(p, p.round()):
                raise ValueError(
                    f"this {self.model_type} model interpolates the tokens of large images, so per-patch vision "
                    "signals do not map to its tokens; use a method reading features or the LLM"
                )
            sources.append(p.long() - 1)
        for key, value in tiled.items():  # (tiles, P) -> per image (n,)
            flat = value.reshape(-1)
            store.cls_attention[key] = [flat[s.to(flat.device)] for s in sources]
        if store.has("vision_hidden"):  # (tiles, P, Dv) -> per image (n, Dv)
            flat = store.vision_hidden.reshape(-1, store.vision_hidden.shape[-1])
            store.vision_hidden = [flat[s.to(flat.device)] for s in sources]
