"""Efficiency measurements of one prompt: analytic prefill FLOPs from the token counts each layer actually saw,
KV-cache bytes read from the cache, prefill time (time to first token), decode speed, peak memory and the selectors'
own time. Used by ``vlprune bench``; every function works on a wrapped or an unwrapped model. The FLOPs are
:class:`vlprune.app.flops.FlopCount`'s.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from vlprune import hf
from vlprune.app.flops import FlopCount

__all__ = ["FlopCount", "kv_cache_bytes", "measure", "peak_memory"]


def kv_cache_bytes(cache) -> int:
    """Bytes held by the keys and values of a transformers cache (every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if torch.is_tensor(t):
                total += t.numel() * t.element_size()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[str, int]:
    """``("cuda peak allocated", bytes)`` since the last reset on GPU, else ``("process peak RSS", bytes)``."""
    if device.type == "cuda":
        return "cuda peak allocated", int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return "process peak RSS", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def measure(model, inputs: dict, handle=None, repeats: int = 3, new_tokens: int = 8) -> dict[str, float]:
    """Efficiency of one prompt (``inputs``: processor outputs, batch of one) on ``model`` as it is (wrapped or
    not; ``handle``: the :class:`~vlprune.Pruned` handle, for the selectors' time). One warm-up run is discarded;
    times are medians of ``repeats`` runs.

    Returns ``prefill_s`` (time to first token: the prefill forward), ``decode_tok_s`` (tokens per second of
    ``new_tokens`` greedy decoding steps after it), ``selector_s`` (selectors' own time in one prefill),
    ``kv_bytes`` (cache after prefill), ``flops`` / ``vision_flops`` / ``llm_flops`` (prefill, analytic),
    ``llm_tokens`` (tokens of the last decoder layer) and ``peak_bytes`` (see :func:`peak_memory`)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill, decode, selector = [], [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            spent = handle.selector_seconds if handle is not None else 0.0
            _sync(device)
            start = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            middle = time.perf_counter()
            chose = (handle.selector_seconds - spent) if handle is not None else 0.0
            model.generate(**inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False)
            _sync(device)
            end = time.perf_counter()
            if i:  # the first run is a warm-up
                prefill.append(middle - start)
                # generate repeats the prefill: decoding is what it spends beyond one prefill
                decode.append(new_tokens / max(end - middle - (middle - start), 1e-9))
                selector.append(chose)
        with FlopCount(model) as count:
            model(**inputs, use_cache=True, logits_to_keep=1)
    _, peak = peak_memory(device)
    return {
        "prefill_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "selector_s": statistics.median(selector),
        "kv_bytes": kv_cache_bytes(hf.output_cache(out)),
        "flops": count.total,
        "vision_flops": count.vision,
        "llm_flops": count.llm,
        "llm_tokens": count.llm_tokens[-1] if count.llm_tokens else 0,
        "peak_bytes": peak,
    }
