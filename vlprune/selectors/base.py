"""Base class of selectors: pure functions from one image's signals to the tokens kept (and, for merging methods,
what each kept token becomes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..signals import SignalRequest, TokenView


@dataclass
class Selection:
    """A selector's decision for one image when it merges (plain pruning may return just ``keep``).

    Output token ``i`` occupies the slot (and position) of candidate ``keep[i]``; its value is
    ``sum(weight[j] * source[j] for j with into[j] == i)``. The sources are the view's candidates, in order; for
    selectors acting before the projector (``space = "vision"``) on a tower with [CLS], the [CLS] state is one more
    source at index ``n``.

    A source may also feed several outputs (FastVID merges a token into a target of each anchor frame): then
    ``source`` lists, per contribution ``p``, its source index, and ``into[p]`` / ``weight[p]`` its output and weight
    (output ``i`` is ``sum(weight[p] * sources[source[p]] for p with into[p] == i)``).

    Attributes
    ----------
    keep : LongTensor (k,)
        Distinct candidate indices whose slots survive, in output order.
    into : LongTensor (sources,) or (P,) or None
        Output index each source (each contribution, with ``source``) goes to, ``-1`` for none. ``None``: output
        ``i`` is candidate ``keep[i]``.
    weight : Tensor (sources,) or (P,) or None
        Weight of each source (contribution) in its output.
    source : LongTensor (P,) or None
        Source index of each contribution; ``None``: contribution ``j`` is source ``j``.
    ordered : bool
        The outputs are in the order the LLM should read them (a release's own order; see
        :meth:`Selector.feeds_order`): the core lays output ``i`` in the ``i``-th of the kept slots in position order,
        so that under ``positions="renumber"`` the LLM sees them in this order at contiguous positions. A kept slot
        then holds another kept token's value, which the plan records as a merge of weight 1.
    """

    keep: torch.Tensor
    into: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    source: torch.Tensor | None = None
    ordered: bool = False

    def pairs(self, sources: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(source, output, weight)`` of every contribution (``into >= 0``), for ``sources`` sources."""
        source = torch.arange(sources) if self.source is None else self.source.cpu()
        into = self.into.cpu()
        used = into >= 0
        return source[used], into[used], self.weight.cpu()[used]

    @staticmethod
    def pruned(keep: torch.Tensor, ordered: bool = False) -> Selection:
        return Selection(torch.as_tensor(keep).long(), ordered=ordered)

    def apply(self, sources: torch.Tensor) -> torch.Tensor:
        """The ``(k, D)`` output tokens from ``sources`` (S, D), accumulated in fp32."""
        if self.into is None:
            return sources[self.keep.to(sources.device)]
        source, into, weight = (t.to(sources.device) for t in self.pairs(sources.shape[0]))
        out = torch.zeros(self.keep.numel(), sources.shape[-1], device=sources.device, dtype=torch.float32)
        out.index_add_(0, into, sources[source].float() * weight.float()[:, None])
        return out.to(sources.dtype)


@dataclass
class Selector:
    """A pruning method's decision rule. Subclasses are dataclasses whose fields are the hyper-parameters.

    A selector never touches modules, caches, masks or positions: it receives a :class:`TokenView` per image and
    returns which of its ``view.n`` candidate tokens to keep (a LongTensor), or a :class:`Selection` when it merges.

    Class attributes: ``space`` is ``"llm"`` (acts on decoder hidden states at its layer) or ``"vision"`` (acts on
    the projector's input, so only before the LLM, ``layer=0``); ``merges`` says whether it can return merges;
    ``video`` marks a temporal method, which needs videos (several frames) and refuses images.
    """

    name: ClassVar[str] = ""
    default_layer: ClassVar[int] = 0
    space: ClassVar[str] = "llm"
    merges: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    tower: ClassVar[bool] = False
    video: ClassVar[bool] = False

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        """Signals needed by a stage of this selector that prunes before decoder layer ``layer``, on a model whose
        vision tower has ``vision_depth`` layers. Raise ``ValueError`` for a layer the method cannot use."""
        return []

    def cache_stage(self):
        """A stage that prunes the KV cache while decoding (DyCoke), or ``None``. It has ``layer``, the first decoder
        layer whose attention is restricted (its scores are read at ``layer - 1``), and ``choose(state, scores)``:
        from the new token's head-mean attention over the visual cache entries ``scores`` (n,), the entries (indices
        into ``scores``) that layers ``layer`` and after attend to at this step, or ``None`` for all of them;
        ``state`` is a dict kept per sample across the steps of one generation."""
        return None

    def feeds_order(self) -> bool:
        """Whether this selector (as configured) returns :class:`Selection` with ``ordered=True``: outputs in the
        order its release feeds them to the LLM, which needs ``positions="renumber"`` (the core checks it)."""
        return False

    def compacts_earlier_cache(self, layer: int) -> bool:
        """Whether a stage of this selector at decoder ``layer`` also drops its tokens from the KV cache of the layers
        before it once the prefill is done (PruneVid), so that decoding reads only the kept tokens at every layer.
        Such a stage must prune without merging; the earlier layers' cached entries keep the values they had."""
        return False

    @classmethod
    def small_model_params(cls, vision_layers: int) -> dict:
        """Hyper-parameters that fit this method's defaults to a small model (such as the embedded one) whose vision
        tower has ``vision_layers`` layers, for the demo and the CLI; empty when the defaults fit any tower."""
        return {}

    def count(self, view: TokenView, keep: int) -> int:
        """Tokens :meth:`select` outputs for a budget of ``keep`` (capped at ``view.n`` by the core). Exactly
        ``keep`` unless a method's option reproduces a paper's own counting (such as DART's ``exact=False``)."""
        return keep

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        """Return ``min(count(view, keep), view.n)`` distinct indices into ``0..view.n-1`` (any order; the core
        sorts them), or a :class:`Selection` with that many outputs. ``keep`` is the stage's budget for the image
        (already capped at ``view.n``)."""
        raise NotImplementedError


@dataclass
class ScoringSelector(Selector):
    """A selector that ranks its candidates by one score: a subclass defines :meth:`score`, and the ``keep`` tokens
    with the highest scores stay (ties to the lower index). FastV, PDrop, FasterVLM and VTC-CLS are such methods."""

    def score(self, view: TokenView) -> torch.Tensor:
        """One score per candidate, ``(view.n,)``; higher is kept first."""
        raise NotImplementedError

    def select(self, view: TokenView, keep: int) -> torch.Tensor:
        return top_k(self.score(view), keep)


@dataclass
class TowerSelector(Selector):
    """A selector that prunes progressively *inside* the vision tower (``space = "vision"``, first stage, layer 0).

    The core (:mod:`vlprune.tower`) streams it each vision attention layer's query, key and value up to the feature
    layer (:meth:`observe`) and, after each layer in :meth:`prune_after`, asks which of each image's current patches
    stay (:meth:`prune`); it gathers the tower's tokens accordingly and removes the dropped patches' placeholders
    before decoder layer 0. ``state`` is a dict the core creates empty for each vision forward.
    """

    space: ClassVar[str] = "vision"
    tower: ClassVar[bool] = True

    def prune_after(self, feature_layer: int) -> list[int]:
        """Encoder layers after whose output tokens are dropped (ascending; the last one leaves exactly the budget),
        for a model taking its features from the output of encoder layer ``feature_layer``."""
        raise NotImplementedError

    def observe(self, state: dict, query, key, value, valid: torch.Tensor | None, scaling: float | None) -> None:
        """Read one vision attention layer: ``query``/``key``/``value`` (B, H, T, d) of the B images, token 0 the
        [CLS] token, then each image's current patches (right-padded; ``valid`` (B, T) marks real tokens)."""
        raise NotImplementedError

    def prune(self, state: dict, layer: int, feature_layer: int, counts: list[int], target: int) -> list[torch.Tensor]:
        """After encoder layer ``layer``: per image, ascending indices into its ``counts[i]`` current patches to keep
        (exactly ``target`` at the last layer of :meth:`prune_after`, never fewer). Re-index ``state`` to match."""
        raise NotImplementedError

    def select(self, view: TokenView, keep: int):
        raise RuntimeError(f"{self.name!r} decides inside the vision tower, not per view")


def check_params(method: str, unit: dict | None = None, counts: dict | None = None, numbers: dict | None = None):
    """Raise for a bad hyper-parameter of ``method``: ``unit`` ones must be numbers in [0, 1], ``counts`` integers
    >= 1 (``ValueError``), ``numbers`` numbers (``TypeError``); booleans are none of these."""
    for name, value in (unit or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{method} {name} must be a number in [0, 1], got {value!r}")
    for name, value in (counts or {}).items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{method} {name} must be an integer >= 1, got {value!r}")
    for name, value in (numbers or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{method} {name} must be a number, got {value!r}")


ORDERS = ("position", "release")  # the ``order`` of a method that can feed its release's token order


def check_choice(method: str, name: str, value, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` for a hyper-parameter ``name`` whose ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{method} {name} must be one of {choices}, got {value!r}")


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores, ties broken towards the lower index (deterministic)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


def only_layer0(method: str, layer: int) -> None:
    """Raise for a method that acts before the projector but was given an in-LLM layer."""
    if layer != 0:
        raise ValueError(f"{method} acts on the vision tower's output, before the LLM: layer must be 0, got {layer}")


def whole_video(method: str, view: TokenView) -> tuple[int, int]:
    """``(frames, tokens per frame)`` of a video ``view`` that still holds every token; raise for an image or a
    video an earlier stage has pruned (a temporal method compares the same position across frames)."""
    frames = view.frames
    if frames < 2:
        raise ValueError(
            f"{method} merges tokens across frames and needs a video of at least two frames (temporal patches on "
            f"Qwen-VL); input {view.image} has one: use an image method"
        )
    per_frame = view.n // frames
    if view.n != frames * per_frame or (view.grid is not None and view.grid[0] * view.grid[1] != per_frame):
        raise ValueError(f"{method} needs every token of the video; input {view.image} has {view.n} candidates")
    return frames, per_frame
