"""Where each sample's visual tokens sit in the input (:class:`SampleLayout`, built by the adapter once per prefill)
and what the core derives from it: each image's token grid and, across a prefill's stages, the frames each token's
merged value spans."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .plan import KeepPlan


@dataclass
class SampleLayout:
    """Where one sample's visual tokens are: ``positions`` (n,) in the input sequence, the ``image_of`` each (n,)
    (ordinal within the sample), its ``local`` index within that image (n,), and per image of the sample its global
    index in the batch's feature tensors (``images``) and token grid (``grids``). ``fixed``: positions of image
    placeholders that are always kept and are not candidates (LLaVA-NeXT's row-end newlines); they count neither as
    visual tokens nor as text. For tiled images, ``tile_of`` (n,) gives each visual token's tile within its image and
    ``tile_grids`` per image the token grid of each tile (budgets ``per="tile"``). ``frames`` per image: its frame
    count (videos; ``None``: every image has one frame, and then ``grids`` are whole images). ``video_of`` per image:
    its ordinal among the sample's videos, ``None`` for an image (``None``: a sample holds images or videos, not both,
    and the ordinals are the images')."""

    positions: torch.Tensor
    image_of: torch.Tensor
    local: torch.Tensor
    images: list[int]
    grids: list[tuple[int, int] | None]
    fixed: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    tile_of: torch.Tensor | None = None
    tile_grids: list[list[tuple[int, int] | None]] | None = None
    frames: list[int] | None = None
    video_of: list[int | None] | None = None

    def units(self, j: int, per: str) -> list[tuple[torch.Tensor | None, tuple[int, int] | None]]:
        """The budget units of image ``j``: ``(tile mask over the sample's visual tokens or None, grid)`` each."""
        if per == "tile" and self.tile_of is not None:
            return [(self.tile_of == t, grid) for t, grid in enumerate(self.tile_grids[j])]
        return [(None, self.grids[j])]


def token_grids(layout: SampleLayout) -> list[tuple[int, int, int] | None]:
    """Per image of ``layout``, ``(frames, h, w)`` of its tokens, or ``None`` when they form no single grid."""
    frames = layout.frames or [1] * len(layout.grids)
    return [None if grid is None else (t, *grid) for grid, t in zip(layout.grids, frames, strict=True)]


def frame_spans(plans: list[KeepPlan], layouts: list[SampleLayout]) -> list[torch.Tensor]:
    """Per sample, for each visual token (ordinal), the first and last frame ``(nvis, 2)`` of the tokens whose values
    reached it through the merges of ``plans`` (the earlier stages of this prefill, in order): its own frame twice
    when nothing was merged into it (frame 0 for an image). Rows of discarded tokens are meaningless."""
    out = []
    for b, layout in enumerate(layouts):
        frame = torch.zeros(layout.positions.numel(), dtype=torch.long)
        for j, grid in enumerate(layout.grids):
            if layout.frames and layout.frames[j] > 1 and grid is not None:
                mine = layout.image_of == j
                frame[mine] = layout.local[mine] // (grid[0] * grid[1])
        span = torch.stack([frame, frame], dim=1)
        for plan in plans:
            into = plan.merged_into[b]
            source = torch.nonzero(into >= 0).flatten()
            target = into[source]
            if plan.merge_pairs is not None and plan.merge_pairs[b] is not None:
                source, target = plan.merge_pairs[b][0], plan.merge_pairs[b][1]
            new = span.clone()
            new[:, 0].scatter_reduce_(0, target, span[source, 0], "amin")
            new[:, 1].scatter_reduce_(0, target, span[source, 1], "amax")
            span = new
        out.append(span)
    return out
