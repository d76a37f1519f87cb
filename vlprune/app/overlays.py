"""Pictures of what a method kept: an image with its kept tokens outlined (dropped ones dimmed, merged ones tinted by
the token they went into), a video's frames as a contact sheet."""

from __future__ import annotations

import torch

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _shade(image, grid: tuple[int, int], first: int, plan, rank: dict[int, int], size: int = 384):
    """``image`` scaled up (to about ``size`` px) with the ``h x w`` tokens of ``grid``, visual indices ``first``
    onwards of sample 0, marked by where each patch's value went (``plan.merged_into``): kept ones outlined, those
    merged with others tinted by the token they went into (``rank``: each kept token's place in the palette), so a
    merged token is drawn as the region it merged (VisionZip's contextual tokens), dropped ones dimmed."""
    from PIL import Image, ImageDraw

    h, w = grid
    scale = max(1, size // max(image.size))
    base = image.convert("RGB").resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    cell_w, cell_h = base.size[0] / w, base.size[1] / h
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    into, kinds = plan.merged_into[0], patch_kinds(plan)
    for local in range(h * w):
        token = first + local
        r, c = divmod(local, w)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        target = int(into[token])
        if kinds[token] == "kept":
            draw.rectangle(box, outline=(255, 255, 0, 255), width=2)
        elif target >= 0:  # merged into a kept token
            color = PALETTE[rank[target] % len(PALETTE)] if target in rank else (128, 128, 128)
            draw.rectangle(box, fill=(*color, 110))
        else:
            draw.rectangle(box, fill=(0, 0, 0, 150))
    return Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")


def patch_kinds(plan) -> list[str]:
    """Per visual token of sample 0, what ``plan`` did with it: ``"kept"`` (its value reaches the LLM alone: in its
    own place, or in another slot, as VisionZip's dominant tokens and a release's token order have it), ``"merged"``
    (averaged with others into one kept token, the group ``merged_into`` names) or ``"dropped"``."""
    into = plan.merged_into[0]
    sources = torch.bincount(into[into >= 0], minlength=into.numel())  # how many tokens went into each kept one
    # before the projector (VisionZip) an output's slot is not the patch it came from: only a lone source is kept
    kept = set(plan.keep_visual[0].tolist()) if plan.space != "vision" else set()
    return [
        "dropped" if t < 0 else "kept" if (token == t and token in kept) or sources[t] == 1 else "merged"
        for token, t in enumerate(into.tolist())
    ]


def _ranks(plan) -> dict[int, int]:
    return {token: i for i, token in enumerate(sorted(plan.keep_visual[0].tolist()))}


def overlay(image, plan, grid: tuple[int, int] | None = None):
    """The image with the dropped tokens' patches dimmed and, for merging methods, each kept token's group tinted
    in its own colour. ``None`` when the tokens do not form one square grid per image (anyres, Qwen-VL sizes)."""
    n = plan.num_visual[0]
    side = round(n**0.5)
    h, w = grid or (side, side)
    if h * w != n:
        return None
    return _shade(image, (h, w), 0, plan, _ranks(plan))


def video_overlay(frames, plan, columns: int = 8):
    """The video's token frames side by side (``columns`` per row), each with its kept tokens marked as in
    :func:`overlay`. ``frames``: the (T, H, W, 3) uint8 frames the model was given; a model that groups frames
    (Qwen-VL's temporal patches of two) shows the first frame of each group. ``None`` when sample 0 is not one
    whole video."""
    from PIL import Image

    grids = plan.grids[0] if plan.grids else []
    if len(grids) != 1 or grids[0] is None or grids[0][0] * grids[0][1] * grids[0][2] != plan.num_visual[0]:
        return None
    t, h, w = grids[0]
    rank = _ranks(plan)
    tiles = []
    for f in range(t):
        picture = Image.fromarray(frames[f * len(frames) // t]).convert("RGB")
        tiles.append(_shade(picture, (h, w), f * h * w, plan, rank, size=160))
    return contact_sheet(tiles, columns)


def contact_sheet(pictures: list, columns: int = 8, gap: int = 4):
    """Equal-sized PIL ``pictures`` in rows of ``columns``, ``gap`` white pixels apart."""
    from PIL import Image

    cols = min(columns, len(pictures))
    width, height = pictures[0].size
    rows = -(-len(pictures) // cols)
    sheet = Image.new("RGB", (cols * (width + gap) - gap, rows * (height + gap) - gap), (255, 255, 255))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % cols) * (width + gap), (i // cols) * (height + gap)))
    return sheet
