"""Decode-time cache stages (DyCoke's second stage): at each decoding step, which visual entries of the KV cache the
layers from ``stage.layer`` on attend to, chosen by the stage from the new token's attention at ``stage.layer - 1``.

The choice is applied as an attention mask on those layers (the same outputs as gathering the kept entries; the cache
itself stays whole). :class:`CacheRestriction` keeps what the choice needs across the steps of one generation.
"""

from __future__ import annotations

import torch


class CacheRestriction:
    """One generation's state for a cache stage (``selector.cache_stage()``).

    Attributes
    ----------
    stage
        The selector's cache stage: ``layer`` and ``choose(state, scores)``.
    plans : list
        Per decoding step, per sample: the input rows of the visual entries attended to, or ``None`` for all.
    """

    def __init__(self, stage) -> None:
        self.stage = stage
        self.plans: list[list[torch.Tensor | None]] = []
        self._state: list[dict] = []  # per sample, across steps
        self._visual_rows: list[torch.Tensor] | None = None
        self._prompt_length = 0

    @property
    def layer(self) -> int:
        return self.stage.layer

    @property
    def ready(self) -> bool:
        """Whether a prefill has told where the visual tokens are."""
        return self._visual_rows is not None

    def start(self, prompt_length: int) -> None:
        """A new prefill: forget the previous generation."""
        self.plans, self._state, self._visual_rows, self._prompt_length = [], [], None, prompt_length

    def remember(self, layouts) -> None:
        """After the prefill: each sample's visual tokens (input rows)."""
        self._visual_rows = [layout.positions for layout in layouts]

    def keep(self, scores: torch.Tensor, rows: torch.Tensor | None, total: int) -> torch.Tensor:
        """(B, total) bool: the cache entries the restricted layers attend to at this step, from ``scores`` (B, total),
        the new token's head-mean attention at ``layer - 1``; ``rows`` (B, L') the input rows of the prompt's cache
        slots (``None``: the prompt is whole). Every non-visual entry stays. Records the step in :attr:`plans`."""
        b_count = scores.shape[0]
        if rows is None:
            rows = torch.arange(self._prompt_length).expand(b_count, -1)
        rows = rows.cpu()
        keep = torch.ones(b_count, total, dtype=torch.bool)
        while len(self._state) < b_count:
            self._state.append({})
        step = []
        for b in range(b_count):
            visual = torch.nonzero(torch.isin(rows[b], self._visual_rows[b])).flatten()  # cache slots
            chosen = None
            if visual.numel():
                chosen = self.stage.choose(self._state[b], scores[b, visual.to(scores.device)])
            if chosen is None:
                step.append(None)
                continue
            dropped = torch.ones(visual.numel(), dtype=torch.bool)
            dropped[chosen.cpu()] = False
            keep[b, visual[dropped]] = False
            step.append(rows[b, visual[~dropped]])
        self.plans.append(step)
        return keep
