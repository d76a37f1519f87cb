"""Temporal structure of video tokens, shared by the video methods: frame-to-frame similarity, static positions,
and the two published ways of cutting a video into segments.

Tokens of a video are ``features`` (T, N, D): ``T`` frames of ``N`` tokens each, the same spatial position at the
same index in every frame.
"""

from __future__ import annotations

import torch


def transition_similarity(features: torch.Tensor) -> torch.Tensor:
    """(T - 1, N) cosine similarity of each position between consecutive frames of ``features`` (T, N, D), one frame
    pair at a time in fp32 (memory: two frames)."""
    if features.dim() != 3:
        raise ValueError(f"features must be (frames, tokens, dim), got {tuple(features.shape)}")
    cosine = torch.nn.functional.cosine_similarity
    pairs = [cosine(features[t].float(), features[t + 1].float(), dim=-1) for t in range(features.shape[0] - 1)]
    return torch.stack(pairs) if pairs else features.new_zeros(0, features.shape[1], dtype=torch.float32)


def static_positions(similarity: torch.Tensor, start: int, end: int, threshold: float) -> torch.Tensor:
    """(N,) bool: positions whose similarity stays above ``threshold`` at every transition of frames ``start..end``
    (inclusive; a single frame makes every position static). ``similarity``: (T - 1, N) from
    :func:`transition_similarity`."""
    if end == start:
        return torch.ones(similarity.shape[1], dtype=torch.bool, device=similarity.device)
    return (similarity[start:end] > threshold).all(0)


def holitom_windows(
    features: torch.Tensor, threshold: float = 0.8, max_window: int = 1024, similarity: torch.Tensor | None = None
) -> tuple[list[tuple[int, int]], int]:
    """HoliTom's global temporal segmentation: the partition of the frames into windows ``[start, end]`` that
    maximises the tokens saved by replacing each window's static positions (similar to the next frame at every
    transition inside the window, :func:`static_positions`) with one token each, found by dynamic programming.

    A window of ``L`` frames with ``S`` static positions saves ``S * (L - 1)`` tokens. Returns the windows in order
    and the total saving. ``max_window`` bounds the window length (HoliTom's ``MAX_WINDOW_SIZE``); ``similarity``:
    :func:`transition_similarity` of ``features`` when the caller has it already.
    Reference: Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models" (NeurIPS 2025).
    """
    similarity = transition_similarity(features) if similarity is None else similarity
    frames = features.shape[0]
    best = [0] * (frames + 1)  # best[e]: best saving for frames 0 .. e-1
    start_of = [0] * (frames + 1)
    for end in range(1, frames + 1):
        best[end], start_of[end] = -1, end - 1
        static = torch.ones(similarity.shape[1], dtype=torch.bool, device=similarity.device)
        for start in range(end - 1, max(-1, end - 1 - max_window), -1):  # window = frames start .. end-1
            if start < end - 1:
                static &= similarity[start] > threshold
            saving = best[start] + int(static.sum()) * (end - 1 - start)
            if saving > best[end]:  # ties keep the shorter window (found first)
                best[end], start_of[end] = saving, start
    windows, end = [], frames
    while end > 0:
        windows.append((start_of[end], end - 1))
        end = start_of[end]
    return windows[::-1], best[frames]


def dyseg_cuts(frame_features: torch.Tensor, segments: int = 8, threshold: float = 0.9) -> list[int]:
    """FastVID's dynamic segmentation (DySeg): cut after frame ``t`` at the ``segments - 1`` transitions of lowest
    cosine similarity between consecutive frames' global features ``frame_features`` (T, D), and at every transition
    whose similarity is below ``threshold``. Returns the sorted first frames of segments 2, 3, ...

    Reference: Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (NeurIPS 2025).
    """
    if frame_features.dim() != 2:
        raise ValueError(f"frame_features must be (frames, dim), got {tuple(frame_features.shape)}")
    if segments < 1:
        raise ValueError(f"segments must be at least 1, got {segments}")
    f = torch.nn.functional.normalize(frame_features.float(), dim=-1)
    similarity = (f[1:] * f[:-1]).sum(-1)  # (T - 1,)
    lowest = torch.argsort(similarity, stable=True)[: segments - 1]
    cuts = set(lowest.tolist()) | set(torch.nonzero(similarity < threshold).flatten().tolist())
    return sorted(c + 1 for c in cuts)


def refine_runs(labels: list[int]) -> list[int]:
    """PruneVid's clean-up of per-frame cluster labels into contiguous segments: each label keeps its longest runs
    of consecutive frames (every run of that length) and loses the others; a label whose runs are all single frames
    loses them all. Scanning left to right, each lost run takes the label of the longer neighbouring run (the left
    one on ties, as already relabelled; label 0 with no neighbour at all). Returns the new labels.

    Reference: Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language Models" (ACL 2025
    Findings), ``refine_clusters`` in its release.
    """
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i - 1))
            start = i
    out = list(labels)
    for spans in runs.values():
        longest = max(end - start + 1 for start, end in spans)
        for start, end in spans:
            if longest == 1 or end - start + 1 < longest:
                out[start : end + 1] = [-1] * (end - start + 1)
    i = 0
    while i < len(out):
        if out[i] != -1:
            i += 1
            continue
        start = i
        while i < len(out) and out[i] == -1:
            i += 1
        end = i - 1
        left = right = None
        left_length = right_length = 0
        if start > 0:
            left, j = out[start - 1], start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_length = start - 1 - j
        if end < len(out) - 1:
            right, j = out[end + 1], end + 1
            while j < len(out) and out[j] == right:
                j += 1
            right_length = j - end - 1
        if right_length > left_length or left is None:
            label = right if right is not None else 0
        else:
            label = left
        out[start : end + 1] = [label] * (end - start + 1)
    return out


def label_segments(labels: list[int]) -> list[tuple[int, int]]:
    """The runs ``[start, end]`` of equal consecutive labels, in order."""
    segments, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            segments.append((start, i - 1))
            start = i
    return segments
