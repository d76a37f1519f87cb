"""What a stage decided: :class:`KeepPlan`, one per stage and forward, as exposed by ``Pruned.plans``."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeepPlan:
    """The tokens one stage kept, per sample of the batch.

    Attributes
    ----------
    layer : int
        First decoder layer that sees only the kept tokens (0 = before the LLM).
    method : str
        Selector name.
    keep_visual : list of LongTensor
        Per sample, ascending indices into that sample's visual tokens (all its images concatenated, in prompt
        order) of the visual tokens kept after this stage.
    keep_tokens : list of LongTensor
        Per sample, ascending indices into the input sequence as passed (padding included) of the tokens that reach
        the layers after this stage.
    image_of : list of LongTensor
        Per sample, for each entry of ``keep_visual``, the index (within the sample) of the image it came from.
    num_visual : list of int
        Per sample, the number of visual tokens before any pruning.
    """

    layer: int
    method: str
    keep_visual: list[torch.Tensor]
    keep_tokens: list[torch.Tensor]
    image_of: list[torch.Tensor]
    num_visual: list[int]

    @property
    def kept_per_sample(self) -> list[int]:
        """Number of visual tokens kept in each sample."""
        return [int(k.numel()) for k in self.keep_visual]

    def __repr__(self) -> str:
        kept = ", ".join(f"{k}/{n}" for k, n in zip(self.kept_per_sample, self.num_visual, strict=True))
        return f"KeepPlan(method={self.method!r}, layer={self.layer}, visual kept per sample=[{kept}])"
