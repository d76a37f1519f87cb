"""Signals: what selectors read. The adapter computes only the signals a schedule requests.

=================  =================================================================  ==========================
signal             value in a :class:`TokenView` (one image's candidate tokens, ``n``)  computed by
=================  =================================================================  ==========================
``features``       projected visual tokens ``(n, D)``                                  projector output hook
``cls_attention``  ``{vision_layer: (n,)}`` [CLS]→patch attention, mean over heads      scoring attention function
``llm_attention``  ``{decoder_layer: (n,)}`` last prompt token → token, mean over heads  scoring attention function
``grid``           ``(h, w)`` token grid of the image                                  adapter geometry
=================  =================================================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SIGNALS = ("features", "cls_attention", "llm_attention", "grid")


@dataclass(frozen=True)
class SignalRequest:
    """A signal a selector needs; ``layer`` is a vision layer (``cls_attention``) or decoder layer
    (``llm_attention``); ``None`` means the adapter's default (the vision feature layer)."""

    name: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.name not in SIGNALS:
            raise ValueError(f"unknown signal {self.name!r}; known signals: {SIGNALS}")


@dataclass
class TokenView:
    """The candidate visual tokens of one image, as a selector sees them.

    Attributes
    ----------
    index : LongTensor (n,)
        Raster index of each candidate token within its image's token grid (ascending). Equal to ``arange(n)``
        unless an earlier stage already removed tokens of this image.
    grid : (int, int) or None
        ``(h, w)`` of the image's full token grid, ``None`` when the tokens do not form a grid.
    image : int
        Ordinal of the image within its sample (0 for the first image of the prompt).
    features, cls_attention, llm_attention
        See the module docstring; present only when requested.
    """

    index: torch.Tensor
    grid: tuple[int, int] | None
    image: int
    features: torch.Tensor | None = None
    cls_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    llm_attention: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.index.numel())
