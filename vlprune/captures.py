"""What the vision forward captured for the current prefill: :class:`VisionCaptures`, filled by the adapter's hooks,
read by the core when it assembles a stage's views (:mod:`vlprune.views`), cleared after every call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class VisionCaptures:
    """The vision-side signals of one call, each per image or video in the order the model scatters their features
    (a tensor with a leading image axis, or a list with one entry per image); ``None`` (``{}`` for the layered
    ones) when not captured. The table in :mod:`vlprune.signals` says what each one is.

    Attributes
    ----------
    features : per image (N, D)
    cls_attention : {vision layer: per image (N,)}
    received_attention : {vision layer: per image (N,)}
    vision_hidden : per image (N, Dv), the projector's input
    cls_hidden : per image (Dv,), the [CLS] state of the feature layer
    vision_keys : per image (T, d), head-mean keys of the feature layer ([CLS] first when the tower has one)
    project : the projector as an fp32 function of ``(m, Dv)`` inputs
    decided : per image, the :class:`~vlprune.selectors.base.Selection` of a vision-space first stage
    video_frames : the caller's :meth:`~vlprune.Pruned.set_videos` for this call
    family : the family's own notes on this call, keyed by its adapter (image sizes, tiles, frame counts, captures
        not yet regrouped per image); no other code reads them
    """

    features: Any = None
    cls_attention: dict[int, Any] = field(default_factory=dict)
    received_attention: dict[int, Any] = field(default_factory=dict)
    vision_hidden: Any = None
    cls_hidden: Any = None
    vision_keys: Any = None
    project: Callable | None = None
    decided: list | None = None
    video_frames: list | None = None
    family: dict[str, Any] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """Whether the signal ``name`` was captured in this call."""
        value = getattr(self, name)
        return value is not None and not (isinstance(value, dict) and not value)

    def drop(self, name: str) -> None:
        """Forget the signal ``name`` (what a hook caught that does not describe this call's tokens)."""
        name = "project" if name == "projector" else name  # the projector signal is captured as ``project``
        setattr(self, name, {} if isinstance(getattr(self, name), dict) else None)

    def clear(self) -> None:
        """Forget everything (after a call)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
