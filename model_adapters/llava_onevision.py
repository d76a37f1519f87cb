"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type ``llava_onevision``): a SigLIP tower
(no [CLS] token) and projector on anyres tiles packed as in LLaVA-NeXT, into a Qwen2 decoder. With
``vision_aspect_ratio="anyres_max_9"`` the model bilinearly downscales the crops' token grid of a large image to at
most about nine tiles' worth of tokens, so those tokens are mixtures of patches; in a multi-image prompt
(``batch_num_images``) every image is a single tile.

Tokens, newlines and budgets are as for LLaVA-NeXT (:mod:`.llava_next`): row-end newlines are never pruned, budgets
are per image across its tiles. Methods that need the tower's [CLS] token or per-patch vision states are refused.

Videos: every frame goes through the tower and projector, then a 2 x 2 bilinear pooling (27 x 27 -> 14 x 14 on the
released models), and one newline token follows the whole video. A video is one budget unit of ``frames x h x w``
tokens (``grid`` per frame, ``frames``); its newline is never pruned. A batch holds images or videos, not both.
``received_attention`` (HoliTom) is measured on video frames only: the attention each patch receives in the feature
layer, pooled by the model's own 2 x 2 bilinear pooling as its features are.
"""

from __future__ import annotations

import torch

from ..captures import VisionCaptures
from ..hooks import HookSet
from ..layout import SampleLayout
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import SignalRequest
from .base import Adapter
from .llava_next import LlavaNextAdapter
from .pooled_videos import PooledVideos


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(PooledVideos, LlavaNextAdapter):
    """Signals: ``features`` (packed, newlines excluded; pooled per frame for videos), every decoder-side signal,
    ``grid`` (single-tile images; each frame of a video), ``frames`` and ``received_attention`` (videos). No
    [CLS]."""

    model_type = "llava_onevision"
    summary = "LLaVA-OneVision: SigLIP tower without [CLS], anyres_max_9 tiles, pooled video frames, Qwen2 decoder"
    signals = {name: "yes" for name in ("features", "received_attention", "grid", "frames", *DECODER_SIGNALS)}
    feature_layer_only = ("received_attention",)  # measured on video frames, pooled like the features
    video_newline = 1  # one newline placeholder after each video

    def why_not(self, signals: list[str]) -> str:
        return (
            "its SigLIP vision tower has no [CLS] token, and the tokens of large images are interpolated from several "
            "patches; use a method reading projected features or decoder attention"
        )

    # --- tokens ------------------------------------------------------------------------------------------------
    def visual_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        return self.images_or_videos(input_ids, inputs_embeds, self.model.config.video_token_id)

    def layouts(self, visual: torch.Tensor, store: VisionCaptures) -> list:
        if "videos" not in store.family:
            return super().layouts(visual, store)
        out = []
        for layout in Adapter.layouts(self, visual, store):
            counts = torch.bincount(layout.image_of, minlength=len(layout.images))
            last = torch.cumsum(counts, 0) - 1  # each video's newline: its last placeholder
            visual_token = torch.ones(layout.positions.numel(), dtype=torch.bool)
            visual_token[last] = False
            out.append(
                SampleLayout(
                    positions=layout.positions[visual_token],
                    image_of=layout.image_of[visual_token],
                    local=layout.local[visual_token],
                    images=layout.images,
                    grids=layout.grids,
                    fixed=layout.positions[~visual_token],
                    frames=layout.frames,
                )
            )
        return out

    # --- signals -----------------------------------------------------------------------------------------------
    def check_vision(self, store: VisionCaptures, layouts: list, required: set[str]) -> None:
        if "received_attention" in required and "videos" not in store.family:
            raise ValueError(
                "received_attention (HoliTom's signal) is measured on video frames only; this llava_onevision call "
                "encodes images: use an image method"
            )
        super().check_vision(store, layouts, required)

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        super().install_vision(requests, store, hooks)
        features = any(r.name == "features" for r in requests)
        if any(r.name == "received_attention" for r in requests):
            attention = self.vision_tower.encoder.layers[self.vision_layer(None)].self_attn
            hooks.pre(attention, self.received_hook(lambda scores: store.family.__setitem__("vision_received", scores)))
        hooks.method(self.base, "get_video_features", lambda original: self._video_encoder(original, store, features))

    def _packer(self, original, store: VisionCaptures):
        pack = super()._packer(original, store)

        def run(*args, **kwargs):
            store.family.pop("videos", None)  # this call encodes images
            store.family.pop("vision_received", None)
            store.drop("received_attention")
            return pack(*args, **kwargs)

        return run

    def _video_encoder(self, original, store: VisionCaptures, wants_features: bool):
        """``get_video_features`` that also records each video's frame count and tokens per frame, and (for the
        ``features`` signal) each video's pooled frame tokens without its newline."""

        def encode(pixel_values_videos, *args, **kwargs):
            out = original(pixel_values_videos, *args, **kwargs)
            videos, frames = pixel_values_videos.shape[:2]
            pooled = out.pooler_output  # (videos, frames * per_frame + 1, D)
            store.family.pop("packed", None)
            store.family["videos"], store.family["frame_tokens"] = [frames] * videos, (pooled.shape[1] - 1) // frames
            if wants_features:
                store.features = [p[:-1].detach() for p in pooled]
            received = store.family.pop("vision_received", None)
            if received is not None:  # (videos * frames, T): drop what the features drop, pool as they are pooled
                received = received[:, 1:] if self.strategy == "default" else received
                received = self.base.apply_pooling(received[..., None]).reshape(videos, -1)
                store.received_attention[None] = list(received)
            return out

        return encode
