"""DyCoke (Tao et al., CVPR 2025, https://arxiv.org/abs/2411.15024): temporal token merging (TTM) of video tokens
before the LLM. Frames go in groups of four: the first frame of each group is kept whole; every other frame keeps
only its tokens least similar (cosine, same spatial position) to a reference frame — frame ``2i + 1`` against frame
``2i``, and the third frame of a group against the group's first. Despite the name, the dropped tokens are
discarded, not averaged.

This follows the paper and the method as described. The release's ``dycole_ttm`` ranks an odd frame's tokens with
its own pair's similarities, as here (an earlier revision used the previous pair's, a slip the authors fixed); it
still differs in two ways that look like slips and are not reproduced: the third frame of the last group of four is
never pruned (its loop stops at ``num_frames - 4``), and with an odd frame count the last frame is dropped.

The release feeds a pruned frame's kept tokens in ascending-similarity order (frames in order) at contiguous
positions: ``order="release"`` feeds that sequence (it needs ``positions="renumber"``; the ``dycoke-paper`` preset
uses both); ``order="position"`` (default) keeps every token in its own slot.

The second stage prunes the KV cache while decoding (``cache_prune_ratio``, the paper's ``P``; off by default): at
each step the new token's attention at decoder layer ``cache_layer - 1`` (head mean) over the visual cache entries
is compared with the previous step's; on the first step, or when the cosine similarity is below
``cache_threshold``, layers ``cache_layer`` and after attend only to the top ``int((1 - P) n)`` visual entries; when
it is at or above the threshold they attend to the whole cache (the release's behaviour, where the pruned cache is
then ``None``). vlprune masks the other entries rather than gathering the kept ones: the attention output is the
same, the cache stays whole (as in the release, which stores the full cache and gathers per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from .base import ORDERS, Selection, Selector, check_choice, only_layer0, top_k, whole_video

GROUP = 4  # frames per group: the first is kept whole


def reference_frame(frame: int) -> int:
    """The frame that ``frame`` (not the first of its group of four) is compared with."""
    return frame - 1 if frame % 2 else frame - 2


@dataclass
class CachePruning:
    """DyCoke's decode-time stage (see the module docstring); ``choose`` follows :meth:`Selector.cache_stage`."""

    layer: int
    ratio: float
    threshold: float

    def choose(self, state: dict, scores: torch.Tensor) -> torch.Tensor | None:
        previous = state.get("previous")
        state["previous"] = scores
        if previous is not None and previous.numel() == scores.numel():
            if float(F.cosine_similarity(previous.float(), scores.float(), dim=0)) >= self.threshold:
                return None
        return top_k(scores, int((1 - self.ratio) * scores.numel()))


def anchors(frames: int) -> list[int]:
    """Frames kept whole: the first of each group of four."""
    return list(range(0, frames, GROUP))


@register_selector("dycoke")
@dataclass
class DyCoke(Selector):
    """DyCoke's TTM. The budget decides how many tokens the non-first frames keep together (as evenly as possible,
    earlier frames first); it must cover the first frames of all groups, kept whole. ``prune_ratio`` (the paper's
    ``K``, 0.7 in its release) instead keeps ``int((1 - K) * N)`` of the ``N`` tokens of every other frame, the
    paper's own count, whatever the budget. ``cache_prune_ratio`` / ``cache_layer`` / ``cache_threshold``: the
    decode-time stage (the paper's ``P``, ``L``, 0.7 / 3 / 0.9 in its release; off unless ``P`` is given). ``order``:
    ``"position"`` or the ``"release"``'s token order (see the module docstring)."""

    prune_ratio: float | None = None
    cache_prune_ratio: float | None = None
    cache_layer: int = 3
    cache_threshold: float = 0.9
    order: str = "position"

    summary = "DyCoke TTM: keep every 4th frame, others keep tokens least like their reference frame (video)"
    paper = "https://arxiv.org/abs/2411.15024"
    video = True

    def __post_init__(self) -> None:
        for name in ("prune_ratio", "cache_prune_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"dycoke {name} must be in [0, 1], got {value!r}")
        if isinstance(self.cache_layer, bool) or not isinstance(self.cache_layer, int) or self.cache_layer < 1:
            raise ValueError(f"dycoke cache_layer must be an integer >= 1, got {self.cache_layer!r}")
        check_choice("dycoke", "order", self.order, ORDERS)

    def feeds_order(self) -> bool:
        return self.order == "release"

    def cache_stage(self) -> CachePruning | None:
        if self.cache_prune_ratio is None:
            return None
        return CachePruning(self.cache_layer, self.cache_prune_ratio, self.cache_threshold)

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        only_layer0("dycoke", layer)
        return [SignalRequest("features"), SignalRequest("frames")]

    def count(self, view: TokenView, keep: int) -> int:
        if self.prune_ratio is None:
            return keep
        frames, per_frame = whole_video("dycoke", view)
        kept_anchors = len(anchors(frames))
        return kept_anchors * per_frame + (frames - kept_anchors) * int((1 - self.prune_ratio) * per_frame)

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        frames, per_frame = whole_video("dycoke", view)
        whole = anchors(frames)
        others = [f for f in range(frames) if f not in whole]
        keep = self.count(view, keep)
        spare = keep - len(whole) * per_frame
        if spare < 0:
            need = len(whole) * per_frame
            raise ValueError(
                f"dycoke keeps the first frame of every group of {GROUP} whole: input {view.image} ({frames} frames "
                f"x {per_frame} tokens) needs keep >= {need} (ratio >= {need / view.n:.3f}), got {keep}"
            )
        x = view.features.reshape(frames, per_frame, -1)  # (T, N, D); one frame pair in fp32 at a time
        chosen = {f: torch.arange(f * per_frame, (f + 1) * per_frame) for f in whole}
        for i, f in enumerate(others):
            n = spare // len(others) + (i < spare % len(others))
            similarity = F.cosine_similarity(x[f].float(), x[reference_frame(f)].float(), dim=-1)  # (N,)
            least = torch.sort(similarity, stable=True).indices[:n]  # ascending similarity, the release's order
            chosen[f] = f * per_frame + least.cpu()
        chosen = torch.cat([chosen[f] for f in range(frames)])  # frames in order
        return Selection.pruned(chosen, ordered=True) if self.feeds_order() else chosen
