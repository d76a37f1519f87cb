"""Name registries for selectors (methods) and model adapters.

``@register_selector("name")`` / ``create_selector(name, **params)`` / ``list_methods()``, in the style of timm.
Adapters are keyed by ``config.model_type``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .model_adapters.base import Adapter
    from .selectors.base import Selector

T = TypeVar("T", bound=type)

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SELECTORS: dict[str, type[Selector]] = {}
_ADAPTERS: dict[str, type[Adapter]] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[T], T]:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name must be lower snake case (e.g. 'fastv'), got {name!r}")

    def decorator(cls: T) -> T:
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {table[name].__qualname__}")
        table[name] = cls
        cls.name = name
        return cls

    return decorator


def register_selector(name: str) -> Callable[[T], T]:
    """Class decorator registering a :class:`~vlprune.selectors.base.Selector` under ``name``."""
    return _register(_SELECTORS, "selector", name)


def register_adapter(model_type: str) -> Callable[[T], T]:
    """Class decorator registering an :class:`~vlprune.model_adapters.base.Adapter` for ``config.model_type``."""
    return _register(_ADAPTERS, "adapter", model_type)


def list_methods(inputs: str | None = None) -> list[str]:
    """Registered selector names, sorted; ``inputs="image"`` leaves out the video-only (temporal) methods,
    ``inputs="video"`` lists only them."""
    if inputs not in (None, "image", "video"):
        raise ValueError(f"inputs must be None, 'image' or 'video', got {inputs!r}")
    if inputs is None:
        return sorted(_SELECTORS)
    return sorted(name for name, cls in _SELECTORS.items() if cls.video == (inputs == "video"))


def list_models() -> list[str]:
    """Supported ``config.model_type`` values, sorted."""
    return sorted(_ADAPTERS)


def selector_class(name: str) -> type[Selector]:
    if name not in _SELECTORS:
        raise ValueError(f"unknown method {name!r}; available methods: {list_methods()}")
    return _SELECTORS[name]


def create_selector(name: str, **params: Any) -> Selector:
    """Instantiate the selector ``name`` with its hyper-parameters; unknown parameters are a ``TypeError``."""
    cls = selector_class(name)
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.init)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"method {name!r} got unknown parameter(s) {unknown}; its parameters are: {allowed}")
    return cls(**params)


def adapter_class(model_type: str) -> type[Adapter]:
    if model_type not in _ADAPTERS:
        raise ValueError(f"unsupported model type {model_type!r}; supported model types: {list_models()}")
    return _ADAPTERS[model_type]


def video_models() -> list[str]:
    """The model families whose video inputs vlprune prunes (their adapters provide the ``frames`` signal)."""
    return [m for m in list_models() if adapter_class(m).signals.get("frames") == "yes"]
