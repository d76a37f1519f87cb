"""Adapter base: the only code that knows a model family's module paths, visual token ids, token geometry and which
signals it can provide. One subclass per family, registered by ``config.model_type``."""

from __future__ import annotations

import sys
from typing import ClassVar

import torch
from torch import nn

from ..attention import PREFIX, SCORER_KWARG, SUPPORTED_BASES, first_query_attention, head_mean_attention
from ..captures import VisionCaptures
from ..hooks import HookSet
from ..layout import SampleLayout
from ..signals import ATTENTION, SignalRequest


class Adapter:
    """Model knowledge for one family. Subclasses set the module handles in ``__init__`` and implement
    :meth:`image_token_counts`, :meth:`check_request` and :meth:`install_vision`."""

    model_type: ClassVar[str] = ""
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for `vlprune models`
    # Signals this family provides: "yes", or "substitute: <what stands in, and who used it>". Others: a clear error
    # naming the model and the method. ``vlprune.support_table()`` (and the README's table) is derived from this.
    signals: ClassVar[dict[str, str]] = {}
    image_only: ClassVar[tuple[str, ...]] = ()  # signals among ``signals`` refused (clear error) for video inputs
    # layered vision signals among ``signals`` given at the vision feature layer only (a request at another layer is
    # a missing signal: the support table says "no" and ``wrap()`` refuses it)
    feature_layer_only: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.entry: nn.Module = model  # module whose forward receives input_ids / attention_mask / cache
        self.language_model: nn.Module = model
        self.text_config = model.config
        self.image_token_id: int = -1
        self.vision_depth: int = 0
        self.feature_hidden: int | list | None = None  # the tower's hidden_states index the features come from

    def _bind_vlm(self, model: nn.Module) -> nn.Module:
        """Set the handles every ``XForConditionalGeneration`` family shares; returns the base model."""
        base = model.model if hasattr(model, "lm_head") else model
        self.base = self.entry = base
        self.language_model = base.language_model
        self.text_config = model.config.text_config
        self.image_token_id = model.config.image_token_id
        return base

    def vision_layer(self, key: int | None) -> int:
        """Vision encoder layer whose attention ``cls_attention[key]`` reads; ``None``: the layer whose output the
        model takes as features (``self.feature_hidden``, an index into the tower's ``hidden_states``)."""
        depth = self.vision_depth
        if key is None:
            hidden = self.feature_hidden
            if not isinstance(hidden, int):
                raise ValueError(f"{self.model_type} [CLS] attention needs a single vision feature layer")
            layer = hidden % (depth + 1) - 1  # hidden_states[h] is the output of layer h - 1
            if layer < 0:
                raise ValueError("the vision feature layer is the embedding output, which has no attention map")
            return layer
        if not -depth <= key < depth:
            raise ValueError(f"vision layer {key} is outside the vision tower's {depth} layers ({-depth}..{depth - 1})")
        return key % depth

    def _check_attention(self, config_key: str, method: str) -> None:
        """Raise unless the attention implementation of sub-config ``config_key`` can be wrapped for scores."""
        impl = getattr(self.model.config, config_key)._attn_implementation
        if impl not in SUPPORTED_BASES and not str(impl).startswith(PREFIX):
            raise ValueError(
                f"method {method!r} reads attention scores, which vlprune computes beside the attention "
                f"implementation; {config_key} uses {impl!r}, supported: {SUPPORTED_BASES}"
            )

    # --- structure ---------------------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention_module(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary ``(cos, sin)`` for ``position_ids`` (B, L), as the language model computes them."""
        return self.language_model.rotary_emb(hidden, position_ids=position_ids)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The language model's final norm (before the LM head)."""
        return self.language_model.norm(hidden)

    def query_key(self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Post-RoPE ``(query (B, H, L, d), key (B, Hkv, L, d), scaling)`` that decoder layer ``layer`` computes from
        its input ``hidden`` (B, L, D), with its own input norm, projections (and q/k norms where it has them)."""
        block = self.layers[layer]
        attention = block.self_attn
        x = block.input_layernorm(hidden)
        shape = (*x.shape[:-1], -1, attention.head_dim)
        query, key = attention.q_proj(x).view(shape), attention.k_proj(x).view(shape)
        if getattr(attention, "q_norm", None) is not None:
            query, key = attention.q_norm(query), attention.k_norm(key)
        rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        query, key = rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query, key, attention.scaling

    def scoring_configs(self, requests: list[SignalRequest]) -> list[str]:
        """Sub-config keys whose attention must run through the scoring wrapper for ``requests``."""
        return sorted({ATTENTION[r.name] for r in requests if r.name in ATTENTION})

    # --- tokens ------------------------------------------------------------------------------------------------
    def visual_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """(B, L) bool: which input tokens are visual placeholders."""
        if input_ids is not None:
            return input_ids == self.image_token_id
        token = torch.tensor(self.image_token_id, device=inputs_embeds.device)
        return (inputs_embeds == self.language_model.get_input_embeddings()(token)).all(-1)

    def images_or_videos(self, input_ids, inputs_embeds, video_token_id: int) -> torch.Tensor:
        """(B, L) bool: the image placeholders, or the video placeholders; a batch with both is an error (the model
        encodes them in two vision calls, which vlprune does not order yet)."""
        images = Adapter.visual_mask(self, input_ids, inputs_embeds)
        if input_ids is None:
            return images
        videos = input_ids == video_token_id
        if images.any() and videos.any():
            raise ValueError(
                f"vlprune prunes {self.model_type} batches of images or batches of videos, not both in one batch yet; "
                "pass them in separate calls"
            )
        return images | videos

    def image_token_counts(self, num_visual: int) -> list[int]:
        """Token count of each image of a sample that has ``num_visual`` visual tokens."""
        raise NotImplementedError

    def image_grid(self, count: int) -> tuple[int, int] | None:
        """(h, w) of an image of ``count`` tokens, or ``None`` when they do not form a grid."""
        side = round(count**0.5)
        return (side, side) if side * side == count else None

    def image_sizes(self, store: VisionCaptures) -> list[int] | None:
        """Token count of every image of the batch, in the order the model scatters them, when it varies per image
        (read from what the vision hooks captured); ``None`` when :meth:`image_token_counts` fixes it."""
        return None

    def grid_of(self, store: VisionCaptures, image: int, count: int) -> tuple[int, int] | None:
        """(h, w) token grid of the batch's ``image``-th image, which has ``count`` tokens."""
        return self.image_grid(count)

    def frames_of(self, store: VisionCaptures, image: int) -> int:
        """Frames of the batch's ``image``-th visual input (1 for an image)."""
        return 1

    def layouts(self, visual: torch.Tensor, store: VisionCaptures) -> list:
        """Per-sample :class:`SampleLayout` from the (B, L) visual mask; images are numbered across the batch in
        the order the model scatters their features."""
        sizes = self.image_sizes(store)
        out, first = [], 0
        for b in range(visual.shape[0]):
            positions = torch.nonzero(visual[b].cpu()).flatten()
            n = int(positions.numel())
            if sizes is None:
                counts = self.image_token_counts(n)
            else:
                counts = []
                while sum(counts) < n and first + len(counts) < len(sizes):
                    counts.append(sizes[first + len(counts)])
                if sum(counts) != n:
                    raise ValueError(
                        f"sample {b} has {n} image placeholders, which do not add up to whole images of the sizes the "
                        f"vision tower produced ({sizes})"
                    )
            image_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.long))
            local = torch.cat([torch.arange(c) for c in counts]) if counts else torch.zeros(0, dtype=torch.long)
            images = list(range(first, first + len(counts)))
            first += len(counts)
            grids = [self.grid_of(store, image, c) for image, c in zip(images, counts, strict=True)]
            frames = [self.frames_of(store, image) for image in images]
            out.append(SampleLayout(positions, image_of, local, images, grids, frames=frames))
        return out

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids to pass while decoding after a pruned prefill, from the (B, q) positions the tokens would have
        had without pruning (1-D models: as they are)."""
        return positions

    # --- signals -----------------------------------------------------------------------------------------------
    @staticmethod
    def check_vision(store: VisionCaptures, layouts: list, required: set[str]) -> None:
        """Raise if the vision signals in ``required`` were not captured for exactly the images the prompt's
        placeholders call for (for example, features passed in by the caller instead of computed by the model)."""
        images = sum(len(layout.images) for layout in layouts)
        missing = sorted(name for name in required if not store.has(name))
        if images and missing:
            raise ValueError(
                f"the prompt has {images} image(s) but no {missing} signal was captured during this call; pass "
                "pixel_values to the wrapped model (not precomputed image features) so vlprune sees the vision tower"
            )
        captured = [store.features] if store.has("features") else []
        captured += list(store.cls_attention.values())
        for value in captured:
            if len(value) != images:
                raise ValueError(
                    f"the prompt has placeholders for {images} image(s) but the vision signals captured during this "
                    f"call cover {len(value)}; pass pixel_values to the wrapped model so vlprune sees them"
                )

    def check_frames(self, store: VisionCaptures, layouts: list) -> None:
        """Raise if a method reading ``frames`` cannot be told this call's videos (families whose prompts do not mark
        them wait for :meth:`vlprune.Pruned.set_videos`)."""

    def why_not(self, signals: list[str]) -> str:
        """Why this family cannot provide ``signals`` (not in :attr:`signals`), for error messages."""
        return "not implemented for this family"

    def check_request(self, request: SignalRequest, method: str) -> None:
        """Raise ``ValueError`` naming the model and method if ``request`` cannot be provided by this model."""
        raise NotImplementedError

    def install_vision(self, requests: list[SignalRequest], store: VisionCaptures, hooks: HookSet) -> None:
        """Install the hooks that fill ``store`` with the vision-side signals among ``requests``."""
        raise NotImplementedError

    @staticmethod
    def inject_scorer(hooks: HookSet, module: nn.Module, scorer, active=lambda: True) -> None:
        """Make ``module``'s attention function call ``scorer(module, query, key, value, kwargs)`` while
        ``active()``."""

        def pre_hook(mod, args, kwargs):
            if active():
                kwargs[SCORER_KWARG] = scorer
                return args, kwargs
            return None

        hooks.pre(module, pre_hook)

    @property
    def feature_encoder_layer(self) -> int:
        """Index of the vision encoder layer whose output the model takes as its image features."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision feature layer")

    def install_language(self, hooks: HookSet, current_rows, in_prefill) -> None:
        """Hooks a family needs inside the language model (Qwen3-VL's DeepStack). ``current_rows()`` gives the input
        row of each current slot (B, Lc), or ``None`` before any stage; ``in_prefill()`` whether a prefill runs."""

    def install_tower_stage(self, hooks: HookSet, tower) -> None:
        """Install a :class:`vlprune.tower.TowerStage`: its ``enter`` before every encoder layer, its ``observe`` in
        the attention of the layers before the feature layer, its ``expand`` on the projector's output. Install it
        before :meth:`install_vision`, so that captures of the projector's output see the expanded tensor."""
        raise NotImplementedError(f"{type(self).__name__} cannot prune inside its vision tower")

    def install_projector_stage(self, hooks: HookSet, stage) -> None:
        """Make the projector's input pass through ``stage`` ((n_img, N, Dv) -> same shape) first."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-projector stage support")

    @staticmethod
    def received_hook(record, chunk: int = 8):
        """A pre-hook on a CLIP or SigLIP attention module (which passes no extra arguments to its attention function)
        that recomputes its queries and keys from its input and calls ``record`` with, per encoded image, the
        attention each token receives: softmax over keys, mean over heads and over queries ``(n_img, T)``, ``chunk``
        images at a time (any attention implementation)."""

        def capture(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            parts = []
            with torch.no_grad():
                for x in hidden.split(chunk):
                    shape = (*x.shape[:-1], -1, module.head_dim)
                    query = module.q_proj(x).view(shape).transpose(1, 2)
                    key = module.k_proj(x).view(shape).transpose(1, 2)
                    parts.append(head_mean_attention(query, key, module.scale, None).mean(1))
            record(torch.cat(parts))

        return capture

    @staticmethod
    def vision_scorer(store: VisionCaptures, keys: list, drop_cls: bool, want_keys: bool = False):
        """A scorer for one vision attention module: stores the [CLS] row (head mean) under each of ``keys`` in
        ``store.cls_attention`` and, with ``want_keys``, the head-mean keys in ``store.vision_keys``."""

        def scorer(module, query, key, value, kwargs):
            if keys:
                scores = first_query_attention(query, key, kwargs.get("scaling")).detach()  # (n_img, T)
                scores = scores[:, 1:] if drop_cls else scores
                for k in keys:
                    store.cls_attention[k] = scores
            if want_keys:
                store.vision_keys = key.detach().mean(1)  # (n_img, T, d)

        return scorer
