"""LLaVA-1.5 family (``LlavaForConditionalGeneration``, model_type ``llava``): vision tower (CLIP with [CLS], or a
tower without one such as SigLIP) -> projector -> image placeholders scattered into a Llama-like decoder."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..captures import VisionCaptures
from ..hooks import HookSet
from ..llm_signals import DECODER_SIGNALS
from ..registry import register_adapter
from ..signals import SignalRequest
from .base import Adapter

# what a LLaVA-1.5 vision side (CLIP with [CLS], one grid per image) gives
VISION_SIDE = (
    "features",
    "cls_attention",
    "received_attention",
    "vision_hidden",
    "vision_keys",
    "projector",
    "grid",
    "vision_qkv",
)

CLS_TOWERS = ("clip_vision_model",)


@register_adapter("llava")
class LlavaAdapter(Adapter):
    """Signals: ``features`` (projector output), ``cls_attention`` (CLIP towers), ``llm_attention``, ``grid``."""

    model_type = "llava"
    summary = "LLaVA-1.5 and other llava-hf conversions: CLIP (or SigLIP) tower, projector, Llama-like decoder"
    signals = {name: "yes" for name in (*VISION_SIDE, *DECODER_SIGNALS)}  # [CLS]: checked

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        config = model.config
        base = self._bind_vlm(model)
        self.vision_tower = base.vision_tower
        self.projector = base.multi_modal_projector
        vision = config.vision_config
        self.vision_model_type = vision.model_type
        self.vision_depth = vision.num_hidden_layers
        self.has_cls = vision.model_type in CLS_TOWERS
        self.strategy = config.vision_feature_select_strategy
        patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_image = patches + int(self.has_cls) - int(self.strategy == "default")
        layer = config.vision_feature_layer
        self.feature_hidden = layer if isinstance(layer, int) else layer[-1]

    def image_token_counts(self, num_visual: int) -> list[int]:
        if num_visual % self.tokens_per_image:
            raise ValueError(
                f"a sample has {num_visual} image tokens, not a multiple of this model's {self.tokens_per_image} "
                "tokens per image"
            )
        return [self.tokens_per_image] * (num_visual // self.tokens_per_image)

    def check_request(self, request: SignalRequest, method: str) -> None:
        if request.name == "cls_attention":
            if not self.has_cls:
                raise ValueError(
                    f"method {method!r} needs [CLS] attention, but this llava model's vision tower "
                    f"({self.vision_model_type}) has no [CLS] token; use a method without [CLS] attention"
                )
            self.vision_layer(request.layer)
            self._check_attention("vision_config", method)
        elif request.name in ("llm_attention", "llm_keys", "text_attention"):
            self._check_attention("text_config", method)
        elif request.name == "vision_keys":
            self.vision_layer(None)
            self._check_attention("vision_config", method)
        elif request.name == "received_attention":  # recomputed from the layer's input: any attention implementation
            self.vision_layer(request.layer)
        elif request.name == "vision_qkv":
            self._check_tower(method)
        if request.cls and not self.has_cls:
            raise ValueError(f"method {method!r} needs a vision tower with a [CLS] token")

    def _check_tower(self, method: str) -> None:
        config = self.model.config
        problem = None
        if not self.has_cls:
            problem = f"a vision tower with a [CLS] token (this one is {self.vision_model_type})"
        elif self.strategy != "default":
            problem = f"vision_feature_select_strategy='default' (this model uses {self.strategy!r})"
        elif not isinstance(config.vision_feature_layer, int):
            problem = f"a single vision feature layer (this model uses {config.vision_feature_layer!r})"
        elif self.feature_encoder_layer < 1:
            problem = "a vision feature layer after encoder layer 0"
        elif config.vision_config._attn_implementation not in ("sdpa", "eager", "vlprune_sdpa", "vlprune_eager"):
            impl = config.vision_config._attn_implementation
            problem = f"'sdpa' or 'eager' attention in the vision tower for its padding masks (this one uses {impl!r})"
        if problem:
            raise ValueError(f"method {method!r} prunes inside the vision tower and needs {problem}")

    @property
    def feature_encoder_layer(self) -> int:
        return self.vision_layer(None)

    def install_tower_stage(self, hooks: HookSet, tower) -> None:
        layers = self.vision_tower.encoder.layers

        def enter(index):
            def hook(module, args, kwargs):
                hidden, mask = tower.enter(index, args[0] if args else kwargs["hidden_states"])
                kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "attention_mask")}
                return (hidden, mask, *args[2:]), kwargs

            return hook

        def observe(index):
            return lambda module, q, k, v, kwargs: tower.observe(index, q, k, v, kwargs.get("scaling"))

        for index, layer in enumerate(layers):
            hooks.pre(layer, enter(index))
        for index in range(tower.feature_layer):
            self.inject_scorer(hooks, layers[index].self_attn, observe(index))
        hooks.post(self.projector, lambda module, args, kwargs, out: tower.expand(out))

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        names = {r.name for r in requests}
        if "features" in names:
            hooks.post(self.projector, lambda module, args, kwargs, out: setattr(store, "features", out.detach()))
        if names & {"vision_hidden", "projector"}:

            def capture(module, args, kwargs):
                store.vision_hidden = args[0].detach()
                if "projector" in names:
                    store.project = self.projector_fp32()

            hooks.pre(self.projector, capture)
        feature_layer = self.vision_layer(None) if names & {"vision_hidden", "vision_keys"} else None
        if "vision_hidden" in names and self.has_cls:
            hooks.post(
                self.vision_tower.encoder.layers[feature_layer],
                lambda module, args, kwargs, out: setattr(store, "cls_hidden", out[:, 0].detach()),
            )
        by_layer: dict[int, list] = {}
        for r in requests:
            if r.name == "cls_attention":
                by_layer.setdefault(self.vision_layer(r.layer), []).append(r.layer)
            if r.name == "vision_keys":
                by_layer.setdefault(feature_layer, [])
        drop_cls = self.strategy == "default"
        own = "received_attention" in self.feature_layer_only  # families that pool their features capture it so
        received = [] if own else [r.layer for r in requests if r.name == "received_attention"]
        for key in dict.fromkeys(received):

            def record(scores, key=key):  # (n_img, T): the patches' columns, as the features keep them
                store.received_attention[key] = scores[:, 1:] if drop_cls else scores

            attention = self.vision_tower.encoder.layers[self.vision_layer(key)].self_attn
            hooks.pre(attention, self.received_hook(record))
        for layer, keys in by_layer.items():
            want_keys = "vision_keys" in names and layer == feature_layer
            scorer = self.vision_scorer(store, keys, drop_cls, want_keys)
            self.inject_scorer(hooks, self.vision_tower.encoder.layers[layer].self_attn, scorer)

    def projector_fp32(self):
        """The projector as an fp32 function of ``(m, Dv)`` inputs: its own ``forward`` (no hooks) when it is fp32,
        else that of an fp32 copy; the model's parameters are never changed."""
        module = self.projector
        if any(p.dtype != torch.float32 for p in module.parameters()):
            module = copy.deepcopy(module).float()
        return lambda x: module.forward(x.float())

    def install_projector_stage(self, hooks: HookSet, stage) -> None:
        hooks.pre(self.projector, lambda module, args, kwargs: ((stage(args[0]), *args[1:]), kwargs))
