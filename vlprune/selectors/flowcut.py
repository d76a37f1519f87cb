"""FlowCut (Tong et al., NeurIPS 2025, https://arxiv.org/abs/2505.19536): prune progressively inside the vision
tower, following the information flow from the [CLS] token, so that later vision layers only see the kept patches.

Per vision layer, every patch gets a score from that layer's attention (:func:`flowcut_scores`); scores accumulate
over layers (an exponential moving average); every ``every`` layers, counting back from the feature layer, the
patches with the lowest cumulative score are dropped, as many as an entropy rule allows (:func:`adaptive_prune`),
until the layer before the feature layer keeps exactly the budget. As in the official code, which pruning layers
apply is fixed by the feature layer, and kept patches stay in raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import head_mean_attention
from ..registry import register_selector
from ..signals import SignalRequest
from .base import TowerSelector, only_layer0, top_k


def flowcut_scores(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None, scaling: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowCut's per-layer quantities from one vision attention layer, for every patch (token 0 is [CLS]).

    ``query``/``key``/``value`` (B, H, T, d); ``valid`` (B, T) bool marks real tokens (``None``: all).

    Returns ``(cls_attention, score)``, both (B, T-1) fp32: ``a`` = the [CLS] query's softmax attention over all
    tokens, mean over heads, without the [CLS] column (not renormalised); ``s`` = the softmax over tokens of the
    *unscaled* dot products of the [CLS] value with each value, per head, then mean over heads, without [CLS];
    ``score = (a / sum(a) + s / sum(s)) * ||mean over heads of v||_1``. Padding gets 0 in ``a`` and ``s``.
    """
    attention = head_mean_attention(query[:, :, :1], key, scaling, valid)[:, 0, 1:]
    v = value.float()
    similarity = torch.einsum("bhd,bhtd->bht", v[:, :, 0], v)  # unscaled, as the official code
    if valid is not None:
        similarity = similarity.masked_fill(~valid[:, None, :], float("-inf"))
    semantic = similarity.softmax(-1).mean(1)[:, 1:]
    density = v.mean(1).abs().sum(-1)[:, 1:]
    relation = attention / attention.sum(-1, keepdim=True)
    semantic = semantic / semantic.sum(-1, keepdim=True)
    return attention, (relation + semantic) * density


def adaptive_prune(cls_attention: torch.Tensor, remaining: int, target: int) -> int:
    """Patches to drop at a pruning layer: ``round((n - target) / sqrt(remaining) * (1 - r^2))`` with ``n`` the
    patches present, ``r = H(p) / log(n)`` the normalised entropy of ``p = a / sum(a)`` (``a`` = the (n,) [CLS]
    attention) and ``remaining`` the layers left before the feature layer (even, > 0). Flat attention (``r`` near 1)
    drops few; peaked attention drops many. Rounds half to even, like ``torch.round``."""
    n = cls_attention.numel()
    p = cls_attention.float() / cls_attention.float().sum()
    ratio = -torch.xlogy(p, p).sum() / math.log(n)
    return int(torch.round((n - target) / remaining**0.5 * (1 - ratio**2)))


@register_selector("flowcut")
@dataclass
class FlowCut(TowerSelector):
    """FlowCut on a vision tower with a [CLS] token; ``keep`` patches per image reach the LLM.

    With ``F`` the encoder layer whose output the model takes as features (LLaVA-1.5: 22 of 0..23), every layer
    ``l < F`` updates the cumulative score ``S <- decay * S + (1 - decay) * score_l`` (``S = score_0`` first), and
    after each layer ``l`` with ``F - l - 1`` a multiple of ``every``, each image keeps ``max(n - adaptive, keep)``
    of its ``n`` patches by ``S`` (all but ``keep`` at ``l = F - 1``). The [CLS] token always stays.

    Differences from the official code (``TungChintao/FlowCut``): the adaptive count is per image, where the official
    code takes the largest over the batch, which makes an image's result depend on its batch-mates (both agree at
    one image per forward, the paper's setting); scores are computed in fp32.
    """

    decay: float = 0.5
    every: int = 2
    summary = "information flow from [CLS], pruned progressively inside the vision tower"
    paper = "https://arxiv.org/abs/2505.19536"

    def __post_init__(self) -> None:
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not 0 <= self.decay < 1:
            raise ValueError(f"decay must be a number in [0, 1), got {self.decay!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive int, got {self.every!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        only_layer0("flowcut", layer)
        return [SignalRequest("vision_qkv")]

    def prune_after(self, feature_layer: int) -> list[int]:
        return list(range(feature_layer - 1, -1, -self.every))[::-1]

    def observe(self, state: dict, query, key, value, valid, scaling) -> None:
        attention, score = flowcut_scores(query, key, value, valid, scaling)
        state["cls_attention"] = attention
        previous = state.get("score")
        state["score"] = score if previous is None else self.decay * previous + (1 - self.decay) * score

    def prune(self, state: dict, layer: int, feature_layer: int, counts: list[int], target: int) -> list[torch.Tensor]:
        remaining = feature_layer - layer - 1
        keep, scores = [], []
        for i, n in enumerate(counts):
            score = state["score"][i, :n]
            if n <= target:
                drop = 0
            else:
                drop = adaptive_prune(state["cls_attention"][i, :n], remaining, target) if remaining else n
            chosen = torch.sort(top_k(score.cpu(), max(n - drop, target))).values
            keep.append(chosen)
            scores.append(score[chosen.to(score.device)])
        state["score"] = torch.nn.utils.rnn.pad_sequence(scores, batch_first=True)
        return keep
