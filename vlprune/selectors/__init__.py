"""Selectors: one file per method, each registered under its file stem."""

from . import (  # noqa: F401  (registration)
    dart,
    divprune,
    dycoke,
    fastervlm,
    fastv,
    fastvid,
    flowcut,
    hiprune,
    holitom,
    pdrop,
    pool,
    prunevid,
    query_frames,
    random,
    sparsevlm,
    uniform,
    visionzip,
    vispruner,
    vtc_cls,
    zoo,
)
from .base import Selection, Selector, TowerSelector, top_k

__all__ = ["Selection", "Selector", "TowerSelector", "top_k"]
