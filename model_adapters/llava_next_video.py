"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``, model_type ``llava_next_video``): LLaVA-NeXT for
images (anyres tiles packed with row-end newlines, :mod:`.llava_next`), and for videos every frame through the
same CLIP tower, then a 2 x 2 spatial pooling (``spatial_pool_stride``; 24 x 24 -> 12 x 12 on the released models)
before the projector. Video tokens carry no newline: a video is one budget unit of ``frames x h x w`` tokens, the
frames in order, each a raster grid (``grid`` per frame, ``frames``), read from the model's own
``get_video_features`` call. A batch holds images or videos, not both.

Video frames give the projected, pooled ``features`` and every decoder-side signal. Per-patch vision signals
([CLS] attention, the projector's input) are taken before the pooling, so they do not map to the video tokens and
are refused for videos with a clear error.
"""

from __future__ import annotations

import torch

from ..captures import VisionCaptures
from ..hooks import HookSet
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import SignalRequest
from .base import Adapter
from .llava_next import IMAGE_SIDE, LlavaNextAdapter
from .pooled_videos import PooledVideos


@register_adapter("llava_next_video")
class LlavaNextVideoAdapter(PooledVideos, LlavaNextAdapter):
    """Signals: as LLaVA-NeXT for images; ``features``, ``grid``, ``frames`` and every decoder-side signal for
    videos."""

    model_type = "llava_next_video"
    summary = "LLaVA-NeXT-Video: LLaVA-NeXT images; video frames pooled 2 x 2, no newline"
    signals = {name: "yes" for name in (*IMAGE_SIDE, "frames", *DECODER_SIGNALS)}
    image_only = ("cls_attention", "vision_hidden", "projector")  # captured per patch, before the video pooling

    # --- tokens ------------------------------------------------------------------------------------------------
    def visual_mask(self, input_ids, inputs_embeds) -> torch.Tensor:
        return self.images_or_videos(input_ids, inputs_embeds, self.model.config.video_token_id)

    def layouts(self, visual: torch.Tensor, store: VisionCaptures) -> list:
        if "videos" in store.family:  # no newlines, no tiles
            return Adapter.layouts(self, visual, store)
        return super().layouts(visual, store)

    # --- signals -----------------------------------------------------------------------------------------------
    def check_vision(self, store: VisionCaptures, layouts: list, required: set[str]) -> None:
        if "videos" in store.family:
            per_patch = sorted(set(required) & set(self.image_only))
            if per_patch:
                raise ValueError(
                    f"{per_patch} are taken per patch before {self.model_type}'s video pooling and do not map to its "
                    "video tokens; use a method reading features or the LLM for videos"
                )
            for name in self.image_only:  # what the hooks caught of the frames before pooling
                store.drop(name)
        super().check_vision(store, layouts, required)

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        super().install_vision(requests, store, hooks)
        features = any(r.name == "features" for r in requests)
        hooks.method(self.base, "get_video_features", lambda original: self._video_encoder(original, store, features))

    def _packer(self, original, store: VisionCaptures):
        pack = super()._packer(original, store)

        def run(*args, **kwargs):
            store.family.pop("videos", None)  # this call encodes images
            return pack(*args, **kwargs)

        return run

    def _video_encoder(self, original, store: VisionCaptures, wants_features: bool):
        """``get_video_features`` that also records each video's frame count and tokens per frame, and (for the
        ``features`` signal) each video's projected, pooled frame tokens."""

        def encode(pixel_values_videos, *args, **kwargs):
            out = original(pixel_values_videos, *args, **kwargs)
            videos, frames = pixel_values_videos.shape[:2]
            pooled = per_video(out.pooler_output)  # per video (frames * per_frame, D)
            store.family.pop("packed", None)
            store.family["videos"], store.family["frame_tokens"] = [frames] * videos, pooled[0].shape[0] // frames
            if wants_features:
                store.features = [p.detach() for p in pooled]
            return out

        return encode


def per_video(pooled) -> list[torch.Tensor]:
    """``get_video_features``' pooled output as one (frames * per_frame, D) tensor per video: transformers 5.25
    returns a (videos, frames * per_frame, D) tensor, 5.19 a tuple of (frames, per_frame, D) per video."""
    if isinstance(pooled, torch.Tensor):
        return list(pooled.unbind(0))
    return [p.flatten(0, 1) if p.dim() == 3 else p for p in pooled]
