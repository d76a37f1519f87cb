"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``): a
vision tower without [CLS] whose merger (the projector) turns each 2 x 2 block of patches into one token, scattered
into a decoder with multimodal rotary positions (M-RoPE: a temporal, a height and a width row per token).

Positions: a kept token keeps every row of its M-RoPE position (the rotary ``(cos, sin)`` the language model
computed for it is gathered), and decoding continues from the unpruned sequence's positions, as ``generate`` gives
them. ``positions="renumber"`` (an ablation) gives the kept tokens consecutive positions on all three rows.

Image sizes vary per image: the adapter reads ``grid_thw`` from the vision tower's call. The tower's own
per-image outputs (``pooler_output``) are in raster order for both versions (Qwen2.5-VL undoes its window order
there), which is what the ``features`` signal carries.

Videos: a video is one budget unit of ``t x h x w`` tokens (``t`` temporal patches of two frames each); its tokens
keep their M-RoPE rows, the temporal row included. A batch holds images or videos, not both (the model encodes them
in two vision calls). Qwen3-VL writes each temporal patch as its own run of placeholders after a timestamp, each
with its own time position; the video is still one unit of ``t x h x w`` tokens (the runs in order, the timestamps
and run delimiters text that is always kept), and its DeepStack rows follow its kept tokens as for images.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..captures import VisionCaptures
from ..hooks import HookSet
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import SignalRequest
from .base import Adapter

SUPPORTED = ("features", "grid", "frames", *DECODER_SIGNALS)
NO_CLS = ("cls_attention", "vision_hidden", "vision_keys", "vision_qkv")  # read the [CLS] token or its states


def frame_attention(module, hidden, cos, sin, grid_thw, merge: int, window_index) -> list[torch.Tensor]:
    """FastVID's saliency on Qwen-VL towers, from the input ``hidden`` (L, C) of the vision attention ``module`` (the
    tower's last block) and its rotary ``cos``/``sin``: per image or video of ``grid_thw``, for each temporal patch,
    the softmax attention of the mean of its patches' queries over the mean keys of its ``merge x merge`` blocks
    (the tokens the merger makes), mean over heads. Returns per input its ``(t * h * w / merge^2,)`` scores in raster
    order; ``window_index`` (tokens in window order -> raster token) when the tower reorders its tokens."""
    length = hidden.shape[0]
    heads = module.num_heads
    query, key, _ = module.qkv(hidden).reshape(length, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision(query, key, cos, sin)
    scale = query.shape[-1] ** -0.5
    unit = merge * merge
    out, start, first = [], 0, 0
    for t, h, w in grid_thw.tolist():
        n = h * w // unit
        scores = []
        for f in range(t):
            rows = slice(start + f * h * w, start + (f + 1) * h * w)
            q = query[rows].float().mean(0)  # (heads, d)
            k = key[rows].float().reshape(n, unit, heads, -1).mean(1)  # (n, heads, d)
            scores.append((torch.einsum("hd,nhd->hn", q, k) * scale).softmax(-1).mean(0))
        flat = torch.cat(scores).detach()
        if window_index is not None:
            raster = torch.empty_like(flat)
            raster[(window_index[first : first + t * n] - first).to(flat.device)] = flat
            flat = raster
        out.append(flat)
        start, first = start + t * h * w, first + t * n
    return out


@register_adapter("qwen2_vl")
class Qwen2VLAdapter(Adapter):
    """Signals: ``features`` (merger output, raster order), every decoder-side signal, ``grid``. No [CLS].
    ``received_attention`` is a substitute: FastVID's Qwen2.5-VL saliency (:func:`frame_attention`), the attention of
    each temporal patch's mean query to each merged token in the tower's last block, not the mean over all queries."""

    model_type = "qwen2_vl"
    summary = "Qwen2-VL: images of any size, 2 x 2 merger, M-RoPE positions kept"
    signals = {**{name: "yes" for name in SUPPORTED}, "received_attention": "substitute"}
    feature_layer_only = ("received_attention",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        self.visual = self._bind_vlm(model).visual
        self.merge = config.vision_config.spatial_merge_size
        self.vision_depth = config.vision_config.depth

    # --- tokens ------------------------------------------------------------------------------------------------
    def image_token_counts(self, num_visual: int) -> list[int]:
        raise ValueError(
            f"the prompt has {num_visual} image tokens but the vision tower did not run during this call; pass "
            "pixel_values and image_grid_thw to the wrapped model so vlprune sees each image's size"
        )

    def image_sizes(self, store: VisionCaptures) -> list[int] | None:
        grid = store.family.get("grid_thw")
        return None if grid is None else [int(t * h * w) // self.merge**2 for t, h, w in grid.tolist()]

    def grid_of(self, store: VisionCaptures, image: int, count: int) -> tuple[int, int] | None:
        _, h, w = store.family["grid_thw"][image].tolist()
        return (h // self.merge, w // self.merge)  # of each temporal patch, for a video

    def frames_of(self, store: VisionCaptures, image: int) -> int:
        return int(store.family["grid_thw"][image][0])  # temporal patches (two frames each)

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        deltas = self.base.rope_deltas  # set by the model's own prefill when it computed the M-RoPE index
        if deltas is None:
            return positions
        shifted = positions + deltas.to(positions.device).reshape(-1, 1)
        return torch.stack([positions, shifted, shifted, shifted])

    # --- signals -----------------------------------------------------------------------------------------------
    def why_not(self, signals: list[str]) -> str:
        if set(signals) & set(NO_CLS):
            return "its vision tower has no [CLS] token; use a method reading projected features or decoder attention"
        return "its merger mixes 2 x 2 patch blocks, and vlprune does not expose it as a per-token projector yet"

    def check_request(self, request: SignalRequest, method: str) -> None:
        if request.name in ("llm_attention", "llm_keys", "text_attention"):
            self._check_attention("text_config", method)

    def visual_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        return self.images_or_videos(input_ids, inputs_embeds, self.model.config.video_token_id)

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        # Every call overwrites: the one vision call before a prefill encoded its images or its videos.
        def sizes(module, args, kwargs):
            store.family["grid_thw"] = (kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]).detach().cpu()

        hooks.pre(self.visual, sizes)
        if any(r.name == "features" for r in requests):

            def features(module, args, kwargs, out):
                store.features = list(out.pooler_output.detach().split(self.image_sizes(store)))

            hooks.post(self.visual, features)
        if any(r.name == "received_attention" for r in requests):
            hooks.pre(self.visual.blocks[-1].attn, self._frame_attention(store))

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Window order of the tower's merged tokens (Qwen2.5-VL), ``None`` when it keeps raster order."""
        return None

    def _frame_attention(self, store: VisionCaptures):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            grid = store.family["grid_thw"]
            with torch.no_grad():
                store.received_attention[None] = frame_attention(
                    module, hidden, cos, sin, grid, self.merge, self.window_index(grid)
                )

        return hook


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL (window attention inside the tower does not change the merger's raster output)."""

    model_type = "qwen2_5_vl"
    summary = "Qwen2.5-VL: as Qwen2-VL, window attention inside the tower"

    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        from transformers.vision_utils import get_vision_window_index

        visual = self.visual
        index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return index


@register_adapter("qwen3_vl")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: as Qwen2-VL, plus DeepStack: the features of a few vision layers are added to the visual tokens'
    hidden states after the first decoder layers. Wrapped, vlprune adds them itself, to the visual tokens still
    present at each of those layers (each token gets its own rows; a merged token gets the rows of the token whose
    slot it keeps), so a stage before or between those layers keeps them consistent. Videos as for Qwen2-VL, each
    temporal patch a separate run of placeholders (see the module docstring)."""

    model_type = "qwen3_vl"
    summary = "Qwen3-VL: as Qwen2-VL, DeepStack features follow the kept tokens"
    signals = {name: "yes" for name in SUPPORTED}

    def install_language(self, hooks: HookSet, current_rows, in_prefill) -> None:
        saved: dict = {}

        def take(module, args, kwargs):
            saved.clear()
            embeds = kwargs.get("deepstack_visual_embeds")
            if embeds is None or not in_prefill():
                return None
            masks = kwargs["visual_pos_masks"]
            saved["masks"], saved["embeds"] = masks, embeds
            saved["order"] = (masks.flatten().long().cumsum(0) - 1).reshape(masks.shape)  # row of each visual token
            kwargs["deepstack_visual_embeds"] = None
            return args, kwargs

        def add(level):
            def hook(module, args, kwargs, hidden):
                if not saved or level >= len(saved["embeds"]):
                    return None
                masks = saved["masks"].to(hidden.device)
                rows = current_rows()
                if rows is None:  # no stage yet: every input token is still in its slot
                    rows = torch.arange(masks.shape[1], device=hidden.device).expand(masks.shape[0], -1)
                valid = rows >= 0
                safe = rows.clamp(min=0).to(hidden.device)
                order = saved["order"].to(hidden.device)
                visual = valid.to(hidden.device) & torch.gather(masks, 1, safe)
                embeds = saved["embeds"][level].to(hidden.device, hidden.dtype)
                hidden = hidden.clone()
                hidden[visual] = hidden[visual] + embeds[torch.gather(order, 1, safe)[visual]]
                return hidden

            return hook

        hooks.pre(self.language_model, take)
        for level in range(len(self.model.config.vision_config.deepstack_visual_indexes)):
            hooks.post(self.layers[level], add(level))
