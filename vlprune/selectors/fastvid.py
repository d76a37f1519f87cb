"""FastVID (Shen et al., NeurIPS 2025, https://arxiv.org/abs/2503.11187): dynamic density pruning of video tokens
before the LLM, following the release's LLaVA-OneVision code (``fastvid_llavaonevision``, the pruning block at the
top of ``Qwen2Model.forward``).

For a video of ``T`` frames of ``N`` tokens and a retention ``r = keep / (T N)``:

1. **DySeg.** Cut after frame ``t`` at the ``segments - 1`` lowest cosine similarities between consecutive frames'
   global features, and wherever that similarity is below ``threshold`` (:func:`vlprune.temporal.dyseg_cuts`).
2. **Budget per frame.** ``int(N r)`` tokens: ``salient = int(N r) - int(int(N r) d)`` by attention, the rest
   (``context``) by density. Context counts go to *anchor* frames: in a segment of ``L`` frames, the last frame and
   every ``p``-th one before it, each getting ``(context L) // ceil(L / p)``.
3. **Salient tokens** (ATS): each frame's ``salient`` tokens with the most attention.
4. **Density scores** among each frame's other tokens: DPC-KNN's ``delta * density`` (``k = 4`` neighbours,
   itself included; distances over ``sqrt(D)``).
5. **DTM.** A one-frame segment keeps its ``context`` best-scored tokens as targets, and every other non-salient
   token of the frame joins the most cosine-similar target. In a longer segment, each anchor frame keeps its best
   targets and *every* non-salient token of the segment joins the most similar of that anchor's targets, so a token
   feeds one target per anchor (a pair-form :class:`~vlprune.selectors.base.Selection`). A target with ``n`` tokens
   joined (itself included) becomes ``w target + (1 - w) mean(joined)``, ``w = max(1 / (n + 1), beta)``.
6. Tokens keep their own slots and positions (the release gathers position ids and rotary embeddings by index).

Signals. The release reads SigLIP's attention-pooling (MAP) head: its pooled output as each frame's global feature,
its query's attention over the patches as saliency. The ``llava-hf`` LLaVA-OneVision checkpoints do not carry that
head, so vlprune substitutes the mean of the frame's projected tokens for the global feature (what the release does
on Qwen2.5-VL) and the attention each patch receives in the feature layer (``received_attention``, mean over all
queries; HoliTom's signal) for the head's query attention. On Qwen2/2.5-VL videos ``received_attention`` is the
release's own Qwen2.5-VL saliency (the attention of each temporal patch's mean query to each merged token in the
tower's last block), and the global feature is the frame mean of the projected tokens, as there.

**Qwen2.5-VL release** (``variant="qwen2_5_vl"``; its preset ``fastvid-qwen2_5_vl``). The same steps with its own
counts (:func:`qwen_counts`): a segment of ``L`` frames gets ``int(N r) L`` tokens, ``max(int(. d), 1)`` of them
context; its frames form runs cut wherever consecutive global features are less similar than ``ignore``, and only
the last frame of each run keeps tokens: the salient ones split evenly over the runs, the context ones over every
``p``-th run from the last (each at most ``N // 2``). In DTM, the tokens merged into an anchor's targets are the
segment's tokens other than its salient ones and that anchor's own targets (other anchors' targets included), so a
target with ``m`` tokens becomes ``w target + (1 - w) mean(those m)``, ``w = max(1 / (m + 1), beta)``.

Differences: ties go to the lower index where the release adds random noise to densities; an anchor's context count
is capped at its frame's non-salient tokens (the release's ``topk`` would fail there); a budget covering every token
keeps the video untouched (the release merges across frames even at ratio 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import register_selector
from ..signals import SignalRequest, TokenView
from ..temporal import dyseg_cuts
from .base import Selection, Selector, check_params, top_k, whole_video

VARIANTS = ("llava_onevision", "qwen2_5_vl")


def density_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """DPC-KNN's centre score ``delta * density`` of each row of ``x`` (m, D): density ``exp(-mean squared distance to
    the k nearest rows, itself included)``, distances ``||x_i - x_j|| / sqrt(D)``, ``delta`` the distance to the
    nearest denser row (the largest distance for the densest)."""
    x = x.float()
    distance = torch.cdist(x, x) / x.shape[-1] ** 0.5
    nearest = torch.topk(distance, min(k, x.shape[0]), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1))
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, distance, distance.max()).min(-1).values
    return delta * density


def anchor_counts(sizes: list[int], context: int, period: int) -> list[int]:
    """Context tokens of each frame: per segment of ``L`` frames, ``(context L) // ceil(L / period)`` for its last
    frame and every ``period``-th frame before it, 0 for the others."""
    counts = []
    for length in sizes:
        share = context * length // math.ceil(length / period)
        counts += [share if (length - 1 - j) % period == 0 else 0 for j in range(length)]
    return counts


def qwen_counts(g: torch.Tensor, sizes: list[int], per_frame: int, retain: int, d: float, period: int, ignore: float):
    """The Qwen2.5-VL release's salient and context counts of each frame (two lists), from the frames' unit global
    features ``g`` (T, D) and the DySeg segment ``sizes``: per segment of ``L`` frames, ``retain L`` tokens, of which
    ``max(int(retain L d), 1)`` context; its frames are grouped into runs split wherever the similarity to the previous
    frame is below ``ignore``, and only each run's last frame keeps tokens: the salient ones split evenly over the
    runs (remainder to the first), the context ones over every ``period``-th run counted from the last (at most
    ``per_frame // 2`` each, the salient count then capped at what is left of the frame)."""
    salient, context, start = [], [], 0
    for length in sizes:
        seg_retain = retain * length
        seg_context = max(int(seg_retain * d), 1)
        seg_salient = seg_retain - seg_context
        if length == 1:
            salient.append(seg_salient)
            context.append(seg_context)
            start += 1
            continue
        similar = (g[start : start + length - 1] * g[start + 1 : start + length]).sum(-1)
        cuts = torch.nonzero(similar < ignore).flatten().tolist()
        edges = [-1, *cuts, length - 1]
        runs = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        count = len(runs)
        run_salient = [seg_salient // count + (1 if i < seg_salient % count else 0) for i in range(count)]
        anchors = math.ceil(count / period)
        shares = [seg_context // anchors + (1 if i < seg_context % anchors else 0) for i in range(anchors)]
        run_context = [min(shares[i // period], per_frame // 2) if i % period == 0 else 0 for i in range(count)][::-1]
        for size, sal, ctx in zip(runs, run_salient, run_context, strict=True):
            salient += [0] * (size - 1) + [min(sal, per_frame - ctx)]
            context += [0] * (size - 1) + [ctx]
        start += length
    return salient, context


@register_selector("fastvid")
@dataclass
class FastVID(Selector):
    """FastVID's pruning (see the module docstring): ``segments`` (DySeg's c, 8), ``threshold`` (DySeg's tau, 0.9),
    ``context`` (share of each frame's budget chosen by density, d = 0.4), ``period`` (anchor frames every p = 4),
    ``beta`` (least weight of a target in its merge, 0.6), ``k`` (density neighbours, 4), ``variant`` (the release
    followed: ``"llava_onevision"`` or ``"qwen2_5_vl"``, see the module docstring) and ``ignore`` (the Qwen2.5-VL
    release's DySeg_ignore, 0.95)."""

    segments: int = 8
    threshold: float = 0.9
    context: float = 0.4
    period: int = 4
    beta: float = 0.6
    k: int = 4
    variant: str = "llava_onevision"
    ignore: float = 0.95

    summary = "FastVID: dynamic segments, salient tokens by attention, density-merged context tokens (video)"
    paper = "https://arxiv.org/abs/2503.11187"
    merges = True
    video = True

    def __post_init__(self) -> None:
        unit = {"context": self.context, "beta": self.beta}
        counts = {"segments": self.segments, "period": self.period, "k": self.k}
        check_params("fastvid", unit, counts, {"threshold": self.threshold, "ignore": self.ignore})
        if self.variant not in VARIANTS:
            raise ValueError(f"fastvid variant must be one of {VARIANTS}, got {self.variant!r}")

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        return [SignalRequest("features"), SignalRequest("received_attention"), SignalRequest("frames")]

    def _plan(self, view: TokenView, keep: int):
        """Segment sizes, and each frame's salient count and context count."""
        frames, per_frame = whole_video("fastvid", view)
        retain = int(per_frame * keep / view.n)
        x = view.features.reshape(frames, per_frame, -1)
        g = torch.nn.functional.normalize(x.float().mean(1), dim=-1)
        cuts = dyseg_cuts(g, self.segments, self.threshold)
        edges = [0, *cuts, frames]
        sizes = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        if self.variant == "qwen2_5_vl":
            salient, counts = qwen_counts(g.cpu(), sizes, per_frame, retain, self.context, self.period, self.ignore)
            return x, sizes, salient, counts
        salient = retain - int(retain * self.context)
        counts = anchor_counts(sizes, retain - salient, self.period)
        return x, sizes, [salient] * frames, [min(c, per_frame - salient) for c in counts]

    def count(self, view: TokenView, keep: int) -> int:
        if keep >= view.n:
            return keep
        _, _, salient, counts = self._plan(view, keep)
        return sum(salient) + sum(counts)

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        if keep >= view.n:
            whole_video("fastvid", view)  # images are refused whatever the budget
            return torch.arange(view.n)
        x, sizes, salient, counts = self._plan(view, keep)
        frames, per_frame = x.shape[:2]
        attention = view.received_attention[None].reshape(frames, per_frame).float().cpu()
        kept, source, into, weight = [], [], [], []
        rest = []  # per frame: its non-salient tokens (frame indices, ascending)
        for f in range(frames):
            chosen = top_k(attention[f], salient[f])
            kept += (f * per_frame + chosen).tolist()
            rest.append(torch.nonzero(~torch.isin(torch.arange(per_frame), chosen)).flatten())
        first = 0
        for length in sizes:
            segment = range(first, first + length)
            members = torch.cat([f * per_frame + rest[f] for f in segment])  # video indices
            for f in segment:
                if not counts[f]:
                    continue
                scores = density_scores(x[f, rest[f].to(x.device)], self.k).cpu()
                targets = f * per_frame + rest[f][top_k(scores, counts[f])]
                if self.variant == "qwen2_5_vl":  # the segment's other non-salient tokens, other anchors' included
                    joined = members[~torch.isin(members, targets)]
                else:  # the anchor's own targets join too (each its own nearest)
                    joined = members if length > 1 else f * per_frame + rest[f]
                self._merge(view.features, joined, targets, len(kept), source, into, weight)
                kept += targets.tolist()
            first += length
        order = torch.tensor(kept, dtype=torch.long)
        salient_pairs = torch.arange(sum(salient))  # salient tokens are the first outputs, as they are
        source = torch.cat([order[salient_pairs], *source])
        into = torch.cat([salient_pairs, *into])
        weight = torch.cat([torch.ones(len(salient_pairs)), *weight])
        return Selection(order, into, weight, source)

    def _merge(self, features, joined, targets, offset: int, source: list, into: list, weight: list) -> None:
        """DTM: every token of ``joined`` goes to its most cosine-similar of ``targets`` (video indices; outputs
        ``offset ..``); a target with ``n`` tokens (itself included) becomes ``w target + (1 - w) mean``."""
        unit = torch.nn.functional.normalize(features[joined.to(features.device)].float(), dim=-1)
        target_unit = torch.nn.functional.normalize(features[targets.to(features.device)].float(), dim=-1)
        choice = (unit @ target_unit.T).argmax(-1).cpu()
        n = torch.bincount(choice, minlength=len(targets)).float()
        w = torch.clamp(1 / (n + 1), min=self.beta)
        source += [joined, targets]
        into += [offset + choice, offset + torch.arange(len(targets))]
        weight += [((1 - w) / n.clamp(min=1))[choice], w]
