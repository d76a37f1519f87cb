"""PruneVid (Huang et al., ACL 2025 Findings, https://arxiv.org/abs/2412.16117): static tokens merged over time, then
question-guided pruning inside the LLM, for video tokens.

**Before the LLM** (``layer=0``), on the projected video tokens ``(T, N, D)``:

1. **Segments.** The frames' spatial means are clustered by DPC-KNN (``k`` neighbours) into ``int(T *
   segment_ratio)`` clusters (at least one); each cluster keeps its longest runs of consecutive frames and the other
   runs join a neighbouring segment (:func:`vlprune.temporal.refine_runs`), so segments are contiguous.
2. **Static positions** of a segment of ``W`` frames: the mean cosine similarity of a position over all pairs of
   distinct frames, ``(sum_{w, t} cos(f_w, f_t) - W) / (W (W - 1))``, is above ``threshold``. A static position
   becomes one token, its mean over the segment's frames, placed in the segment's first frame. A one-frame segment
   has none.
3. **Spatial merging**: the segment's static tokens (one group) and each frame's dynamic tokens (one group per frame)
   are clustered by DPC-KNN into fewer tokens, each cluster the plain mean of its members, placed at its centre.

**Inside the LLM** (the same method at ``layer=K > 0``; the release uses the output of layer 10, so ``K = 11``): a
token's score is its attention from the text after the video at layer ``K - 1``, the maximum over heads and then
over those text tokens. Within each group of the first stage (tokens carrying the same frames: a segment's static
tokens, a frame's dynamic tokens; every frame its own group without a first stage) the best-scored tokens stay.
The dropped tokens also leave the KV cache of layers ``0 .. K-1`` once the prefill is done, as the release prunes
the cache of the layers it has run, so that decoding reads the kept tokens only.

**Budgets.** ``exact=True`` (default) keeps exactly the budget at both stages: before the LLM, each group gets
``n_g * r'`` tokens with ``r' = keep / M`` (``M``: the tokens left after merging the static positions over time),
rounded by largest remainder; a budget of at least ``M`` merges over time only; a budget covering every token keeps
the video as it is. Inside the LLM, the same largest-remainder split of the budget over the groups. ``exact=False``
is the release's counting before the LLM: a group of more than ``min_cluster`` tokens is clustered into
``int(n_g * r)`` tokens with ``r`` the release's ``cluster_ratio``: the stage's ratio itself when the budget is one
(``ratio=r``), else ``keep / (T N)``; smaller groups stay whole.

Order and positions follow vlprune's rules (kept tokens in their slots, original positions by default) where the
release concatenates a segment's static tokens before its frames' dynamic ones, clusters in score order, and
renumbers. Not reproduced: the release's random density noise in DPC-KNN (ties go to the lower index here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from ..temporal import label_segments, refine_runs
from .base import Selection, Selector, check_params, top_k, whole_video
from .shared import ascending_clusters, dpc_knn, largest_remainder


def prunevid_segments(frames: torch.Tensor, clusters: int, k: int) -> list[tuple[int, int]]:
    """PruneVid's temporal segments ``[start, end]`` of a video from its frame features ``frames`` (T, D): DPC-KNN
    labels refined into contiguous runs."""
    clusters = max(1, min(clusters, frames.shape[0]))
    _, labels = dpc_knn(frames, clusters, k)
    return label_segments(refine_runs(labels.tolist()))


def static_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: positions of a segment ``x`` (W, N, D) whose mean pairwise cosine similarity over distinct frames is
    above ``threshold`` (none for one frame)."""
    frames = x.shape[0]
    if frames < 2:
        return torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    total = torch.nn.functional.normalize(x.float(), dim=-1).sum(0)  # sum_{w, t} cos(f_w, f_t) = |sum_w u_w|^2
    return ((total * total).sum(-1) - frames) / (frames * (frames - 1)) > threshold


@register_selector("prunevid")
@dataclass
class PruneVid(Selector):
    """PruneVid (see the module docstring): ``threshold`` (the paper's tau, 0.8), ``segment_ratio`` (0.25),
    ``k`` (DPC-KNN neighbours, 7), ``min_cluster`` (groups of at most this many tokens are not clustered with
    ``exact=False``, 14), ``exact``."""

    threshold: float = 0.8
    segment_ratio: float = 0.25
    k: int = 7
    min_cluster: int = 14
    exact: bool = True

    summary = "PruneVid: static tokens merged over segments, clusters per group, then text-guided pruning in the LLM"
    paper = "https://arxiv.org/abs/2412.16117"
    merges = True
    video = True

    def __post_init__(self) -> None:
        check_params("prunevid", {"segment_ratio": self.segment_ratio}, {"k": self.k}, {"threshold": self.threshold})
        if isinstance(self.min_cluster, bool) or not isinstance(self.min_cluster, int) or self.min_cluster < 0:
            raise ValueError(f"prunevid min_cluster must be an integer >= 0, got {self.min_cluster!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer > 0:
            return [SignalRequest("text_attention", layer - 1), SignalRequest("frames")]
        return [SignalRequest("features"), SignalRequest("frames")]

    def compacts_earlier_cache(self, layer: int) -> bool:
        return layer > 0

    def _groups(self, view: TokenView, keep: int):
        """The segments, each one's static positions, and the count of every group (per segment: its static group,
        then each frame's dynamic group)."""
        frames, per_frame = whole_video("prunevid", view)
        x = view.features.reshape(frames, per_frame, -1)
        segments = prunevid_segments(x.float().mean(1), int(frames * self.segment_ratio), self.k)
        statics = [static_mask(x[start : end + 1], self.threshold).cpu() for start, end in segments]
        sizes = []
        for (start, end), static in zip(segments, statics, strict=True):
            sizes += [int(static.sum())] + [per_frame - int(static.sum())] * (end - start + 1)
        if self.exact:
            ratio = min(keep / sum(sizes), 1.0)
            counts = largest_remainder([n * ratio for n in sizes], sizes, keep)
        else:
            ratio = view.ratio if view.ratio is not None else keep / view.n  # the release's unrounded ratio
            counts = [int(n * ratio) if n > self.min_cluster else n for n in sizes]
        return x, segments, statics, counts

    def count(self, view: TokenView, keep: int) -> int:
        if view.features is None or (self.exact and keep >= view.n):
            return keep
        return sum(self._groups(view, keep)[3])

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        if view.features is None:
            return self._inner(view, keep)
        if self.exact and keep >= view.n:
            whole_video("prunevid", view)  # images are refused whatever the budget
            return torch.arange(view.n)
        x, segments, statics, counts = self._groups(view, keep)
        per_frame = x.shape[1]
        keep_slots, into, weight = [], torch.full((view.n,), -1), torch.zeros(view.n)
        group = iter(counts)
        for (start, end), static in zip(segments, statics, strict=True):
            length = end - start + 1
            places = torch.nonzero(static).flatten()
            mean = x[start : end + 1, places.to(x.device)].float().mean(0)  # (n_static, D)
            centre, member = self._cluster(mean, next(group))
            frames = torch.arange(start, end + 1)[:, None]
            sources = (frames * per_frame + places[None]).flatten()
            member = None if member is None else member.repeat(length)
            self._emit(keep_slots, into, weight, start * per_frame + places[centre], sources, member)
            moving = torch.nonzero(~static).flatten()
            for frame in range(start, end + 1):
                centre, member = self._cluster(x[frame, moving.to(x.device)].float(), next(group))
                offset = frame * per_frame
                self._emit(keep_slots, into, weight, offset + moving[centre], offset + moving, member)
        return Selection(torch.tensor(keep_slots, dtype=torch.long), into, weight)

    def _cluster(self, x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centres, member)``: the rows of ``x`` that hold the clusters (ascending) and, per row, its cluster
        (index into ``centres``); every row its own cluster when ``clusters`` covers them all, and ``member``
        ``None`` when there are none (the budget left the group nothing: its rows are dropped)."""
        if clusters == 0:
            return torch.zeros(0, dtype=torch.long), None
        if clusters >= x.shape[0]:
            return torch.arange(x.shape[0]), torch.arange(x.shape[0])
        return ascending_clusters(x, clusters, self.k)

    @staticmethod
    def _emit(keep_slots, into, weight, slots, sources, member) -> None:
        """Outputs at ``slots``; source ``sources[i]`` goes to output ``member[i]``, each output the plain mean of
        its sources; nothing when ``member`` is ``None``."""
        if member is None:
            return
        size = torch.bincount(member, minlength=slots.numel()).float()
        into[sources] = member + len(keep_slots)
        weight[sources] = 1.0 / size[member]
        keep_slots.extend(slots.tolist())

    def _inner(self, view: TokenView, keep: int) -> torch.Tensor:
        """The stage inside the LLM (see the module docstring)."""
        if view.frames < 2:
            raise ValueError(
                f"prunevid prunes video tokens per frame and needs a video of at least two frames; input {view.image} "
                "has one: use an image method"
            )
        (scores,) = view.text_attention_max.values()
        score = scores.float().amax(0).cpu() if scores.shape[0] else torch.zeros(view.n)
        span = view.frame_span
        keys = [tuple(s) for s in span.tolist()]
        groups = list(dict.fromkeys(keys))  # in order of first appearance
        members = [torch.tensor([i for i, key in enumerate(keys) if key == g]) for g in groups]
        sizes = [m.numel() for m in members]
        counts = largest_remainder([n * keep / view.n for n in sizes], sizes, keep)
        chosen = [m[top_k(score[m], c)] for m, c in zip(members, counts, strict=True) if c]
        return torch.cat(chosen) if chosen else torch.zeros(0, dtype=torch.long)
