"""Efficiency measurements of one prompt: analytic prefill FLOPs from the token counts each layer actually saw,
KV-cache bytes read from the cache, prefill time (time to first token), decode speed, peak memory and the selectors'
own time. Used by ``vlprune bench``; every function works on a wrapped or an unwrapped model.

FLOPs are counted the way torch's FLOP counter counts them (2 per multiply-add of every matrix product and
convolution; norms, activations, rotary embeddings and softmax not counted; attention scores and weighted values over
the whole key length, masked or not), from shapes only: each decoder and vision-tower layer's weights times the
number of tokens it processed, plus its attention over its own length; the tower's stem convolutions and the
projector on the tokens they saw; the output head on the rows it computed. The signals some selectors read (e.g.
attention rows recomputed for scoring) are not in the count.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from vlprune import hf


def _linear_weights(module: nn.Module) -> int:
    """Multiply-adds per token of every linear layer inside ``module``."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _conv_per_output(conv: nn.Module) -> int:
    return conv.in_channels // conv.groups * int(torch.tensor(conv.kernel_size).prod())


def _layer_list(root: nn.Module, depth: int) -> nn.ModuleList | None:
    """The first ``nn.ModuleList`` of ``depth`` modules under ``root`` (a tower's or decoder's layers)."""
    for m in root.modules():
        if isinstance(m, nn.ModuleList) and len(m) == depth:
            return m
    return None


def _vision_depth(config) -> int:
    v = config.vision_config
    return int(getattr(v, "num_hidden_layers", None) or v.depth)


def _query_width(config) -> int:
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    width = getattr(config, "hidden_size", None) or config.embed_dim
    return heads * (getattr(config, "head_dim", None) or width // heads)


@dataclass
class FlopCount:
    """Analytic FLOPs of the forwards run inside ``with FlopCount(model) as count:`` (``count.vision``,
    ``count.llm``, ``count.total``), and the tokens each decoder layer processed (``count.llm_tokens``)."""

    model: nn.Module
    vision: float = 0.0
    llm: float = 0.0
    llm_tokens: list[int] = field(default_factory=list)
    vision_tokens: list[int] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.vision + self.llm

    def __enter__(self) -> FlopCount:
        config = self.model.config
        base = self.model.model
        decoder = _layer_list(base.language_model, config.text_config.num_hidden_layers)
        tower = getattr(base, "vision_tower", None) or getattr(base, "visual", None) or base.vision_model
        blocks = _layer_list(tower, _vision_depth(config))
        if decoder is None or blocks is None:
            raise ValueError(f"cannot find the decoder and vision-tower layers of {type(self.model).__name__}")
        text_q, vision_q = _query_width(config.text_config), _query_width(config.vision_config)
        for layer in decoder:
            self._handles.append(layer.register_forward_pre_hook(self._layer(layer, text_q, "llm"), with_kwargs=True))
        for layer in blocks:
            hook = self._layer(layer, vision_q, "vision")
            self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        in_blocks = {id(m) for m in blocks.modules()}
        for m in tower.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(m) not in in_blocks:
                self._handles.append(m.register_forward_hook(self._conv))
            elif isinstance(m, nn.Linear) and id(m) not in in_blocks:
                self._handles.append(m.register_forward_hook(self._linear("vision")))
        projector = getattr(base, "multi_modal_projector", None) or getattr(base, "mlp1", None)
        for m in projector.modules() if projector is not None else ():
            if isinstance(m, nn.Linear):
                self._handles.append(m.register_forward_hook(self._linear("vision")))
        self._handles.append(self.model.lm_head.register_forward_hook(self._linear("llm")))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _layer(self, layer: nn.Module, query_width: int, part: str):
        per_token = 2 * _linear_weights(layer)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            cu = kwargs.get("cu_seqlens")
            if hidden.dim() == 2:  # packed (Qwen-VL tower): attention within each cu_seqlens span
                tokens = hidden.shape[0]
                spans = (cu[1:] - cu[:-1]).tolist() if cu is not None else [tokens]
                square = sum(s * s for s in spans)
            else:
                tokens = hidden.shape[0] * hidden.shape[1]
                square = hidden.shape[0] * hidden.shape[1] ** 2
            flops = per_token * tokens + 4 * square * query_width
            if part == "llm":
                self.llm += flops
                self.llm_tokens.append(hidden.shape[-2])
            else:
                self.vision += flops
                self.vision_tokens.append(tokens)

        return hook

    def _conv(self, module, args, output) -> None:
        self.vision += 2 * output.numel() * _conv_per_output(module)

    def _linear(self, part: str):
        def hook(module, args, output):
            rows = args[0].numel() // module.in_features
            flops = 2 * rows * module.in_features * module.out_features
            if part == "llm":
                self.llm += flops
            else:
                self.vision += flops

        return hook


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
