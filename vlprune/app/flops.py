"""Analytic prefill FLOPs: :class:`FlopCount` of the forwards a model runs (wrapped or not), and
:func:`llava15_7b_flops`, the same plans' FLOPs on LLaVA-1.5-7B's geometry (what a method would save at the scale the
papers report, where the embedded model's per-call overheads do not hide it).

FLOPs are counted the way torch's FLOP counter counts them (2 per multiply-add of every matrix product and
convolution; norms, activations, rotary embeddings and softmax not counted; attention scores and weighted values over
the whole key length, masked or not), from shapes only: each decoder and vision-tower layer's weights times the
number of tokens it processed, plus its attention over its own length; the tower's stem convolutions and the
projector on the tokens they saw; the output head on the rows it computed. The signals some selectors read (e.g.
attention rows recomputed for scoring) are not in the count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


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


@dataclass(frozen=True)
class Geometry:
    """The shapes of a LLaVA-style model that its analytic prefill FLOPs depend on (defaults: LLaVA-1.5-7B, a
    Vicuna-7B decoder on CLIP ViT-L/14 at 336 px, 576 visual tokens per image)."""

    layers: int = 32
    hidden: int = 4096
    intermediate: int = 11008
    kv_width: int = 4096  # keys and values: 32 heads of 128 (no grouped-query attention)
    vocab: int = 32000
    vision_layers: int = 24
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_tokens: int = 577  # 24 x 24 patches and [CLS]
    visual: int = 576  # tokens per image the LLM sees unpruned


LLAVA15_7B = Geometry()


def _decoder_layer(g: Geometry, tokens: int) -> float:
    weights = g.hidden * (2 * g.hidden + 2 * g.kv_width) + 3 * g.hidden * g.intermediate  # q, o, k, v; gated MLP
    return 2 * weights * tokens + 4 * tokens * tokens * g.hidden


def scaled_flops(plans: list, text: int, images: int, g: Geometry = LLAVA15_7B) -> tuple[float, float]:
    """``(unpruned, pruned)`` analytic prefill FLOPs, counted as :class:`FlopCount` counts them, of a prompt with
    ``text`` text tokens and ``images`` images on the model of geometry ``g``, each stage of ``plans`` (the
    :class:`~vlprune.KeepPlan` of a batch of one, in layer order) keeping the same fraction of the visual tokens from
    the same decoder layer on. The vision tower always runs on every patch (what a tower-internal stage saves there is
    not counted), and the output head on the first generated token's row."""
    vh, vi, vt = g.vision_hidden, g.vision_intermediate, g.vision_tokens
    tower = g.vision_layers * (2 * (4 * vh * vh + 2 * vh * vi) * vt + 4 * vt * vt * vh)
    projector = 2 * g.visual * (vh * g.hidden + g.hidden * g.hidden)
    fixed = images * (tower + projector) + 2 * g.hidden * g.vocab
    fractions = [1.0] * g.layers
    for plan in plans:
        kept = len(plan.keep_visual[0]) / max(plan.num_visual[0], 1)
        fractions[min(plan.layer, g.layers) :] = [kept] * (g.layers - min(plan.layer, g.layers))
    full = fixed + g.layers * _decoder_layer(g, text + images * g.visual)
    pruned = fixed + sum(_decoder_layer(g, text + round(images * g.visual * f)) for f in fractions)
    return full, pruned
