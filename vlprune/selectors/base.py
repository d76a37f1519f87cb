"""Base class of selectors: pure functions from one image's signals to the indices of the tokens kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..signals import SignalRequest, TokenView


@dataclass
class Selector:
    """A pruning method's decision rule. Subclasses are dataclasses whose fields are the hyper-parameters.

    A selector never touches modules, caches, masks or positions: it receives a :class:`TokenView` per image and
    returns which of its ``view.n`` candidate tokens to keep.
    """

    name: ClassVar[str] = ""
    default_layer: ClassVar[int] = 0
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        """Signals needed by a stage of this selector that prunes before decoder layer ``layer``, on a model whose
        vision tower has ``vision_depth`` layers. Raise ``ValueError`` for a layer the method cannot use."""
        return []

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        """Return ``keep`` distinct indices into ``0..view.n-1`` (any order; the core sorts them)."""
        raise NotImplementedError


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties broken towards the lower index (deterministic)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]
