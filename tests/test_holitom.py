"""HoliTom's outer-LLM stage against a hand-written transcription of the method on a planted video (brute-force
windows instead of the dynamic programme, loop DPC-KNN), its budget rounding, the ``received_attention`` signal
against an eager recomputation on LLaVA-OneVision, and its errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_families import DYCOKE_SHAPES, check_method, run, shapes_of, video_shapes

import vlprune
from vlprune.selectors.holitom import HoliTom
from vlprune.selectors.shared import largest_remainder
from vlprune.signals import TokenView

from families import FAMILIES, VIDEO_FAMILIES
from reference import seen_views
from test_methods import TINY_PARAMS

T, N, D = 6, 9, 16  # frames, tokens per frame (3 x 3), width


def planted_video(seed: int = 0) -> torch.Tensor:
    """Frames 0-2 share positions 0-5 (static), frames 3-5 share positions 0-3; everything else is new each frame."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, D, generator=g)
    x[1:3, :6] = x[0, :6] + 0.01 * torch.randn(2, 6, D, generator=g)
    x[4:6, :4] = x[3, :4] + 0.01 * torch.randn(2, 4, D, generator=g)
    return x


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def static_set(x, start, end, tau):
    return [p for p in range(N) if all(cosine(x[f, p], x[f + 1, p]) > tau for f in range(start, end))]


def best_windows(x, tau):
    """Every partition of the frames into windows, the one saving the most tokens."""
    best = None
    for cuts in itertools.product((False, True), repeat=T - 1):
        starts = [0] + [i + 1 for i, cut in enumerate(cuts) if cut]
        windows = [(s, e - 1) for s, e in zip(starts, starts[1:] + [T], strict=True)]
        saving = sum(len(static_set(x, s, e, tau)) * (e - s) for s, e in windows)
        if best is None or saving > best[1]:
            best = (windows, saving)
    return best


def dpc_centres(x, clusters, k):
    """DPC-KNN by its definition, one row at a time: the ``clusters`` rows of largest (distance to the nearest
    denser row) x (density), ascending."""
    m, width = x.shape
    dist = [[float((x[i] - x[j]).norm()) / width**0.5 for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if density[j] > density[i]], default=top) for i in range(m)]
    score = [delta[i] * density[i] for i in range(m)]
    return sorted(sorted(range(m), key=lambda i: (-score[i], i))[:clusters]), dist


def merged(x, clusters, k, beta):
    """``(row of each centre, its merged value)``: every other row joins its nearest centre."""
    centres, dist = dpc_centres(x, clusters, k=min(k, clusters))
    members = {c: [] for c in centres}
    for i in range(x.shape[0]):
        if i not in centres:
            members[min(centres, key=lambda c: dist[i][c])].append(i)
    out = []
    for c in centres:
        value = x[c] if not members[c] else beta * x[c] + (1 - beta) * x[members[c]].mean(0)
        out.append((c, value))
    return out


def reference(x, attention, keep, tau=0.8, beta=0.6, k=7, context=0.0, ratio=None):
    """The release's outer-LLM stage: ``{slot: value}`` of the tokens it hands to the LLM, in the order it hands them
    (its ``one_token`` mode: per window, the static centres, then per frame the dominant tokens and the contextual
    ones, each set in position order; its retain ratio from the unrounded ``ratio`` when given, else from ``keep``)."""
    windows, saving = best_windows(x, tau)
    ratio = min((keep if ratio is None else ratio * T * N) / (T * N - saving), 1.0)
    out = {}
    for start, end in windows:
        static = static_set(x, start, end, tau) if end > start else []
        moving = [p for p in range(N) if p not in static]
        if static:
            mean = x[start : end + 1, static].mean(0)
            for c, value in merged(mean, round(len(static) * ratio), k, beta):
                out[start * N + static[c]] = value
        for f in range(start, end + 1):
            count = math.ceil(len(moving) * ratio)
            dominant = round(count * (1 - context))
            order = sorted(moving, key=lambda p: (-float(attention[f, p]), p))
            for p in sorted(order[:dominant]):  # in position order: the release's masked_select
                out[f * N + p] = x[f, p]
            rest = order[dominant:]
            if count - dominant:
                for c, value in merged(x[f, sorted(rest)], count - dominant, k, beta):
                    out[f * N + sorted(rest)[c]] = value
    return out


def view_of(x, attention):
    return TokenView(
        index=torch.arange(T * N),
        grid=(3, 3),
        image=0,
        frames=T,
        features=x.reshape(T * N, D),
        received_attention={None: attention.reshape(-1)},
    )


@pytest.mark.parametrize("context", [0.0, 0.5], ids=["release", "context0.5"])
@pytest.mark.parametrize("keep", [17, 8])
def test_holitom_matches_the_hand_reference(keep, context):
    x = planted_video()
    attention = torch.rand(T, N, generator=torch.Generator().manual_seed(1))
    assert best_windows(x, 0.8) == ([(0, 2), (3, 5)], 6 * 2 + 4 * 2)  # the planted structure is what is found
    selector = HoliTom(exact=False, context=context)
    selection = selector.select(view_of(x, attention), keep)
    expected = reference(x, attention, keep, context=context)
    got = dict(zip(selection.keep.tolist(), selection.apply(x.reshape(T * N, D)), strict=True))
    assert sorted(got) == sorted(expected)
    for slot, value in expected.items():
        torch.testing.assert_close(got[slot], value, rtol=1e-5, atol=1e-6)
    assert selector.count(view_of(x, attention), keep) == len(expected)


@pytest.mark.parametrize("context", [0.0, 0.5], ids=["release", "context0.5"])
def test_release_order_is_the_releases_sequence(context):
    """``order="release"``: the outputs come in the release's sequence (windows' static centres before their frames'
    dynamic tokens), which the core then feeds in that order; ``order="position"`` leaves the order to the core."""
    x = planted_video().flip(1)  # static positions last in each frame, so that the two orders differ
    attention = torch.rand(T, N, generator=torch.Generator().manual_seed(1))
    expected = reference(x, attention, 17, context=context)
    selection = HoliTom(exact=False, context=context, order="release").select(view_of(x, attention), 17)
    assert selection.ordered and selection.keep.tolist() == list(expected)
    assert selection.keep.tolist() != sorted(expected)
    for value, slot in zip(selection.apply(x.reshape(T * N, D)), expected, strict=True):
        torch.testing.assert_close(value, expected[slot], rtol=1e-5, atol=1e-6)
    assert not HoliTom(exact=False, context=context).select(view_of(x, attention), 17).ordered
    with pytest.raises(ValueError, match=r"holitom order must be one of \('position', 'release'\), got 'sorted'"):
        HoliTom(order="sorted")


def test_a_ratio_budget_reaches_the_release_arithmetic_unrounded():
    """ratio=0.123 of 54 tokens: the budget rounds to 7, but the release computes its retain ratio from 0.123 itself,
    which keeps one dynamic token fewer per frame of the second window here."""
    x = planted_video()
    attention = torch.rand(T, N, generator=torch.Generator().manual_seed(1))
    view = view_of(x, attention)
    view.ratio = 0.123
    keep = vlprune.Stage("holitom", ratio=0.123).budget(T * N)
    expected = reference(x, attention, keep, ratio=0.123)
    assert keep == 7 and len(expected) != len(reference(x, attention, keep))  # the two arithmetics differ here
    selection = HoliTom(exact=False).select(view, keep)
    assert sorted(selection.keep.tolist()) == sorted(expected)
    assert HoliTom(exact=False).count(view, keep) == len(expected)


def test_exact_budget_by_largest_remainder():
    """keep = 17 of the 34 tokens left after the static savings: r' = 1/2; quotas 3, then 1.5 for each of the first
    window's frames (3 moving positions), 2, then 2.5 for each of the second's (5 moving positions)."""
    x, attention = planted_video(), torch.rand(T, N)
    view = view_of(x, attention)
    selection = HoliTom().select(view, 17)
    frame = selection.keep // N
    static = (selection.into.reshape(T, N) >= 0) & (torch.arange(N) < torch.tensor([6, 6, 6, 4, 4, 4])[:, None])
    assert selection.keep.numel() == HoliTom().count(view, 17) == 17
    # per frame: the static centres (3 in frame 0, 2 in frame 3) plus 2 moving tokens each
    assert torch.bincount(frame, minlength=T).tolist() == [3 + 2, 2, 2, 2 + 2, 2, 2]
    assert static.sum() == 3 * 6 + 3 * 4  # every static source goes into a centre
    quotas, sizes = [3, 1.5, 1.5, 1.5, 2, 2.5, 2.5, 2.5], [6, 3, 3, 3, 4, 5, 5, 5]
    assert largest_remainder(quotas, sizes, 17) == [3, 2, 2, 2, 2, 2, 2, 2]
    assert largest_remainder([0.4, 0.4, 0.2], [1, 1, 1], 2) == [1, 1, 0]
    assert largest_remainder([2.0, 1.0], [2, 1], 9) == [2, 1]  # capped at what the groups hold
    # above T N - S, the tokens left after merging every static position; the whole budget: untouched
    assert HoliTom().count(view, 40) == 34
    assert torch.equal(HoliTom().select(view, T * N), torch.arange(T * N))


def test_inner_stage_matches_the_release_loop():
    """The inner-LLM stage against the release's loop: keep the top tokens by the last prompt token's attention,
    then average every other token, in index order, into its most similar kept token, one at a time."""
    g = torch.Generator().manual_seed(5)
    n, keep = 12, 4
    hidden, scores = torch.randn(n, D, generator=g), torch.rand(n, generator=g)
    view = TokenView(index=torch.arange(n), grid=(2, 3), image=0, frames=2, hidden=hidden, llm_attention={3: scores})
    selection = HoliTom().select(view, keep)
    kept = scores.topk(keep).indices
    others = [i for i in range(n) if i not in kept.tolist()]
    unit = torch.nn.functional.normalize(hidden, dim=-1)
    nearest = kept[(unit[others] @ unit[kept].T).argmax(-1)]
    h = hidden.clone()
    for i, t in zip(others, nearest.tolist(), strict=True):
        h[t] = (h[t] + h[i]) / 2
    assert sorted(selection.keep.tolist()) == sorted(kept.tolist())
    out = dict(zip(selection.keep.tolist(), selection.apply(hidden), strict=True))
    for t in kept.tolist():
        torch.testing.assert_close(out[t], h[t], rtol=1e-5, atol=1e-6)
    assert HoliTom().requests(18, 24)[0] == vlprune.signals.SignalRequest("llm_attention", 17)


def test_received_attention_is_the_feature_layers_mean_received_attention_pooled_like_the_features():
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(layers=2)
    inputs = family.inputs(model, video_shapes(family, DYCOKE_SHAPES)[:1], seed=3)
    with seen_views(HoliTom, "received_attention") as seen, vlprune.wrap(model, "holitom", keep=6):
        run(model, inputs)
    pixels = inputs["pixel_values_videos"]
    frames = pixels.flatten(0, 1)
    tower = model.model.vision_tower
    with torch.no_grad():
        eager = tower.config._attn_implementation
        tower.config._attn_implementation = "eager"
        try:
            out = tower(frames, output_attentions=True)
        finally:
            tower.config._attn_implementation = eager
    received = out.attentions[-1].mean(1).mean(1)  # (frames, T): heads, then queries
    if model.config.vision_feature_select_strategy == "default":
        received = received[:, 1:]
    expected = model.model.apply_pooling(received[..., None]).reshape(pixels.shape[0], -1)
    assert seen  # one view per prefill (forward, then generate)
    for got in seen:
        torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module", params=list(VIDEO_FAMILIES))
def video_case(request):
    family = VIDEO_FAMILIES[request.param]
    model = family.build(layers=4)
    run(model, family.inputs(model, video_shapes(family)[:1]))  # a first call sets lazy attributes the checks compare
    return family, model


@pytest.mark.parametrize(
    ("budget", "params"),
    [({"keep": 3}, {}), ({"keep": 3}, {"threshold": -1.0}), ({"ratio": 0.5}, {})],
    ids=["keep3", "all-static", "ratio0.5"],
)
def test_holitom_under_the_core_invariants(video_case, budget, params, monkeypatch):
    """On LLaVA-OneVision and Qwen2/2.5-VL videos (these with FastVID's Qwen saliency for the received attention):
    reference equality, generate() against a manual greedy loop, batch equal to single (``threshold=-1`` makes every
    position static, so the merges run through the model; a budget of 3 stays under what is left). Families without
    the signal: a clear refusal."""
    family, model = video_case
    monkeypatch.setitem(TINY_PARAMS, "holitom", params)
    check_method(family, model, "holitom", budget, video_shapes(family, DYCOKE_SHAPES))


def test_inner_stage_under_the_core_invariants(video_case):
    """The inner-LLM stage alone at decoder layer 2 keeps half of each video's tokens and merges the rest into them:
    reference equality, generate() against a manual greedy loop, batch equal to single, on both families (it reads
    decoder signals only)."""
    family, model = video_case

    def count(size) -> int:
        frames, n = family.frames(size)
        return math.floor(0.5 * frames * n + 0.5)

    check_method(family, model, "holitom", {"ratio": 0.5, "layer": 2}, video_shapes(family, DYCOKE_SHAPES), count)


def test_holitom_refusals(video_case):
    family, model = video_case
    if "received_attention" not in vlprune.registry.adapter_class(family.name).signals:
        with pytest.raises(ValueError, match=f"'holitom' needs \\['received_attention'\\].*{family.name}"):
            vlprune.wrap(model, "holitom", keep=3)
        return
    images = FAMILIES[family.name].inputs(model, shapes_of(family.name)[:1])
    refusal = "video frames only" if family.name == "llava_onevision" else "needs a video of at least two frames"
    with vlprune.wrap(model, "holitom", keep=3), pytest.raises(ValueError, match=refusal):
        model(**images)
    for bad, match in (({"beta": 2}, "beta must be a number in"), ({"k": 0}, "k must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            vlprune.wrap(model, "holitom", keep=3, **bad)
    with pytest.raises(ValueError, match="holitom.*llava cannot provide"):
        vlprune.wrap(FAMILIES["llava"].build(layers=2), "holitom", keep=8)
