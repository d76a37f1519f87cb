"""Signals: what selectors read. The core and the adapter compute only the signals a schedule requests.

======================  ==========================================================  ===============================
signal                  value in a :class:`TokenView` (one image's ``n`` candidates)  computed by
======================  ==========================================================  ===============================
``features``            projected visual tokens ``(n, D)``                            projector output hook
``cls_attention``       ``{vision_layer: (n,)}`` [CLS]->patch attention, head mean    scoring attention function
``received_attention``  ``{vision_layer: (n,)}`` attention each patch receives in a   the layer's q/k projections
                        vision layer (``None``: the feature layer), mean over heads   (attention-module pre-hook)
                        and queries, pooled like the features (Qwen2/2.5-VL: at the
                        feature layer, FastVID's saliency as a substitute)
``llm_attention``       ``{decoder_layer: (n,)}`` last prompt token->token, head mean scoring attention function
``incoming_attention``  ``(n,)`` the same row as layer ``L`` itself would compute it   stage layer's q/k projections
                        from its input (``L`` = the stage's layer)
``text_attention``      ``{decoder_layer: (t, n)}`` each text token after the image   scoring attention function
                        -> candidate token, head mean (softmax over all keys);
                        ``view.text_attention_max`` the same, maximum over heads
``llm_keys``            ``{decoder_layer: (n, H*d)}`` post-RoPE keys, KV heads         scoring attention function
                        repeated to the query heads (text: ``view.text``)
``hidden``              ``(n, D)`` hidden states entering the stage's layer           stage hook
``normed_hidden``       ``(n, D)`` the same after the language model's final norm     stage hook
``embeddings``          ``(n, D)`` the language model's input embeddings (layer 0)    language model pre-hook
``vision_hidden``       ``(n, Dv)`` the projector's input; ``view.cls_hidden`` (Dv,)   projector pre-hook, feature layer
                        the [CLS] state of the same layer when the tower has one
``vision_keys``         ``(n, d)`` head-mean keys of the vision feature layer;        scoring attention function
                        ``view.cls_key`` (d,) for [CLS]
``projector``           ``view.vision_hidden`` plus ``view.project``, the projector   projector pre-hook
                        as an fp32 function of ``(m, Dv)`` inputs
``grid``                ``(h, w)`` token grid of the image                            adapter geometry
``frames``              ``view.frames``: a video's frame count; its tokens are         adapter geometry
                        ``frames x h x w`` in raster order, ``view.grid`` per frame;  (``frame_span``: the core,
                        ``view.frame_span`` (n, 2): first and last frame of the      from the earlier stages' plans)
                        tokens merged into each candidate by earlier stages
``vision_qkv``          not in a view: each vision attention layer's query, key and   scoring attention function
                        value before the feature layer, streamed to a tower selector
``query``               ``view.question`` (str) and ``view.raw_frames`` ((F, H, W, 3)  the caller, through
                        uint8, the video's decoded frames) of the view's sample       :meth:`Pruned.set_query`
======================  ==========================================================  ===============================

``view.text`` is a :class:`TokenView` of the text tokens that follow the image in the prompt (to its end), carrying
the token-wise signals above (``hidden``, ``normed_hidden``, ``embeddings``, ``llm_keys``) that were requested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Signal:
    """What the core knows about one signal (the table above says what its value is).

    Attributes
    ----------
    name : str
    captured : {"vision", "tower", "llm", "geometry", "caller"}
        Where it comes from: the vision forward (before the LLM), streamed from inside the tower to a tower
        selector, the language model's forward, the adapter's geometry, or the caller (:meth:`Pruned.set_query`).
    layered : bool
        Its value is keyed by a layer (``SignalRequest.layer``).
    per_token : bool
        Its value is one tensor with a row per candidate (what a frame's or a tile's view slices).
    text : bool
        Also given for the text after the image (``view.text``).
    attention : {"text_config", "vision_config"} or None
        The sub-config whose attention layers must run through vlprune's scoring attention function to compute it
        (``"text_config"``: scored inside a decoder layer); a family may add its own, such as InternVL's
        ``received_attention``.
    """

    name: str
    captured: str
    layered: bool = False
    per_token: bool = False
    text: bool = False
    attention: str | None = None


DESCRIPTIONS = (
    Signal("features", "vision", per_token=True),
    Signal("cls_attention", "vision", layered=True, attention="vision_config"),
    Signal("received_attention", "vision", layered=True),
    Signal("llm_attention", "llm", layered=True, attention="text_config"),
    Signal("incoming_attention", "llm", per_token=True),
    Signal("text_attention", "llm", layered=True, attention="text_config"),
    Signal("llm_keys", "llm", layered=True, text=True, attention="text_config"),
    Signal("hidden", "llm", per_token=True, text=True),
    Signal("normed_hidden", "llm", per_token=True, text=True),
    Signal("embeddings", "llm", per_token=True, text=True),
    Signal("vision_hidden", "vision", per_token=True),
    Signal("vision_keys", "vision", per_token=True, attention="vision_config"),
    Signal("projector", "vision"),
    Signal("grid", "geometry"),
    Signal("frames", "geometry"),
    Signal("vision_qkv", "tower", attention="vision_config"),
    Signal("query", "caller"),
)
SIGNALS = tuple(s.name for s in DESCRIPTIONS)
CORE = tuple(s.name for s in DESCRIPTIONS if s.captured == "caller")  # given by the caller, whatever the model
LAYERED = tuple(s.name for s in DESCRIPTIONS if s.layered)
VISION = tuple(s.name for s in DESCRIPTIONS if s.captured == "vision")  # captured in the vision forward
TOKENWISE = tuple(s.name for s in DESCRIPTIONS if s.text)  # also given for the text after the image
PER_TOKEN = tuple(s.name for s in DESCRIPTIONS if s.per_token)  # one row per candidate
VISION_LAYERED = tuple(s.name for s in DESCRIPTIONS if s.layered and s.captured == "vision")  # {layer: (n,)}
SCORED = tuple(s.name for s in DESCRIPTIONS if s.attention == "text_config")  # computed inside a decoder layer
ATTENTION = {s.name: s.attention for s in DESCRIPTIONS if s.attention}  # signal -> sub-config of its scoring attention


@dataclass(frozen=True)
class SignalRequest:
    """A signal a selector needs; ``layer`` is a vision layer (``cls_attention``) or decoder layer (the other
    layered signals); ``None`` means the adapter's default (the vision feature layer). ``cls``: the selector also
    needs the [CLS] token's value (``view.cls_hidden`` with ``vision_hidden``), so a tower without one cannot serve it.
    """

    name: str
    layer: int | None = None
    cls: bool = False

    def __post_init__(self) -> None:
        if self.name not in SIGNALS:
            raise ValueError(f"unknown signal {self.name!r}; known signals: {SIGNALS}")


@dataclass
class TokenView:
    """The candidate visual tokens of one image, as a selector sees them.

    Attributes
    ----------
    index : LongTensor (n,)
        Raster index of each candidate token within its image's token grid (ascending). Equal to ``arange(n)``
        unless an earlier stage already removed tokens of this image.
    grid : (int, int) or None
        ``(h, w)`` of the image's full token grid (of each frame, for a video), ``None`` when the tokens do not form
        a grid.
    frames : int
        Frames of a video (its tokens are ``frames x h x w`` in raster order; temporal patches on Qwen-VL); 1 for an
        image.
    image : int
        Ordinal of the image within its sample (0 for the first image of the prompt).
    all_features : Tensor (N, D) or None
        With ``features``: the projected tokens of the whole image (all ``N``, raster order), for methods that
        compare against the unpruned image (SparseVLM's rater choice).
    text : TokenView or None
        The text after the image (see the module docstring), when a token-wise signal was requested.
    rows, pad : LongTensor (n,), int or 0-d tensor
        In a decoder stage: each candidate's row in the (left-padded) input and its sample's left padding, so
        ``rows - pad`` are the positions in the unpadded prompt (what a batch-of-one release indexes by).
    ratio : float or None
        The stage's kept fraction when its budget was given as ``ratio`` (the ``keep`` a selector receives is that
        fraction rounded): for selectors that reproduce a release's arithmetic on the unrounded ratio.
    others
        See the module docstring; present only when requested.
    """

    index: torch.Tensor
    grid: tuple[int, int] | None
    image: int
    frames: int = 1
    features: torch.Tensor | None = None
    all_features: torch.Tensor | None = None
    cls_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    llm_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    incoming_attention: torch.Tensor | None = None
    text_attention: dict[int, torch.Tensor] = field(default_factory=dict)
    text_attention_max: dict[int, torch.Tensor] = field(default_factory=dict)
    llm_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    normed_hidden: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    vision_hidden: torch.Tensor | None = None
    cls_hidden: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    cls_key: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = None
    text: TokenView | None = None
    frame_span: torch.Tensor | None = None
    question: str | None = None
    raw_frames: object | None = None
    ratio: float | None = None
    rows: torch.Tensor | None = None
    pad: torch.Tensor | int = 0

    @property
    def n(self) -> int:
        return int(self.index.numel())

    def subset(self, rows: torch.Tensor) -> TokenView:
        """The candidates ``rows`` (ascending positions in this view) as a view of their own, on this view's grid:
        every per-token signal and every layered vision signal sliced to them, the [CLS] values and the projector
        shared (what a method choosing within each frame of a video reads)."""
        sub = TokenView(index=torch.arange(rows.numel()), grid=self.grid, image=self.image)
        for name in PER_TOKEN:
            value = getattr(self, name)
            if value is not None:
                setattr(sub, name, value[rows.to(value.device)])
        for name in VISION_LAYERED:
            setattr(sub, name, {k: v[rows.to(v.device)] for k, v in getattr(self, name).items()})
        sub.all_features = sub.features
        sub.cls_hidden, sub.cls_key, sub.project = self.cls_hidden, self.cls_key, self.project
        return sub
