"""DART (Wen et al., EMNLP 2025, https://arxiv.org/abs/2502.11494): "duplication matters more" — keep a few pivot
tokens and, for each pivot, the visual tokens least similar to it, pruning inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import Selector, check_choice, top_k


def dart_pick(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    text_hidden: torch.Tensor,
    text_keys: torch.Tensor,
    image_pivots: int,
    text_pivots: int,
    per_pivot: list[int] | int,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """DART's choice for one image.

    Pivots: the ``image_pivots`` visual tokens and the ``text_pivots`` text tokens (after the image) with the largest
    key L1 norm. Then, pivot by pivot (image pivots first, then text pivots, each group by decreasing key norm), the
    still-unpicked non-pivot visual tokens with the lowest cosine similarity of hidden states to the pivot are added,
    ``per_pivot`` of them (an int for every pivot, or a list with one count per pivot). Returns the image pivots
    followed by the picks, as candidate indices.

    ``positions`` (the candidates' and the text tokens' positions in the prompt) visits the pivots in the release's
    order instead: it keeps them in a Python ``set`` of those positions and iterates it, an order CPython fixes for
    integers (by hash slot), so the same positions give the same order.
    """
    # indices on the CPU (the picks' bookkeeping is there), whatever device the signals are on
    pivots = top_k(keys.float().abs().sum(-1), min(image_pivots, hidden.shape[0])).cpu()
    text = top_k(text_keys.float().abs().sum(-1), min(text_pivots, text_hidden.shape[0])).cpu()
    anchors = torch.cat([hidden[pivots], text_hidden[text]]).float()
    counts = per_pivot if isinstance(per_pivot, list) else [per_pivot] * anchors.shape[0]
    if positions is not None:
        at = positions[0][pivots].tolist() + positions[1][text].tolist()  # each anchor's position in the prompt
        order = [at.index(p) for p in set(at)]
        anchors = anchors[order]  # counts stay by visit: the first pivots visited take the extra picks
    available = torch.ones(hidden.shape[0], dtype=torch.bool)
    available[pivots] = False
    normed = F.normalize(hidden.float(), dim=-1)
    chosen = [pivots]
    for anchor, count in zip(F.normalize(anchors, dim=-1), counts, strict=True):
        candidates = torch.nonzero(available).flatten()
        if count <= 0 or candidates.numel() == 0:
            continue
        similarity = normed[candidates.to(normed.device)] @ anchor
        picked = candidates[top_k(-similarity.cpu(), min(count, candidates.numel()))]
        available[picked] = False
        chosen.append(picked)
    return torch.cat(chosen)


@register_selector("dart")
@dataclass
class DART(Selector):
    """DART before decoder layer ``K`` (default 2, so layers 0-1 see every token), original positions.

    Keys are layer ``K-1``'s post-RoPE keys (all heads, flattened); similarities use layer ``K-1``'s output after the
    language model's final norm, as in the official code. ``exact=True`` (default) keeps exactly the budget: the
    ``keep - image_pivots`` picks are spread over the pivots (the first pivots take one more when it does not divide).
    ``exact=False`` reproduces the official counting, where a budget ``M`` gives every pivot ``M // 8`` picks
    (``image_pivots + text_pivots = 8``), so "128" keeps 4 + 8*16 = 132 visual tokens (68 for 64, 196 for 192).
    The official code iterates its pivots as a Python set of their positions in the prompt; by default the order
    here is fixed (image pivots, then text pivots, each by decreasing key norm), ``pivot_order="release"`` follows the
    release's set order (the presets use it), which changes which tokens later pivots can still pick.
    """

    image_pivots: int = 4
    text_pivots: int = 4
    exact: bool = True
    pivot_order: str = "fixed"

    default_layer = 2
    summary = "key-norm pivots, keep tokens least duplicated (cosine) per pivot, before layer K (default 2)"
    paper = "https://arxiv.org/abs/2502.11494"

    def __post_init__(self) -> None:
        for name in ("image_pivots", "text_pivots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"dart {name} must be an int >= 0, got {value!r}")
        check_choice("dart", "pivot_order", self.pivot_order, ("fixed", "release"))
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("dart needs at least one pivot (image_pivots + text_pivots >= 1)")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer < 1:
            raise ValueError(f"dart reads layer K-1's keys and prunes before layer K: layer must be >= 1, got {layer}")
        return [SignalRequest("llm_keys", layer - 1), SignalRequest("normed_hidden")]

    def _pivots(self, view: TokenView, keep: int) -> tuple[int, int]:
        return min(self.image_pivots, keep, view.n), min(self.text_pivots, view.text.n)

    def count(self, view: TokenView, keep: int) -> int:
        if self.exact:
            return keep
        image, text = self._pivots(view, keep)
        return min(view.n, image + (image + text) * (keep // (self.image_pivots + self.text_pivots)))

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        image, text = self._pivots(view, keep)
        (layer,) = view.llm_keys
        keys = view.llm_keys[layer]
        if image + text == 0:  # no pivots at all (image_pivots=0 and no text after the image)
            return top_k(keys.float().abs().sum(-1), keep)
        total = min(self.count(view, keep), view.n)
        base, extra = divmod(total - image, image + text)
        return dart_pick(
            view.normed_hidden,
            keys,
            view.text.normed_hidden,
            view.text.llm_keys[layer],
            image,
            text,
            [base + (i < extra) for i in range(image + text)],
            positions=self._positions(view),
        )

    def _positions(self, view: TokenView) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.pivot_order != "release" or view.rows is None or view.text.rows is None:
            return None
        pad = int(view.pad)
        return view.rows - pad, view.text.rows - pad
