"""Selectors: one file per method, each registered under its file stem."""

from . import dart, divprune, fastervlm, fastv, pdrop, pool, random, sparsevlm, uniform, visionzip, vtc_cls, zoo  # noqa: F401  (registration)
from .base import Selection, Selector, top_k

__all__ = ["Selection", "Selector", "top_k"]
