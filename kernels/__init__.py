"""Fused kernels for compaction, merging and cache pruning (installed as ``vlprune.kernels``).

Each op has a PyTorch reference (:mod:`vlprune.kernels.reference`, the specification) and a Triton kernel
(:mod:`vlprune.kernels.triton_ops`). The public functions here dispatch: Triton for CUDA tensors when Triton
imports, the reference otherwise. ``VLPRUNE_KERNELS=reference`` forces the reference everywhere;
``VLPRUNE_KERNELS=triton`` forces Triton on every device (on the CPU that needs ``TRITON_INTERPRET=1`` set before
Triton is imported: its interpreter is how the kernels are tested without a GPU).

Keep indices are ragged: ``keep[b]`` is an ascending 1-D integer tensor of input slots for sample ``b``. Outputs
are left-padded to ``L' = max_b len(keep[b])``; see :mod:`vlprune.kernels.reference` for what padding holds.
"""

# This folder installs as ``vlprune.kernels``. Python started in the repo root (``python -m pytest``, ``python -c``)
# finds it as a top-level ``kernels`` first, which would hide Hugging Face's ``kernels`` package that transformers
# imports: there, this module loads that package in its own place (the import system returns what
# ``sys.modules`` holds once the module has run). See DESIGN.md, "Layout".
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    )
    if _spec is None:  # not installed: an empty module, which transformers' availability check reads as absent
        sys.modules[__name__] = types.ModuleType(__name__)
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        _spec.loader.exec_module(_module)
else:
    from .ops import Compacted, MergeTable, Ragged, backend, compact, gather_cache, merge_compact, merge_table, pack

    __all__ = [
        "Compacted",
        "MergeTable",
        "Ragged",
        "backend",
        "compact",
        "gather_cache",
        "merge_compact",
        "merge_table",
        "pack",
    ]
