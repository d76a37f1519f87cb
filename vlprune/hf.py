"""What the core reads from transformers by name, one accessor per fact.

transformers renames call keywords and internals between releases: ``generate`` handed the model its KV cache as
``past_key_values`` up to 5.23 and as ``cache`` from 5.24 on (model outputs and the mask builders followed). The
core never spells such a name itself; it asks here, and the version-dependent names sit in :data:`CACHE_NAMES`.
``tests/test_hf_canary.py`` records how ``generate`` calls a model on the installed version, so a future rename
fails one clearly named test. The adapters keep their family's internals behind their own methods (see
:class:`vlprune.model_adapters.base.Adapter`).
"""

from __future__ import annotations

import functools
import inspect

import torch

CACHE_NAMES = ("cache", "past_key_values")  # the KV cache's keyword and output attribute, newest name first

__all__ = ["CACHE_NAMES", "cache_keyword", "cache_length", "call_cache", "causal_mask", "is_prefill", "output_cache"]


def call_cache(kwargs: dict):
    """The KV cache a model or decoder call was given (``None`` when it was given none)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output):
    """The KV cache a model forward returned (``None`` when it returned none)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_keyword(model) -> str:
    """The keyword under which ``model``'s forward takes a KV cache (``cache`` from 5.24, ``past_key_values``
    before)."""
    parameters = inspect.signature(model.forward).parameters
    return next((name for name in CACHE_NAMES if name in parameters), CACHE_NAMES[-1])


def cache_length(cache, layer: int = 0) -> int:
    """Tokens held by ``cache`` at ``layer`` (0 for no cache)."""
    return 0 if cache is None else int(cache.get_seq_length(layer))


def is_prefill(kwargs: dict) -> bool:
    """Whether a model call starts a sequence: it carries no cache, or an empty one. Every later call (a decoding
    step, whatever tokens it feeds, image placeholders sampled by chance among them) continues the cached prompt."""
    return cache_length(call_cache(kwargs)) == 0


@functools.cache
def _mask_cache_name() -> str:
    from transformers.masking_utils import create_causal_mask

    parameters = inspect.signature(create_causal_mask).parameters
    return next(name for name in CACHE_NAMES if name in parameters)


def causal_mask(kind: str, config, hidden: torch.Tensor, mask2d: torch.Tensor, cache, position_ids, layer_idx: int):
    """transformers' own mask for a ``"full_attention"`` or ``"sliding_attention"`` layer: queries ``hidden`` over
    ``cache`` and ``mask2d`` (B, keys), in the format of the model's attention implementation."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    builder = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return builder(
        config=config,
        inputs_embeds=hidden,
        attention_mask=mask2d,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **{_mask_cache_name(): cache},
    )
