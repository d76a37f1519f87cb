"""``vlprune.wrap`` / ``vlprune.unwrap`` and the :class:`Pruned` handle that owns every hook and all per-call state.

How a wrapped forward runs (prefill):

1. A pre-hook on the model's entry module notes ``input_ids``, the 2-D mask and the cache.
2. Vision hooks (installed by the adapter) capture the signals the stages asked for; a first stage that prunes inside
   the vision tower (FlowCut) compacts the tower's tokens between its layers (:mod:`vlprune.tower`).
3. The pre-hook of decoder layer ``L`` of each stage asks the selector for a plan, then gathers the hidden states,
   rotary ``(cos, sin)``, position ids and mask down to the kept tokens (:mod:`vlprune.compaction`). Every later
   layer gets the gathered tensors in place of the full-length ones the language model prepared.

While decoding, each layer after a stage has a shorter KV cache than layer 0; its pre-hook gives it a mask built
against its own cache. Positions need nothing: ``generate`` numbers new tokens after the unpruned length.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import compaction, hf
from .attention import ensure_registered, last_query_attention, repeated_keys, text_attention
from .config import PruneConfig, build_config
from .decode_cache import CacheRestriction
from .decoding import Decoding
from .guards import CallGuards
from .hints import CallerHints
from .hooks import HookSet
from .plan import KeepPlan
from .registry import adapter_class
from .schedule import ResolvedStage, StageInputs, decide, decide_vision, frame_spans, resolve
from .signals import SCORED, VISION
from .tower import TowerStage

logger = logging.getLogger(__name__)


@dataclass
class _Call:
    """State of one forward call of the wrapped model."""

    prefill: bool
    attention_mask: torch.Tensor | None
    cache: Any
    visual: torch.Tensor | None = None  # (B, L) placeholder mask; layouts are derived on first use
    layouts: list | None = None
    segment: compaction.Segment | None = None
    llm: dict[str, dict] = field(default_factory=dict)  # signal -> {layer: (slot rows then, value)}
    embeddings: torch.Tensor | None = None
    masks: dict = field(default_factory=dict)  # decode: (segment id, layer kind) -> mask
    positions: dict = field(default_factory=dict)  # decode, renumbered: segment id -> (position_ids, cos, sin)
    cache_key_mask: torch.Tensor | None = None  # decode, cache stage: (B, Lk) mask of the scored layer
    cache_scores: torch.Tensor | None = None  # decode, cache stage: (B, Lk) the new token's attention there
    cache_keep: torch.Tensor | None = None  # decode, cache stage: (B, Lk) entries the later layers attend to


@dataclass
class _Session:
    """What decoding after a pruned prefill needs: the segment each decoder layer saw."""

    full_length: int
    layer_segment: dict[int, compaction.Segment]
    cache_back: int = 0  # a stage at this layer drops its tokens from the earlier layers' cache after the prefill


class Pruned(Decoding, CallerHints, CallGuards):
    """Handle returned by :func:`wrap`. Use as a context manager or call :meth:`unwrap`.

    Attributes
    ----------
    model : nn.Module
        The wrapped model (unchanged apart from instance hooks and, for methods that read attention scores, its
        attention implementation name).
    config : PruneConfig
        The schedule in force.
    plans : list of KeepPlan
        After each prefill, one :class:`KeepPlan` per stage: what was kept, per sample.
    selector_seconds : float
        Wall time spent deciding plans (the selectors and the views they read) since :func:`wrap`; the benchmarks
        report it per prefill. Decisions inside the vision tower (FlowCut) are not included.
    cache_plans : list
        With a decode-time cache stage (DyCoke's ``cache_prune_ratio``): per decoding step since the last prefill,
        per sample, the input rows of the visual cache entries the later layers attended to (ascending), or ``None``
        when they attended to all of them (:mod:`vlprune.decode_cache`).
    """

    def __init__(self, model: nn.Module, config: PruneConfig, adapter, stages: list[ResolvedStage]) -> None:
        self.model = model
        self.config = config
        self.adapter = adapter
        self.plans: list[KeepPlan] = []
        self.selector_seconds = 0.0
        self._stages = {rs.layer: rs for rs in stages}
        self._renumber = config.positions == "renumber"
        self._hooks = HookSet()
        self._thread: int | None = None  # the thread whose call is running (see _claim)
        self._saved_attention: dict[str, str] = {}
        self._vision: dict = {}
        self._call: _Call | None = None
        self._session: _Session | None = None
        self._query: tuple[list, list | None] | None = None
        self._videos: list[list[int | None]] | None = None
        self._active = False
        caches = [cache for rs in stages if (cache := rs.selector.cache_stage()) is not None]
        self._cache = CacheRestriction(caches[0]) if caches else None  # a decode-time cache stage

    # --- install / remove --------------------------------------------------------------------------------------
    def _install(self) -> None:
        adapter = self.adapter
        requests = [r for rs in self._stages.values() for r in rs.requests]
        keys = adapter.scoring_configs(requests)
        if self._cache is not None and "text_config" not in keys:
            keys.append("text_config")
        for key in keys:
            current = getattr(self.model.config, key)._attn_implementation
            wrapped = ensure_registered(current)
            if wrapped != current:
                self._saved_attention[key] = current
                self.model.set_attn_implementation({key: wrapped})
        self._hooks.pre(adapter.entry, self._on_entry)
        self._hooks.post(adapter.entry, self._on_entry_done)
        self._hooks.post(adapter.entry, self._on_exit, always=True)
        if callable(getattr(self.model, "generate", None)):
            self._hooks.method(self.model, "generate", self._guarded_generate)
        first = self._stages[min(self._stages)]
        if first.selector.tower:  # before install_vision: captures of the projector output see the expanded tensor
            adapter.install_tower_stage(self._hooks, TowerStage(first, adapter.feature_encoder_layer, self._vision))
        adapter.install_vision(requests, self._vision, self._hooks)
        if first.selector.space == "vision" and not first.selector.tower:
            adapter.install_projector_stage(self._hooks, self._vision_stage)
        scored: dict[int, set[str]] = {}
        for r in requests:
            if r.name in SCORED:
                scored.setdefault(r.layer, set()).add(r.name)
        for layer, names in sorted(scored.items()):
            adapter.inject_scorer(
                self._hooks, adapter.attention_module(layer), self._llm_scorer(layer, names), lambda: self._in_prefill
            )
        if self._cache is not None:
            scored = adapter.attention_module(self._cache.layer - 1)
            decoding = lambda: self._call is not None and not self._call.prefill  # noqa: E731
            adapter.inject_scorer(self._hooks, scored, self._cache_scorer, decoding)
        adapter.install_language(self._hooks, self._current_rows, lambda: self._in_prefill)
        if any(r.name == "embeddings" for r in requests):
            self._hooks.pre(adapter.language_model, self._on_language_model)
        back = any(rs.selector.compacts_earlier_cache(rs.layer) for rs in self._stages.values())
        for layer in range(0 if back else min(self._stages), adapter.num_layers):
            self._hooks.pre(adapter.layers[layer], self._layer_hook(layer))
        self._active = True

    def unwrap(self) -> None:
        """Remove every hook and restore the attention implementation. Idempotent."""
        self._hooks.remove()
        if self._saved_attention:
            self.model.set_attn_implementation(dict(self._saved_attention))
            self._saved_attention.clear()
        self._vision.clear()
        self._call = self._session = None
        self._active = False

    @property
    def cache_plans(self) -> list:
        return self._cache.plans if self._cache is not None else []

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> Pruned:
        return self

    def __exit__(self, *exc) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        stages = ", ".join(f"{rs.stage.method}@layer{rs.layer}" for rs in self._stages.values())
        positions = self.config.positions
        return f"Pruned({self.adapter.model_type}: {stages}, positions={positions!r}, active={self._active})"

    # --- hooks -------------------------------------------------------------------------------------------------
    @property
    def _in_prefill(self) -> bool:
        return self._call is not None and self._call.prefill

    def _on_entry(self, module, args, kwargs):
        self._claim()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = hf.call_cache(kwargs)
        mask = kwargs.get("attention_mask")
        if input_ids is None and kwargs.get("inputs_embeds") is None:
            self._call = None  # the model raises its own error
            return None
        if hf.is_prefill(kwargs):
            self._check_padding(mask)
            batch = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[0]
            if self._videos is not None and len(self._videos) != batch:
                raise ValueError(
                    f"set_videos described {len(self._videos)} sample(s) but this call has {batch}; call set_videos "
                    "with one entry per sample"
                )
            self.plans = []
            self._session = None
            if self._cache is not None:
                self._cache.start((input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1])
            visual = self.adapter.visual_mask(input_ids, kwargs.get("inputs_embeds"))
            self._vision.pop("video_frames", None)  # a failed call may have left its own
            if self._videos is not None:
                self._vision["video_frames"] = self._videos
            self._call = _Call(True, mask, cache, visual=visual)
            return None
        self._vision.clear()
        self._check_no_new_images(kwargs)
        self._call = _Call(False, mask, cache)
        session = self._session
        first = session.layer_segment.get(0) if session else None
        if first is None:
            return None
        # Layer 0 saw only the kept tokens: its cache is shorter than the input. Give the language model a 2-D mask
        # and (when the caller gave none) the positions it would have had without pruning.
        q = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[1]
        seen = hf.cache_length(cache) - first.length  # tokens decoded so far
        if mask is not None and mask.shape[-1] != session.full_length + seen + q:
            self._call = None
            self._refuse_continuation(q, session.full_length + seen, mask.shape[-1])
        if kwargs.get("position_ids") is None:
            positions = session.full_length + seen + torch.arange(q, device=first.rows.device)
            kwargs["position_ids"] = self.adapter.decode_positions(positions[None].expand(first.rows.shape[0], q))
        kwargs["attention_mask"] = self._decode_mask2d(first, seen + q)
        return args, kwargs

    def _on_entry_done(self, module, args, kwargs, output):
        session = self._session
        if self._in_prefill and session is not None and session.cache_back:
            self._compact_earlier_cache(hf.output_cache(output) or self._call.cache)
        if self._in_prefill:
            if self._cache is not None and self._call.layouts is not None:
                self._cache.remember(self._call.layouts)
            self._vision.clear()
            for segment in self._session.layer_segment.values() if self._session else ():
                segment.masks.clear()  # prefill-sized (eager: (B, 1, L', L')); decoding builds its own
        self._call = None
        return None

    def _on_language_model(self, module, args, kwargs):
        if self._in_prefill:
            self._call.embeddings = kwargs.get("inputs_embeds")
        return None

    def _current_rows(self) -> torch.Tensor | None:
        call = self._call
        return call.segment.rows if call is not None and call.segment is not None else None

    def _layouts(self) -> list:
        """Where each sample's images are; derived once per prefill, after the vision tower ran (image sizes may
        come from it)."""
        call = self._call
        if call.layouts is None:
            call.layouts = self.adapter.layouts(call.visual, self._vision)
        return call.layouts

    def _slot_rows(self, length: int, device) -> torch.Tensor:
        call = self._call
        if call.segment is not None:
            return call.segment.rows
        return torch.arange(length, device=device).expand(call.visual.shape[0], length)

    def _llm_scorer(self, layer: int, names: set[str]):
        def scorer(module, query, key, value, kwargs):
            call = self._call
            query, key = query.detach(), key.detach()
            key_mask = call.segment.mask if call.segment is not None else call.attention_mask
            if key_mask is not None:
                key_mask = key_mask.to(device=key.device, dtype=torch.bool)
            rows = self._slot_rows(key.shape[2], key.device)
            scaling = kwargs.get("scaling")
            if "llm_attention" in names:
                call.llm.setdefault("llm_attention", {})[layer] = (
                    rows,
                    last_query_attention(query, key, scaling, key_mask),
                )
            if "llm_keys" in names:
                call.llm.setdefault("llm_keys", {})[layer] = (rows, repeated_keys(query, key))
            if "text_attention" in names:
                call.llm.setdefault("text_attention", {})[layer] = (
                    rows,
                    text_attention(query, key, scaling, key_mask, rows, self._layouts()),
                )

        return scorer

    def _stage_inputs(self, stage: ResolvedStage, layer: int, hidden: torch.Tensor) -> StageInputs:
        call = self._call
        rows = call.segment.rows
        mask = call.attention_mask
        pads = (mask == 0).sum(1) if mask is not None and mask.dim() == 2 else None  # left padding, no sync
        inputs = StageInputs(rows=rows, vision=self._vision, embeddings=call.embeddings, pads=pads)
        wanted = {(r.name, r.layer) for r in stage.requests}
        for name, per_layer in call.llm.items():
            for key, (old_rows, value) in per_layer.items():
                if (name, key) not in wanted:
                    continue
                if name == "text_attention":
                    inputs.text_attention[key] = [  # (t, L) per sample: its slots are the columns
                        (queries, *(compaction.align(s.T[None], old_rows[b : b + 1], rows[b : b + 1])[0].T for s in v))
                        for b, (queries, *v) in enumerate(value)
                    ]
                else:
                    target = inputs.llm if name == "llm_attention" else inputs.keys
                    target[key] = compaction.align(value, old_rows, rows)
        names = {name for name, _ in wanted}
        if "frames" in names:
            inputs.spans = frame_spans(self.plans, self._layouts())
        if "query" in names:
            inputs.query = self._query_for(rows.shape[0])
        if "hidden" in names:
            inputs.hidden = hidden
        if "normed_hidden" in names:
            inputs.normed = self.adapter.final_norm(hidden)
        if "incoming_attention" in names:
            segment = call.segment
            query, key, scaling = self.adapter.query_key(layer, hidden, segment.cos, segment.sin)
            inputs.incoming = last_query_attention(query, key, scaling, segment.mask.to(key.device))
        return inputs

    def _vision_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Projector pre-hook of a vision-space first stage (see :func:`vlprune.schedule.decide_vision`). It runs
        on every projector call: ``generate`` encodes the images before the first forward (``mm_encoder_outputs``)."""
        start = _clock(x.device)
        out, self._vision["decided"] = decide_vision(self._stages[min(self._stages)], x, self._vision, self.adapter)
        self.selector_seconds += _clock(x.device) - start
        return out

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            if call.prefill:
                return self._prefill_layer(layer, args, kwargs)
            return self._decode_layer(layer, args, kwargs)

        return hook

    def _prefill_layer(self, layer: int, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        stage = self._stages.get(layer)
        if stage is not None:
            hidden = self._run_stage(stage, layer, hidden, kwargs)
        segment = self._session.layer_segment.get(layer) if self._session else None
        if segment is None:
            return None
        return self._apply_prefill(layer, segment, hidden, args, kwargs)

    def _run_stage(self, stage: ResolvedStage, layer: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        """Decide the stage's plan; compact the hidden states (and the segment) unless it keeps everything."""
        call = self._call
        if call.segment is None:
            call.segment = compaction.initial_segment(
                hidden, call.attention_mask, kwargs.get("position_ids"), kwargs["position_embeddings"]
            )
        required = {"vision_hidden" if r.name == "projector" else r.name for r in stage.requests} & set(VISION)
        if stage.selector.space == "vision":
            required = {"decided"}
        layouts = self._layouts()
        self.adapter.check_vision(self._vision, layouts, required)
        if any(r.name == "frames" for r in stage.requests):
            self.adapter.check_frames(self._vision, layouts)
        start = _clock(hidden.device)
        keep_slots, merges, plan = decide(stage, self._stage_inputs(stage, layer, hidden), layouts)
        self.selector_seconds += _clock(hidden.device) - start
        self.plans.append(plan)
        logger.debug("%r", plan)
        if all(int(k.numel()) == call.segment.length for k in keep_slots) and not any(m is not None for m in merges):
            return hidden
        if self._session is None:
            self._session = _Session(call.segment.length, {})
        call.segment, hidden = compaction.compact(
            call.segment, hidden, keep_slots, self._renumber, self.adapter.rotary, merges
        )
        for later in range(layer, self.adapter.num_layers):
            self._session.layer_segment[later] = call.segment
        if stage.selector.compacts_earlier_cache(layer):
            if any(m is not None for m in merges):
                raise RuntimeError(f"{stage.stage.method!r} merged tokens at a stage that compacts the earlier cache")
            self._session.cache_back = layer
        return hidden

    def _apply_prefill(self, layer, segment, hidden, args, kwargs):
        call = self._call
        kind = compaction.layer_kind(self.adapter.text_config, layer)
        if kind not in segment.masks:
            segment.masks[kind] = compaction.build_mask(
                self.adapter.text_config, layer, hidden, segment.mask, call.cache, segment.position_ids
            )
        kwargs["attention_mask"] = segment.masks[kind]
        kwargs["position_embeddings"] = (segment.cos, segment.sin)
        kwargs["position_ids"] = segment.position_ids
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs


def _find_handle(model: nn.Module) -> Pruned | None:
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Pruned):
                return owner
    return None


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def wrap(
    model: nn.Module,
    method: str | Path | PruneConfig,
    *,
    keep: int | None = None,
    ratio: float | None = None,
    layer: int | None = None,
    positions: str = "original",
    per: str | None = None,
    **params: Any,
) -> Pruned:
    """Prune or merge the visual tokens of ``model`` during its ``forward`` and ``generate``.

    Parameters
    ----------
    model : transformers model
        An unmodified Hugging Face vision-language model (see :func:`vlprune.list_models`).
    method : str, path or PruneConfig
        A registered method (:func:`vlprune.list_methods`), a shipped preset name, a YAML preset path, or a config.
    keep : int, optional
        Visual tokens kept per image. Exactly one of ``keep`` / ``ratio`` (unless the preset sets one).
    ratio : float, optional
        Fraction of each image's visual tokens kept, in (0, 1].
    layer : int, optional
        First decoder layer that sees only the kept tokens (0 = before the LLM); default: the method's own.
    positions : {"original", "renumber"}
        Keep the kept tokens' original position ids (default) or renumber them contiguously (ablation).
    per : {"image", "tile"}, optional
        What ``keep`` / ``ratio`` apply to: each image (default) or each tile of a tiled image (LLaVA-NeXT,
        LLaVA-OneVision, InternVL), chosen tile by tile.
    **params
        The method's hyper-parameters.

    Returns
    -------
    Pruned
        A handle; ``with vlprune.wrap(...) as pruned:`` unwraps on exit.

    Notes
    -----
    With a preset or ``PruneConfig``, ``keep`` / ``ratio`` / ``layer`` / ``per`` / ``**params`` override its single
    stage, and ``positions="renumber"`` overrides the preset's ``positions``.

    Raises
    ------
    ValueError, TypeError
        On any bad argument, before the model is touched.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    existing = _find_handle(model)
    if existing is not None:
        raise ValueError(f"this model is already wrapped ({existing!r}); call .unwrap() or vlprune.unwrap(model) first")
    config = build_config(method, keep, ratio, layer, positions, params, per)
    adapter = adapter_class(getattr(model.config, "model_type", None))(model)
    stages = resolve(config, adapter)
    handle = Pruned(model, config, adapter, stages)
    try:
        handle._install()
    except BaseException:
        handle.unwrap()
        raise
    return handle


def unwrap(model: nn.Module) -> bool:
    """Remove vlprune from ``model`` if it is wrapped; returns whether it was."""
    handle = _find_handle(model)
    if handle is None:
        return False
    handle.unwrap()
    return True
