"""Selectors: one file per method, each registered under its file stem."""

from . import divprune, fastervlm, fastv, random, uniform, vtc_cls  # noqa: F401  (registration)
from .base import Selector, top_k

__all__ = ["Selector", "top_k"]
