"""Compaction inside the vision tower, for selectors that prune progressively there (:class:`TowerSelector`).

How a vision forward runs under a tower stage (the adapter installs the hooks, see ``install_tower_stage``):

1. The pre-hook of encoder layer 0 sees the images' tokens ``(n_img, 1 + N, D)`` ([CLS] first) and starts a fresh
   state; the budget is the stage's ``keep`` of the ``N`` patches.
2. The attention of each encoder layer before the feature layer streams its query, key and value to the selector.
3. The pre-hook of encoder layer ``l + 1``, for ``l`` a pruning layer, gathers each image's [CLS] and kept patches
   (raster order), right-padded to the longest image, and gives every later layer an additive key mask while the
   images' counts differ. After the last pruning layer every image has exactly the budget: no padding.
4. A post-hook on the projector spreads its ``(n_img, keep, D)`` output back over ``N`` rows (zeros at the dropped
   patches) so the model's own scatter into the placeholders sees the count it expects, and records each image's
   kept patches as ``store.decided``; decoder layer 0 then removes the dropped placeholders.

Nothing is changed on the modules: removing the hooks undoes everything.
"""

from __future__ import annotations

import torch

from .selectors.base import Selection


class TowerStage:
    """Per-forward state of a tower stage. ``feature_layer``: the encoder layer whose output the model takes as its
    image features; ``store``: the wrap's :class:`~vlprune.captures.VisionCaptures` (``decided`` is written there)."""

    def __init__(self, stage, feature_layer: int, store) -> None:
        self.selector = stage.selector
        self.stage = stage.stage
        self.feature_layer = feature_layer
        self.prune_after = set(self.selector.prune_after(feature_layer))
        self.store = store
        self.kept: list[torch.Tensor] | None = None  # per image: raster indices of its current patches
        self.valid: torch.Tensor | None = None  # (n_img, T) real tokens, while counts differ
        self.mask: torch.Tensor | None = None  # the same as an additive (n_img, 1, 1, T) key mask
        self.state: dict = {}
        self.target = 0
        self.patches = 0

    @property
    def counts(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]

    @property
    def pruning(self) -> bool:
        return self.kept is not None and max(self.counts, default=0) > self.target

    def enter(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input of encoder layer ``layer`` -> ``(hidden, additive key mask or None)`` for that layer."""
        if layer == 0:
            self.patches = hidden.shape[1] - 1
            self.kept = [torch.arange(self.patches)] * hidden.shape[0]
            self.target = min(self.stage.budget(self.patches), self.patches)
            self.valid, self.mask, self.state = None, None, {}
        elif layer - 1 in self.prune_after and self.pruning:
            counts = self.counts
            keep = self.selector.prune(self.state, layer - 1, self.feature_layer, counts, self.target)
            hidden = self._gather(hidden, keep)
            self.kept = [k[c] for k, c in zip(self.kept, keep, strict=True)]
        return hidden, self.mask

    def _gather(self, hidden: torch.Tensor, keep: list[torch.Tensor]) -> torch.Tensor:
        counts = [int(k.numel()) for k in keep]
        for i, (k, n) in enumerate(zip(keep, self.counts, strict=True)):
            if k.numel() < min(self.target, n) or (k.numel() and (int(k.max()) >= n or bool((k[1:] <= k[:-1]).any()))):
                raise RuntimeError(f"selector {self.selector.name!r} returned an invalid keep list for image {i}")
        length = 1 + max(counts)
        out = hidden.new_zeros(hidden.shape[0], length, hidden.shape[2])
        out[:, 0] = hidden[:, 0]
        for i, k in enumerate(keep):
            out[i, 1 : 1 + k.numel()] = hidden[i, 1 + k.to(hidden.device)]
        self.valid = self.mask = None
        if len(set(counts)) > 1:
            lengths = 1 + torch.tensor(counts, device=hidden.device)
            self.valid = torch.arange(length, device=hidden.device)[None, :] < lengths[:, None]
            mask = torch.zeros(self.valid.shape, dtype=hidden.dtype, device=hidden.device)
            self.mask = mask.masked_fill(~self.valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        return out

    def observe(self, layer: int, query, key, value, scaling) -> None:
        """Attention of encoder layer ``layer``."""
        if layer < self.feature_layer and self.pruning:
            valid = None if self.valid is None else self.valid.to(key.device)
            self.selector.observe(self.state, query.detach(), key.detach(), value.detach(), valid, scaling)

    def expand(self, features: torch.Tensor) -> torch.Tensor:
        """Projector output ``(n_img, k, D)`` -> ``(n_img, N, D)`` with each image's kept patches at their rows."""
        if self.kept is None:
            return features
        kept, self.kept, self.state = self.kept, None, {}
        self.store.decided = [Selection.pruned(k) for k in kept]
        if features.shape[1] == self.patches:
            return features
        if features.shape[1] != self.target:
            raise RuntimeError(f"the projector returned {features.shape[1]} tokens per image, expected {self.target}")
        out = features.new_zeros(features.shape[0], self.patches, features.shape[2])
        for i, k in enumerate(kept):
            out[i, k.to(features.device)] = features[i]
        return out
