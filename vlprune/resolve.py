"""Resolving a :class:`PruneConfig` against a model: the selectors instantiated and every stage checked against
what the model provides, before anything is installed."""

from __future__ import annotations

from dataclasses import dataclass

from .compaction import layer_kind
from .config import PruneConfig, Stage
from .registry import create_selector
from .selectors.base import Selector
from .signals import SignalRequest
from .support import missing_signals


@dataclass
class ResolvedStage:
    stage: Stage
    selector: Selector
    layer: int
    requests: list[SignalRequest]


def resolve(config: PruneConfig, adapter) -> list[ResolvedStage]:
    """Instantiate the selectors and check every stage against the model; raises before anything is installed."""
    resolved: list[ResolvedStage] = []
    for stage in config.stages:
        selector = create_selector(stage.method, **stage.params)
        layer = selector.default_layer if stage.layer is None else stage.layer
        _check_place(stage, selector, layer, adapter, resolved)
        _check_signals(stage, selector, layer, adapter)
        requests = selector.requests(layer, adapter.vision_depth)
        inside = sorted({r.name for r in requests} & {"cls_attention", "vision_hidden", "vision_keys", "projector"})
        if resolved and resolved[0].selector.tower and inside:
            raise ValueError(
                f"{stage.method!r} reads {inside} from inside the vision tower, where {resolved[0].stage.method!r} "
                "has already removed tokens; a later stage may read the projected features and LLM signals only"
            )
        for request in requests:
            adapter.check_request(request, stage.method)
        if selector.feeds_order() and config.positions != "renumber":
            raise ValueError(
                f"{stage.method!r} with order='release' feeds the release's token order, which the release reads at "
                "contiguous positions: use positions='renumber' (or order='position')"
            )
        resolved.append(ResolvedStage(stage, selector, layer, requests))
    _check_cache_stage(resolved, adapter)
    return resolved


def _check_place(stage: Stage, selector: Selector, layer: int, adapter, resolved: list[ResolvedStage]) -> None:
    """The stage's layer: inside the language model, after the earlier stages, and where its selector can act."""
    num_layers = adapter.num_layers
    if not 0 <= layer < num_layers:
        raise ValueError(
            f"layer={layer} is outside the language model's layers: use 0 (before the LLM) to "
            f"{num_layers - 1} (this {adapter.model_type} model has {num_layers} decoder layers)"
        )
    if resolved and layer <= resolved[-1].layer:
        raise ValueError(f"stage layers must be strictly increasing, got {[r.layer for r in resolved] + [layer]}")
    if selector.space == "vision" and (layer != 0 or resolved):
        where = "inside the vision tower" if selector.tower else "on the vision tower's output"
        raise ValueError(
            f"{stage.method!r} acts {where}: it must be the first stage, at layer 0 "
            f"(got layer={layer}{' after another stage' if resolved else ''})"
        )
    if selector.compacts_earlier_cache(layer):
        kinds = {layer_kind(adapter.text_config, i) for i in range(layer)}
        if layer == 0 or kinds - {"full_attention"}:
            raise ValueError(
                f"{stage.method!r} at layer {layer} drops tokens from the cache of the layers before it, which "
                f"needs layer > 0 and full-attention layers there (got {sorted(kinds) or 'none'})"
            )


def _check_signals(stage: Stage, selector: Selector, layer: int, adapter) -> None:
    """Every signal the stage needs is one the model provides."""
    missing = missing_signals(selector, adapter.signals, layer, adapter.feature_layer_only)
    if missing:
        why = adapter.why_not(missing)
        there_only = [name for name in missing if name in adapter.feature_layer_only]
        if there_only:
            why = f"it gives {', '.join(there_only)} at its vision feature layer only"
        if "frames" in missing:  # a video method on a family without video geometry
            why = "vlprune has no video geometry for it yet (vlprune.registry.video_models() lists those it has)"
        raise ValueError(
            f"method {stage.method!r} needs {missing}, which {adapter.model_type} cannot provide: {why} "
            "(see vlprune.support_table())"
        )


def _check_cache_stage(resolved: list[ResolvedStage], adapter) -> None:
    """At most one decode-time cache stage, at a decoder layer after every prefill stage."""
    num_layers = adapter.num_layers
    caching = [(rs.stage.method, cache) for rs in resolved if (cache := rs.selector.cache_stage()) is not None]
    if caching:
        method, cache = caching[0]
        if len(caching) > 1 or not 1 <= cache.layer < num_layers or resolved[-1].layer >= cache.layer:
            raise ValueError(
                f"{method!r} prunes the KV cache from decoder layer {cache.layer} while decoding: that layer must be "
                f"1 to {num_layers - 1}, after every prefill stage, with one such stage per schedule"
            )
        adapter.check_request(SignalRequest("llm_attention", cache.layer - 1), method)
