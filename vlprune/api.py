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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import compaction, hf, llm_signals
from .attention import switch_to_scoring
from .captures import VisionCaptures
from .config import PruneConfig, build_config
from .decode_cache import CacheRestriction
from .decoding import Decoder
from .guards import CallGuards
from .hints import CallerHints
from .hooks import HookSet
from .layout import frame_spans
from .llm_signals import AtStage
from .plan import KeepPlan
from .registry import adapter_class
from .resolve import ResolvedStage, resolve
from .schedule import decide, decide_vision
from .signals import VISION
from .state import Call, Session
from .tower import TowerStage
from .views import StageInputs, stage_inputs

logger = logging.getLogger(__name__)


class Pruned(CallerHints, CallGuards):
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
        self._vision = VisionCaptures()
        self._call: Call | None = None
        self._session: Session | None = None
        self._query: tuple[list, list | None] | None = None
        self._videos: list[list[int | None]] | None = None
        self._active = False
        caches = [cache for rs in stages if (cache := rs.selector.cache_stage()) is not None]
        self._cache = CacheRestriction(caches[0]) if caches else None  # a decode-time cache stage
        self._decoder = Decoder(adapter, self._renumber, self._cache)

    # --- install / remove --------------------------------------------------------------------------------------
    def _install(self) -> None:
        adapter = self.adapter
        requests = [r for rs in self._stages.values() for r in rs.requests]
        keys = adapter.scoring_configs(requests)
        if self._cache is not None and "text_config" not in keys:
            keys.append("text_config")
        self._saved_attention.update(switch_to_scoring(self.model, keys))
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
        for layer, names in sorted(llm_signals.scored_layers(requests).items()):
            adapter.inject_scorer(
                self._hooks, adapter.attention_module(layer), self._llm_scorer(layer, names), lambda: self._in_prefill
            )
        if self._cache is not None:
            scored = adapter.attention_module(self._cache.layer - 1)
            decoding = lambda: self._call is not None and not self._call.prefill  # noqa: E731
            adapter.inject_scorer(self._hooks, scored, Decoder.cache_scorer(lambda: self._call), decoding)
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
            batch, length = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).shape[:2]
            self._check_padding(mask)
            self._check_videos(batch)
            self.plans, self._session = [], None
            if self._cache is not None:
                self._cache.start(length)
            visual = self.adapter.visual_mask(input_ids, kwargs.get("inputs_embeds"))
            self._vision.video_frames = self._videos  # (a failed call may have left its own)
            self._call = Call(True, mask, cache, visual=visual)
            return None
        self._vision.clear()
        self._check_no_new_images(kwargs)
        self._call = Call(False, mask, cache)
        try:
            return self._decoder.entry(self._call, self._session, input_ids, args, kwargs)
        except ValueError:
            self._call = None
            raise

    def _on_entry_done(self, module, args, kwargs, output):
        if self._in_prefill and self._session is not None and self._session.cache_back:
            Decoder.compact_earlier_cache(self._session, hf.output_cache(output) or self._call.cache)
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

    def _llm_scorer(self, layer: int, names: set[str]):
        def scorer(module, query, key, value, kwargs):
            call = self._call
            key_mask = call.segment.mask if call.segment is not None else call.attention_mask
            full = torch.arange(key.shape[2], device=key.device).expand(call.visual.shape[0], -1)  # before any stage
            rows = call.segment.rows if call.segment is not None else full
            scaling = kwargs.get("scaling")
            llm_signals.score(call.llm, layer, names, query, key, value, scaling, key_mask, rows, self._layouts)

        return scorer

    def _stage_inputs(self, stage: ResolvedStage, layer: int, hidden: torch.Tensor) -> StageInputs:
        call = self._call
        at_stage = AtStage(layer, hidden, call.segment, self.adapter, call.embeddings)
        inputs = stage_inputs(stage.requests, self._vision, call.llm, at_stage, call.attention_mask)
        names = {r.name for r in stage.requests}
        if "frames" in names:
            inputs.spans = frame_spans(self.plans, self._layouts())
        if "query" in names:
            inputs.query = self._query_for(inputs.rows.shape[0])
        return inputs

    def _vision_stage(self, x: torch.Tensor) -> torch.Tensor:
        """Projector pre-hook of a vision-space first stage (see :func:`vlprune.schedule.decide_vision`). It runs
        on every projector call: ``generate`` encodes the images before the first forward (``mm_encoder_outputs``)."""
        start = _clock(x.device)
        out, self._vision.decided = decide_vision(self._stages[min(self._stages)], x, self._vision, self.adapter)
        self.selector_seconds += _clock(x.device) - start
        return out

    def _layer_hook(self, layer: int):
        def hook(module, args, kwargs):
            call = self._call
            if call is None:
                return None
            if call.prefill:
                return self._prefill_layer(layer, args, kwargs)
            return self._decoder.layer(call, self._session, layer, args, kwargs)

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
            self._session = Session(call.segment.length, {})
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
