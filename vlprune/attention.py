"""Scoring attention: attention functions registered under new names (``vlprune_sdpa``, ``vlprune_eager``, ...)
that call the model's own implementation unchanged and, on the modules asked to, compute the few attention rows a
selector needs (the [CLS] row, the last query's row) on the side. SDPA and FlashAttention stay in use.

A module is asked by a forward pre-hook that adds a ``vlprune_scorer`` callable to its keyword arguments, which
transformers passes through to the attention function; every other call is a plain delegation.
Registration happens when a model is wrapped, never at import.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

SCORER_KWARG = "vlprune_scorer"
PREFIX = "vlprune_"
SUPPORTED_BASES = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")

Scorer = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict], None]  # (module, q, k, v, kwargs)


def scoring_name(base: str) -> str:
    """Registered name of the scoring wrapper of attention implementation ``base``."""
    if base is None or base.startswith(PREFIX):
        return base
    if base not in SUPPORTED_BASES:
        raise ValueError(
            f"attention implementation {base!r} cannot be wrapped for attention scores; supported: {SUPPORTED_BASES}"
        )
    return PREFIX + base


def _module_eager(module: torch.nn.Module) -> Callable:
    # The "eager" implementation is each modeling file's own function, not a registry entry.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} defines no eager_attention_forward to delegate to")
    return fn


def _make_attention(base: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def attention(module, query, key, value, attention_mask, **kwargs):
        scorer = kwargs.pop(SCORER_KWARG, None)
        if scorer is not None:
            scorer(module, query, key, value, kwargs)
        fn = _module_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def ensure_registered(base: str) -> str:
    """Register the scoring wrapper of ``base`` (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = scoring_name(base)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def switch_to_scoring(model, keys: list[str]) -> dict[str, str]:
    """Run the attention of each sub-config in ``keys`` (``"text_config"``, ``"vision_config"``) through its scoring
    wrapper; returns ``{key: the implementation it had}`` for those switched, to restore on unwrap."""
    saved = {}
    for key in keys:
        current = getattr(model.config, key)._attn_implementation
        wrapped = ensure_registered(current)
        if wrapped != current:
            saved[key] = current
            model.set_attn_implementation({key: wrapped})
    return saved


def head_probabilities(query: torch.Tensor, key: torch.Tensor, scaling: float | None, key_mask) -> torch.Tensor:
    """Softmax attention of the given query rows over all keys, per head: ``(B, Hkv, g, Lq, Lk)``.

    ``query`` (B, H, Lq, D), ``key`` (B, Hkv, Lk, D) with grouped heads (H = Hkv * g); ``key_mask`` (B, Lk) bool.
    """
    b, h, lq, d = query.shape
    hkv = key.shape[1]
    scaling = d**-0.5 if scaling is None else scaling
    q = query.float().reshape(b, hkv, h // hkv, lq, d)  # (B, Hkv, g, Lq, D)
    logits = torch.einsum("bkgqd,bkld->bkgql", q, key.float()) * scaling  # (B, Hkv, g, Lq, Lk)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, None, :], float("-inf"))
    return logits.softmax(-1)


def head_mean_attention(query: torch.Tensor, key: torch.Tensor, scaling: float | None, key_mask) -> torch.Tensor:
    """Softmax attention of the given query rows over all keys, mean over heads: ``(B, Lq, Lk)`` (arguments as
    :func:`head_probabilities`)."""
    return head_probabilities(query, key, scaling, key_mask).mean(dim=(1, 2))


def last_query_attention(query: torch.Tensor, key: torch.Tensor, scaling, key_mask=None) -> torch.Tensor:
    """Head-mean attention of the last query row over all keys: ``(B, Lk)``."""
    return head_mean_attention(query[:, :, -1:], key, scaling, key_mask)[:, 0]


def first_query_attention(query: torch.Tensor, key: torch.Tensor, scaling) -> torch.Tensor:
    """Head-mean attention of the first query row ([CLS] in CLIP-like towers) over all keys: ``(B, Lk)``."""
    return head_mean_attention(query[:, :, :1], key, scaling, None)[:, 0]


def repeated_keys(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Keys ``(B, Hkv, L, D)`` repeated to the query's heads and flattened per token: ``(B, L, H*D)``."""
    b, hkv, length, d = key.shape
    key = key.repeat_interleave(query.shape[1] // hkv, dim=1)  # (B, H, L, D)
    return key.transpose(1, 2).reshape(b, length, -1)


def text_attention(query, key, scaling, key_mask, rows: torch.Tensor, layouts) -> list:
    """Per sample: the input rows of its text tokens after its first visual token, and their attention over all keys
    ``(t, L)``, as the mean and as the maximum over heads. ``rows`` (B, L) are the input rows of the current slots;
    ``layouts`` the samples' :class:`~vlprune.layout.SampleLayout`."""
    out = []
    for b, layout in enumerate(layouts):
        row = rows[b].cpu()
        if layout.positions.numel() == 0:
            empty = query.new_zeros(0, key.shape[2])
            out.append((torch.zeros(0, dtype=torch.long), empty, empty))
            continue
        after = (row > layout.positions[0]) & ~torch.isin(row, layout.positions) & ~torch.isin(row, layout.fixed)
        if key_mask is not None:
            after &= key_mask[b].cpu()
        slots = torch.nonzero(after).flatten()
        mask_b = key_mask[b : b + 1] if key_mask is not None else None
        probs = head_probabilities(query[b : b + 1, :, slots.to(query.device)], key[b : b + 1], scaling, mask_b)
        out.append((row[slots], probs[0].mean(dim=(0, 1)), probs[0].amax(dim=(0, 1))))
    return out
