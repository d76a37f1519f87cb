"""One place that owns every hook handle a wrap installs, so that removing them is exact and idempotent."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class _Shadow:
    """Handle of an instance attribute set by :meth:`HookSet.method`; removing it deletes the attribute."""

    def __init__(self, obj: object, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        vars(self.obj).pop(self.name, None)


class HookSet:
    """Instance hooks registered through this object are removed together by :meth:`remove`."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle | _Shadow] = []

    def pre(self, module: nn.Module, fn: Callable) -> None:
        """Forward pre-hook with kwargs: ``fn(module, args, kwargs) -> (args, kwargs) | None``."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable, always: bool = False) -> None:
        """Forward hook with kwargs: ``fn(module, args, kwargs, output) -> output | None``; ``always``: also when the
        forward (or a pre-hook) raised."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=True, always_call=always))

    def method(self, obj: object, name: str, make: Callable) -> None:
        """Shadow ``obj.name`` on this one instance by ``make(original)`` until :meth:`remove` (the class is untouched,
        other instances are unaffected). For model code a module hook cannot reach, such as a method ``generate``
        calls outside any ``forward``."""
        if name in vars(obj):
            raise RuntimeError(f"{type(obj).__name__}.{name} is already shadowed on this instance")
        vars(obj)[name] = make(getattr(obj, name))
        self._handles.append(_Shadow(obj, name))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)
