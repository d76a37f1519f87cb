"""HoliTom (Shao et al., NeurIPS 2025, https://arxiv.org/abs/2505.21334): holistic token merging of video tokens
before the LLM, its outer-LLM stage.

1. **Global temporal segmentation.** Consecutive frames are compared position by position (cosine of the projected,
   pooled tokens). A position is *static* in a window of frames when it stays above ``threshold`` at every
   transition inside it; a dynamic programme picks the partition of the video into windows that removes the most
   tokens when every window's static positions are replaced by one token each
   (:func:`vlprune.temporal.holitom_windows`).
2. **Budget.** With ``S`` tokens saved that way, the retain ratio ``r = keep / (T N)`` becomes
   ``r' = min(r T N / (T N - S), 1)`` for what is left.
3. **Static tokens**, per window: averaged over the window's frames (one per static position), clustered by DPC-KNN
   (``k = min(K, clusters)`` neighbours) into ``round(n_static r')`` centres; each centre becomes
   ``beta * centre + (1 - beta) * mean(its members)``. They sit in the window's first frame.
4. **Dynamic tokens**, per frame: ``ceil(n_dynamic r')`` of them, the share ``1 - context`` with the most received
   attention in the vision tower's feature layer (mean over heads and queries, pooled like the features); the rest
   are DPC-KNN centres of the others, merged as above. The release runs with ``context = 0``: purely by attention.

**Token order.** With ``order="position"`` (default) every output token keeps the slot of the token it comes from
(a static centre: its position in the window's first frame), so the LLM sees them in position order. The release
(its ``one_token`` newline mode, LLaVA-OneVision's video layout) concatenates, window by window, the static centres
(in position order) and then each frame's dynamic tokens (the attention-picked ones in position order, then the
density-merged ones in position order), and numbers them contiguously. ``order="release"`` feeds exactly that
sequence; it needs ``positions="renumber"``, and the ``holitom-*`` presets use both.

A budget covering every token keeps the video untouched. Below that, ``exact=True`` (default) keeps exactly the
budget: the quotas ``n r'`` of the windows' static sets and the frames' dynamic sets are rounded by largest remainder
so that they sum to it. ``exact=False`` rounds them as the release does (``round`` for static sets, ``ceil`` for
dynamic ones) from the unrounded ratio when the budget is one (``ratio=r``: the retain ratio is ``r``, not the
rounded ``keep / (T N)``), which keeps a few more. Either way a budget above ``T N - S`` keeps ``T N - S``: static
positions are always merged over their window.

**Inner-LLM stage** (the same method at a decoder layer ``K > 0``; the release uses ``K = 18`` and keeps half):
the budget's tokens with the most attention from the last prompt token at layer ``K - 1`` (head mean) stay; every
other visual token, in index order, is averaged into the kept token most cosine-similar to it (hidden states entering
layer ``K``, similarities taken before any merge): ``h <- (h + h_other) / 2``, so a kept token with members
``n_1 < ... < n_m`` becomes ``h / 2^m + sum_j h_(n_j) / 2^(m - j + 1)``.

Not reproduced: the release's random density noise in DPC-KNN (ties go to the lower index here). With
``positions="renumber"`` (the release's outer stage concatenates the kept tokens) the inner stage also renumbers,
where the release keeps the positions the tokens had; a ratio budget rounds half up where the release's ``round``
rounds half to even (one token apart when the count is odd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from ..temporal import holitom_windows, static_positions, transition_similarity
from .base import ORDERS, Selection, Selector, check_choice, check_params, top_k, whole_video
from .shared import ascending_clusters, largest_remainder


def cluster_merge(x: torch.Tensor, clusters: int, k: int, beta: float) -> tuple[torch.Tensor, ...]:
    """HoliTom's density merge of the rows of ``x`` (m, D) into ``clusters`` DPC-KNN centres (``min(k, clusters)``
    neighbours). Returns ``(centres, into, weight)``: the centre rows (ascending), and for every row the centre
    (index into ``centres``) it goes to and its weight, so that output ``c`` is ``beta * x[centre] + (1 - beta) *
    mean(x[members])`` (``x[centre]`` alone without members)."""
    centres, into = ascending_clusters(x, clusters, min(k, clusters))  # into: each row's output
    is_centre = torch.zeros(x.shape[0], dtype=torch.bool)
    is_centre[centres] = True
    members = torch.bincount(into[~is_centre], minlength=clusters).float()[into]  # per row: its output's members
    centre_weight = torch.where(members > 0, torch.full_like(members, beta), torch.ones_like(members))
    weight = torch.where(is_centre, centre_weight, (1 - beta) / members.clamp(min=1))
    return centres, into, weight


@register_selector("holitom")
@dataclass
class HoliTom(Selector):
    """HoliTom's outer-LLM stage (see the module docstring): ``threshold`` (the paper's tau, 0.8; 0.65 at 10 %),
    ``beta`` (0.6), ``k`` (DPC-KNN neighbours, 7), ``context`` (share of each frame's dynamic count merged by
    density rather than picked by attention, the release's ``D`` = 0), ``max_window`` (1024 frames), ``exact``,
    ``order`` (``"position"`` or the ``"release"``'s sequence, see the module docstring)."""

    threshold: float = 0.8
    beta: float = 0.6
    k: int = 7
    context: float = 0.0
    max_window: int = 1024
    exact: bool = True
    order: str = "position"

    summary = "HoliTom: DP temporal windows, static tokens merged over time and clustered, dynamic by attention (video)"
    paper = "https://arxiv.org/abs/2505.21334"
    merges = True
    video = True

    def __post_init__(self) -> None:
        unit = {"beta": self.beta, "context": self.context}
        check_params("holitom", unit, {"k": self.k, "max_window": self.max_window}, {"threshold": self.threshold})
        check_choice("holitom", "order", self.order, ORDERS)

    def feeds_order(self) -> bool:
        return self.order == "release"

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer > 0:  # the inner-LLM stage
            return [SignalRequest("llm_attention", layer - 1), SignalRequest("hidden"), SignalRequest("frames")]
        return [SignalRequest("features"), SignalRequest("received_attention"), SignalRequest("frames")]

    def _plan(self, view: TokenView, keep: int):
        """The windows, each window's static positions and the token count of every group (per window: its static
        set, then each of its frames' dynamic sets)."""
        frames, per_frame = whole_video("holitom", view)
        x = view.features.reshape(frames, per_frame, -1)
        similarity = transition_similarity(x)
        windows, saved = holitom_windows(x, self.threshold, self.max_window, similarity)
        # the release's arithmetic starts from the unrounded ratio when the budget was one (exact=False)
        wanted = view.ratio * view.n if (view.ratio is not None and not self.exact) else keep
        ratio = min(wanted / (view.n - saved), 1.0) if view.n > saved else 1.0
        statics, sizes = [], []
        for start, end in windows:
            static = static_positions(similarity, start, end, self.threshold).cpu()
            if start == end:  # a window of one frame has no static set
                static = torch.zeros(per_frame, dtype=torch.bool)
            statics.append(static)
            sizes += [int(static.sum())] + [per_frame - int(static.sum())] * (end - start + 1)
        if self.exact:
            counts = largest_remainder([n * ratio for n in sizes], sizes, keep)
        else:
            counts, i = [], 0
            for start, end in windows:
                counts.append(round(sizes[i] * ratio))
                counts += [math.ceil(n * ratio) for n in sizes[i + 1 : i + 2 + end - start]]
                i += 2 + end - start
        return x, windows, statics, counts

    def count(self, view: TokenView, keep: int) -> int:
        if keep >= view.n or view.hidden is not None:
            return keep
        return sum(self._plan(view, keep)[3])

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        if view.hidden is not None:
            return self._inner(view, keep)
        if keep >= view.n:
            whole_video("holitom", view)  # images are refused whatever the budget
            return torch.arange(view.n)
        x, windows, statics, counts = self._plan(view, keep)
        frames, per_frame = x.shape[:2]
        attention = view.received_attention[None].reshape(frames, per_frame).float().cpu()
        keep_slots, into, weight = [], torch.full((view.n,), -1), torch.zeros(view.n)

        def emit(slots: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
            into[sources] = targets + len(keep_slots)
            weight[sources] = weights
            keep_slots.extend(slots.tolist())

        group = iter(counts)
        for (start, end), static in zip(windows, statics, strict=True):
            length = end - start + 1
            places = torch.nonzero(static).flatten()
            clusters = next(group)
            if clusters:
                at = places.to(x.device)
                mean = sum(x[f, at].float() for f in range(start, end + 1)) / length  # (n_static, D), frame by frame
                centres, target, w = cluster_merge(mean, clusters, self.k, self.beta)
                sources = (torch.arange(start, end + 1)[:, None] * per_frame + places[None]).flatten()
                emit(start * per_frame + places[centres], sources, target.repeat(length), (w / length).repeat(length))
            moving = torch.nonzero(~static).flatten()
            for frame in range(start, end + 1):
                self._dynamic(x[frame], attention[frame], moving, frame * per_frame, next(group), emit)
        return Selection(torch.tensor(keep_slots, dtype=torch.long), into, weight, ordered=self.feeds_order())

    def _dynamic(self, x, attention, moving, offset: int, count: int, emit) -> None:
        """One frame's dynamic tokens ``moving``: the dominant ones by received attention, then density-merged
        context tokens from the rest."""
        dominant = round(count * (1 - self.context))
        chosen = torch.sort(moving[top_k(attention[moving], dominant)]).values  # position order, as the release
        emit(offset + chosen, offset + chosen, torch.arange(dominant), torch.ones(dominant))
        contextual = count - dominant
        if contextual:
            rest = moving[~torch.isin(moving, chosen)]
            centres, target, w = cluster_merge(x[rest.to(x.device)].float(), contextual, self.k, self.beta)
            emit(offset + rest[centres], offset + rest, target, w)

    def _inner(self, view: TokenView, keep: int) -> Selection:
        """The inner-LLM stage (see the module docstring)."""
        if view.frames < 2:
            raise ValueError(
                f"holitom merges tokens across frames and needs a video of at least two frames; input {view.image} "
                "has one: use an image method"
            )
        (scores,) = view.llm_attention.values()
        kept = top_k(scores, keep).cpu()
        rest = torch.nonzero(~torch.isin(torch.arange(view.n), kept)).flatten()
        into, weight = torch.full((view.n,), -1), torch.zeros(view.n)
        into[kept], weight[kept] = torch.arange(keep), 1.0
        if rest.numel() and keep:
            hidden = torch.nn.functional.normalize(view.hidden.float(), dim=-1)
            nearest = (hidden[rest.to(hidden.device)] @ hidden[kept.to(hidden.device)].T).argmax(-1).cpu()
            into[rest] = nearest
            for target in torch.unique(nearest).tolist():  # members n_1 < ... < n_m: weights 2^-m .. 2^-1, kept 2^-m
                members = rest[nearest == target]
                weight[members] = 0.5 ** torch.arange(members.numel(), 0, -1, dtype=torch.float32)
                weight[kept[target]] = 0.5 ** members.numel()
        return Selection(kept, into, weight)
