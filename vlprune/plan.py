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
    merged_into : list of LongTensor
        Per sample, for each of its ``num_visual`` visual tokens, the visual index (an entry of ``keep_visual``)
        of the kept token whose value it went into: itself when kept as is, another kept token when merged (or, with
        weight 1, when an ``ordered`` selection moved it into that token's slot), ``-1`` when discarded (or removed by
        an earlier stage).
    merge_weight : list of Tensor
        Per sample, the weight of each visual token in the token it went into (``1`` when kept as is, ``0`` when
        discarded).
    visual_rows : list of LongTensor
        Per sample, the input-sequence index of each of its ``num_visual`` visual tokens. Image placeholders that
        are always kept and are not candidates (LLaVA-NeXT's row-end newlines) are not visual tokens.
    space : str
        Where the values were combined: ``"llm"`` (decoder hidden states before ``layer``) or ``"vision"`` (the
        projector's input; VisionZip's [CLS] token, not a placeholder, is then a further unlisted source).
    merge_pairs : list, optional
        Set when some token went into several kept tokens (``merged_into`` then names the one it weighs most in):
        per sample, ``None`` or ``(source, target, weight)``, visual indices and weights of every contribution of the
        stages' pair-form merges (:class:`vlprune.selectors.base.Selection` with ``source``).
    grids : list of list, optional
        Per sample, per image (in prompt order), its token grid ``(frames, h, w)``: ``frames`` is 1 for an image,
        the frame count (temporal patches on Qwen-VL) for a video; ``None`` for an image whose tokens form no single
        grid (tiled images). Visual indices run frame by frame, row by row within a frame.
    """

    layer: int
    method: str
    keep_visual: list[torch.Tensor]
    keep_tokens: list[torch.Tensor]
    image_of: list[torch.Tensor]
    num_visual: list[int]
    merged_into: list[torch.Tensor]
    merge_weight: list[torch.Tensor]
    space: str = "llm"
    visual_rows: list[torch.Tensor] | None = None
    grids: list[list[tuple[int, int, int] | None]] | None = None
    merge_pairs: list | None = None

    @property
    def kept_per_sample(self) -> list[int]:
        """Number of visual tokens kept in each sample."""
        return [int(k.numel()) for k in self.keep_visual]

    @property
    def merges(self) -> bool:
        """Whether any kept token carries more than its own value."""
        return any(
            bool(((into >= 0) & (into != torch.arange(into.numel()))).any()) or bool((w[into >= 0] != 1).any())
            for into, w in zip(self.merged_into, self.merge_weight, strict=True)
        )

    def __repr__(self) -> str:
        kept = ", ".join(f"{k}/{n}" for k, n in zip(self.kept_per_sample, self.num_visual, strict=True))
        return f"KeepPlan(method={self.method!r}, layer={self.layer}, visual kept per sample=[{kept}])"
