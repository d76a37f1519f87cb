"""One place that owns every hook handle a wrap installs, so that removing them is exact and idempotent."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSet:
    """Instance hooks registered through this object are removed together by :meth:`remove`."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """Forward pre-hook with kwargs: ``fn(module, args, kwargs) -> (args, kwargs) | None``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable) -> None:
        """Forward hook with kwargs: ``fn(module, args, kwargs, output) -> output | None``."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)
