"""InternVL 2.5 / 3 (``InternVLForConditionalGeneration``): InternViT tower with [CLS] -> pixel shuffle (each LLM
token is a 2 x 2 block of patches) -> projector -> placeholders in a Qwen2 (or Llama) decoder with 1-D positions.

An image is one or more tiles (the processor's dynamic tiling); the model only sees a stack of tiles, so an image
is a contiguous run of placeholders in the prompt (the processor wraps each in ``<img>`` ... ``</img>``) and its
budget is shared by all its tiles (``per="tile"``: each tile has its own). [CLS] attention is the tower's [CLS] row
at the feature layer, mapped to LLM tokens by the model's own pixel shuffle (a token's score is the sum over its
2 x 2 patches).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import first_query_attention
from ..hooks import HookSet
from ..registry import register_adapter
from ..schedule import SampleLayout
from ..signals import SignalRequest
from .base import Adapter

SUPPORTED = ("features", "cls_attention", "llm_attention", "llm_keys", "text_attention", "incoming_attention")
SUPPORTED += ("hidden", "normed_hidden", "embeddings", "grid")


@register_adapter("internvl")
class InternVLAdapter(Adapter):
    """Signals: ``features`` (projector output), ``cls_attention`` (feature layer, via the pixel shuffle), every
    decoder-side signal, ``grid`` (single-tile images)."""

    model_type = "internvl"
    summary = "InternVL 2.5 / 3: InternViT with [CLS], pixel shuffle, tiles sharing the budget"
    signals = {name: "yes" for name in SUPPORTED}

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

    def layouts(self, visual: torch.Tensor, store: dict) -> list:
        out, first, tiles = [], 0, []
        for b in range(visual.shape[0]):
            positions = torch.nonzero(visual[b].cpu()).flatten()
            breaks = torch.nonzero(positions[1:] != positions[:-1] + 1).flatten() + 1
            edges = torch.cat([torch.tensor([0]), breaks, torch.tensor([len(positions)])])
            counts = [int(c) for c in torch.diff(edges) if c]
            for c in counts:
                if c % self.tokens_per_tile:
                    raise ValueError(
                        f"an image of sample {b} has {c} placeholders, not a multiple of this model's "
                        f"{self.tokens_per_tile} tokens per tile"
                    )
                tiles.append(c // self.tokens_per_tile)
            image_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
            local = torch.cat([torch.arange(c) for c in counts]) if counts else torch.zeros(0, dtype=torch.long)
            grids = [self.image_grid(c) if c == self.tokens_per_tile else None for c in counts]
            images = list(range(first, first + len(counts)))
            tile_grids = [[self.image_grid(self.tokens_per_tile)] * (c // self.tokens_per_tile) for c in counts]
            tile_of = local // self.tokens_per_tile
            out.append(SampleLayout(positions, image_of, local, images, grids, tile_of=tile_of, tile_grids=tile_grids))
            first += len(counts)
        self._per_image(store, tiles)
        return out

    @staticmethod
    def _per_image(store: dict, tiles: list[int]) -> None:
        """Regroup the per-tile signals captured in the vision forward into one entry per image."""
        for key, target in (("tile_features", None), ("tile_cls", "cls_attention")):
            if key not in store:
                continue
            values = store[key]
            items = values.items() if isinstance(values, dict) else [(None, values)]
            for layer, value in items:
                if sum(tiles) != value.shape[0]:
                    continue  # check_vision reports the mismatch
                grouped = [part.reshape(-1, *part.shape[2:]) for part in value.split(tiles)]
                if target is None:
                    store["features"] = grouped
                else:
                    store.setdefault(target, {})[layer] = grouped

    # --- signals -----------------------------------------------------------------------------------------------
    def check_request(self, request: SignalRequest, method: str) -> None:
        attention = {"llm_attention": "text_config", "llm_keys": "text_config", "text_attention": "text_config"}
        attention["cls_attention"] = "vision_config"
        if request.name == "cls_attention":
            self.vision_layer(request.layer)
        if request.name in attention:
            self._check_attention(attention[request.name], method)

    def install_vision(self, requests: list[SignalRequest], store: dict, hooks: HookSet) -> None:
        if any(r.name == "features" for r in requests):
            hooks.post(self.projector, lambda module, args, kwargs, out: store.__setitem__("tile_features", out))
        by_layer: dict[int, list] = {}
        for r in requests:
            if r.name == "cls_attention":
                by_layer.setdefault(self.vision_layer(r.layer), []).append(r.layer)
        shuffle, ratio = self.base.pixel_shuffle, self.model.config.downsample_ratio

        def scorer(keys):
            def score(module, query, key, value, kwargs):
                patches = first_query_attention(query, key, kwargs.get("scaling")).detach()[:, 1:]  # (tiles, P)
                side = round(patches.shape[1] ** 0.5)
                tokens = shuffle(patches.reshape(-1, side, side, 1), scale_factor=ratio).sum(-1)
                for k in keys:
                    store.setdefault("tile_cls", {})[k] = tokens.reshape(patches.shape[0], -1)

            return score

        for layer, keys in by_layer.items():
            self.inject_scorer(hooks, self.vision_tower.encoder.layer[layer].attention, scorer(keys))
