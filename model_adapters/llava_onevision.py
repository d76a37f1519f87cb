"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, model_type ``llava_onevision``): a SigLIP tower
(no [CLS] token) and projector on anyres tiles packed as in LLaVA-NeXT, into a Qwen2 decoder. With
``vision_aspect_ratio="anyres_max_9"`` the model bilinearly downscales the crops' token grid of a large image to at
most about nine tiles' worth of tokens, so those tokens are mixtures of patches; in a multi-image prompt
(``batch_num_images``) every image is a single tile.

Tokens, newlines and budgets are as for LLaVA-NeXT (:mod:`.llava_next`): row-end newlines are never pruned, budgets
are per image across its tiles. Methods that need the tower's [CLS] token or per-patch vision states are refused.
Prompts with videos are refused for now (the video issue).
"""

from __future__ import annotations

from ..registry import register_adapter
from ..signals import SIGNALS
from .llava_next import LlavaNextAdapter

PER_PATCH = ("cls_attention", "vision_hidden", "vision_keys", "vision_qkv", "projector")


@register_adapter("llava_onevision")
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Signals: ``features`` (packed, newlines excluded), every decoder-side signal, ``grid`` (single-tile images).
    No [CLS]."""

    model_type = "llava_onevision"
    summary = "LLaVA-OneVision: SigLIP tower without [CLS], anyres_max_9 tiles, Qwen2 decoder"
    signals = {name: "yes" for name in SIGNALS if name not in (*PER_PATCH, "frames")}  # no video geometry yet

    def why_not(self, signals: list[str]) -> str:
        return (
            "its SigLIP vision tower has no [CLS] token, and the tokens of large images are interpolated from several "
            "patches; use a method reading projected features or decoder attention"
        )
