"""Fused kernels for compaction and merging (installed as ``vlprune.kernels``).

Empty for now: the core compacts with the PyTorch reference in :mod:`vlprune.compaction`. Triton kernels with
their references and dispatch arrive with the kernels issue.
"""
