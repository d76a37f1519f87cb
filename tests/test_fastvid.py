"""FastVID against a hand-written transcription of the release's pruning on planted videos (DySeg, salient tokens,
density scores and both DTM cases written loop by loop), its core invariants on LLaVA-OneVision videos, and its
errors."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from test_families import DYCOKE_SHAPES, check_method, run

import vlprune
from vlprune.selectors.fastvid import FastVID, anchor_counts, qwen_counts
from vlprune.signals import TokenView

from families import VIDEO_FAMILIES
from reference import seen_views
from test_methods import TINY_PARAMS

T, N, D = 8, 9, 16  # frames, tokens per frame (3 x 3), width


def planted_video(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two scenes of four frames (frames of a scene are near copies of its first), and random attention."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, N, D, generator=g)
    x[1:4] = x[0] + 0.3 * torch.randn(3, N, D, generator=g)
    x[5:8] = x[4] + 0.3 * torch.randn(3, N, D, generator=g)
    return x, torch.rand(T, N, generator=g)


def cosine(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def scores(rows: torch.Tensor, k: int) -> list[float]:
    """DPC-KNN's delta x density of each row, from the definitions."""
    m, width = rows.shape
    dist = [[float((rows[i] - rows[j]).norm()) / width**0.5 for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if density[j] > density[i]], default=top) for i in range(m)]
    return [delta[i] * density[i] for i in range(m)]


def dyseg_by_hand(x, segments: int, tau: float) -> tuple[list[float], list[int]]:
    """Consecutive frames' similarities (frame means) and DySeg's segment sizes: cuts at the ``segments - 1`` lowest
    and wherever below ``tau``."""
    frames = x.shape[0]
    g = x.mean(1)
    sim = [cosine(g[t], g[t + 1]) for t in range(frames - 1)]
    lowest = sorted(range(frames - 1), key=lambda t: (sim[t], t))[: segments - 1]
    cuts = sorted(set(lowest) | {t for t in range(frames - 1) if sim[t] < tau})
    bounds = [-1, *cuts, frames - 1]
    return sim, [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def reference(x, attention, keep, segments=8, tau=0.9, d=0.4, p=4, beta=0.6, k=4) -> dict[int, torch.Tensor]:
    """The release's pruning of one video: ``{slot: value}`` of the tokens it hands to the LLM."""
    frames, n = attention.shape
    sim, sizes = dyseg_by_hand(x, segments, tau)
    retain = int(n * (keep / (frames * n)))
    salient = retain - int(retain * d)
    context = retain - salient
    count = []
    for length in sizes:
        share = context * length // math.ceil(length / p)
        count += [min(share, n - salient) if (length - 1 - j) % p == 0 else 0 for j in range(length)]
    out, others, score = {}, [], []
    for f in range(frames):
        chosen = sorted(range(n), key=lambda i: (-float(attention[f, i]), i))[:salient]
        for i in chosen:
            out[f * n + i] = x[f, i]
        rest = [i for i in range(n) if i not in chosen]
        others.append(rest)
        score.append(scores(x[f, rest], k))
    first = 0
    for length in sizes:
        segment = list(range(first, first + length))
        for f in segment:
            if not count[f]:
                continue
            order = sorted(range(len(others[f])), key=lambda j: (-score[f][j], j))[: count[f]]
            targets = [(f, others[f][j]) for j in order]
            joined = [(h, i) for h in (segment if length > 1 else [f]) for i in others[h]]
            merge_into(x, targets, joined, beta, out)
        first += length
    return out


def merge_into(x, targets, joined, beta, out) -> None:
    """DTM by hand: each ``(frame, token)`` of ``joined`` to its most cosine-similar target; ``out[slot]`` of each
    target ``w target + (1 - w) mean(its tokens)``, ``w = max(1 / (m + 1), beta)``."""
    n = x.shape[1]
    assigned = {t: [] for t in targets}
    for h, i in joined:
        best = max(range(len(targets)), key=lambda j: (cosine(x[h, i], x[targets[j]]), -j))
        assigned[targets[best]].append(x[h, i])
    for t in targets:
        members = assigned[t]
        w = max(1 / (len(members) + 1), beta)
        mean = torch.stack(members).mean(0) if members else torch.zeros(x.shape[-1])
        out[t[0] * n + t[1]] = w * x[t] + (1 - w) * mean


def qwen_reference(x, attention, keep, segments=8, tau=0.9, d=0.4, p=4, beta=0.6, k=4, ignore=0.95):
    """The Qwen2.5-VL release's pruning of one video, loop by loop: ``{slot: value}``."""
    frames, n = attention.shape
    sim, sizes = dyseg_by_hand(x, segments, tau)
    retain = int(n * (keep / (frames * n)))
    sal, ctx, start = [], [], 0
    for length in sizes:
        seg_retain = retain * length
        seg_ctx = max(int(seg_retain * d), 1)
        seg_sal = seg_retain - seg_ctx
        if length == 1:
            sal.append(seg_sal)
            ctx.append(seg_ctx)
        else:
            inner = [i for i in range(length - 1) if sim[start + i] < ignore]
            edges = [-1, *inner, length - 1]
            runs = [b - a for a, b in zip(edges, edges[1:], strict=False)]
            v = len(runs)
            frm_sal = [seg_sal // v + (1 if i < seg_sal % v else 0) for i in range(v)]
            temp = (v + p - 1) // p
            temp_ctx = [seg_ctx // temp + (1 if i < seg_ctx % temp else 0) for i in range(temp)]
            frm_ctx, idx = [], 0
            for i in range(v):
                if i % p == 0:
                    frm_ctx.append(min(temp_ctx[idx], n // 2))
                    idx += 1
                else:
                    frm_ctx.append(0)
            frm_ctx.reverse()
            for i in range(v):
                sal += [0] * (runs[i] - 1)
                ctx += [0] * (runs[i] - 1)
                if frm_ctx[i] == 0:
                    sal.append(min(frm_sal[i], n))
                    ctx.append(0)
                else:
                    ctx.append(min(frm_ctx[i], n // 2))
                    sal.append(min(frm_sal[i], n - ctx[-1]))
        start += length
    out, chosen = {}, []
    for f in range(frames):
        chosen.append(sorted(range(n), key=lambda i: (-float(attention[f, i]), i))[: sal[f]])
        for i in chosen[f]:
            out[f * n + i] = x[f, i]
    first = 0
    for length in sizes:
        segment = list(range(first, first + length))
        salient = {(h, i) for h in segment for i in chosen[h]}
        for f in segment:
            if not ctx[f]:
                continue
            rest = [i for i in range(n) if i not in chosen[f]]
            score = scores(x[f, rest], k)
            targets = [(f, rest[j]) for j in sorted(range(len(rest)), key=lambda j: (-score[j], j))[: ctx[f]]]
            merged = [(h, i) for h in segment for i in range(n) if (h, i) not in salient and (h, i) not in targets]
            merge_into(x, targets, merged, beta, out)
        first += length
    return out


def view_of(x, attention) -> TokenView:
    view = TokenView(index=torch.arange(T * N), grid=(3, 3), image=0, frames=T)
    view.features, view.received_attention = x.reshape(T * N, D), {None: attention.reshape(T * N)}
    return view


@pytest.mark.parametrize(
    "keep,params",
    [
        (36, {"segments": 2, "threshold": 0.0, "period": 2}),  # two scenes, two anchors each: pair-form merges
        (36, {"segments": 2, "threshold": 0.0}),  # one anchor per scene
        (54, {}),  # eight single-frame segments (c = 8 cuts every transition)
        (20, {"segments": 1, "threshold": -1.0, "context": 0.6, "beta": 0.3}),
    ],
)
def test_fastvid_equals_the_transcription(keep, params):
    x, attention = planted_video()
    view = view_of(x, attention)
    selection = FastVID(**params).select(view, keep)
    names = {"segments": "segments", "threshold": "tau", "context": "d", "period": "p", "beta": "beta"}
    expected = reference(x, attention, keep, **{names[key]: value for key, value in params.items()})
    got = dict(zip(selection.keep.tolist(), selection.apply(view.features), strict=True))
    assert sorted(got) == sorted(expected)
    assert FastVID(**params).count(view, keep) == len(expected) <= keep
    for slot, value in expected.items():
        torch.testing.assert_close(got[slot], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "keep,params",
    [
        (36, {"segments": 2, "threshold": 0.0}),  # two scenes, each one run of near copies: its last frame keeps all
        (36, {"segments": 2, "threshold": 0.0, "ignore": 1.01, "period": 2}),  # every frame its own run, 2 anchors
        (54, {}),  # eight single-frame segments
        (27, {"segments": 1, "threshold": -1.0, "ignore": 1.01, "context": 0.6, "beta": 0.3}),
    ],
)
def test_qwen_variant_equals_the_transcription(keep, params):
    x, attention = planted_video()
    view = view_of(x, attention)
    selector = FastVID(variant="qwen2_5_vl", **params)
    selection = selector.select(view, keep)
    names = {"segments": "segments", "threshold": "tau", "context": "d", "period": "p", "beta": "beta"}
    expected = qwen_reference(x, attention, keep, **{names.get(key, key): value for key, value in params.items()})
    got = dict(zip(selection.keep.tolist(), selection.apply(view.features), strict=True))
    assert sorted(got) == sorted(expected)
    assert selector.count(view, keep) == len(expected)
    for slot, value in expected.items():
        torch.testing.assert_close(got[slot], value, rtol=1e-5, atol=1e-5)


def test_qwen_counts_by_hand():
    g = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1
    )
    # one segment of 5 frames, retain 3 per frame: 15 tokens, 6 context, 9 salient; runs [0-1], [2-3], [4]
    salient, context = qwen_counts(g, [5], per_frame=9, retain=3, d=0.4, period=2, ignore=0.95)
    # salient 3 per run; context 3 + 3 to runs 0 and 2, counted from the last: runs 2 and 0 (reversed: runs 0, 2)
    assert salient == [0, 3, 0, 3, 3] and context == [0, 3, 0, 0, 3]
    salient, context = qwen_counts(g[:1], [1], per_frame=9, retain=3, d=0.4, period=2, ignore=0.95)
    assert (salient, context) == ([2], [1])  # a one-frame segment: max(int(3 x 0.4), 1) context


def test_several_anchors_share_the_segment_tokens():
    """With two anchors in a scene, a token of that scene feeds one target of each: the pair form."""
    x, attention = planted_video()
    selection = FastVID(segments=2, threshold=0.0, period=2).select(view_of(x, attention), 36)
    counts = torch.bincount(selection.source, minlength=T * N)
    merged = torch.ones(T * N, dtype=torch.bool)
    merged[selection.keep] = False
    assert (counts[merged] == 2).all()  # every merged token: once into each of its scene's two anchors
    assert (counts[selection.keep[: T * 3]] == 1).all()  # salient tokens (3 per frame): themselves only


def test_anchor_counts_by_hand():
    assert anchor_counts([1, 4, 5], context=3, period=4) == [3, 0, 0, 0, 12, 7, 0, 0, 0, 7]  # 15 // 2 at 5 - 1, 5 - 5
    assert anchor_counts([6], context=2, period=2) == [0, 4, 0, 4, 0, 4]


def test_keep_all_is_the_identity_and_images_are_refused():
    x, attention = planted_video()
    assert torch.equal(FastVID().select(view_of(x, attention), T * N), torch.arange(T * N))
    image = TokenView(index=torch.arange(N), grid=(3, 3), image=0, frames=1)
    image.features, image.received_attention = x[0], {None: attention[0]}
    with pytest.raises(ValueError, match="at least two frames"):
        FastVID().select(image, 4)


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"context": 1.5}, "context must be a number in"),
        ({"beta": -0.1}, "beta must be a number in"),
        ({"period": 0}, "period must be an integer >= 1"),
        ({"segments": 2.5}, "segments must be an integer >= 1"),
        ({"variant": "llava"}, "variant must be one of"),
    ],
)
def test_bad_parameters(bad, message):
    with pytest.raises(ValueError, match=message):
        FastVID(**bad)


@pytest.fixture(scope="module")
def onevision():
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(layers=4)
    run(model, family.inputs(model, ((3, 2, (4,)),)))
    return family, model


SHAPES = ((3, 2, (4,)), (1, 3, (4, 4)), (5, 1, (4,)))  # four frames of 4 tokens per video


@pytest.mark.parametrize(
    "budget,count",
    [
        ({"ratio": 0.75, "segments": 1, "threshold": -1.0, "period": 2}, 12),  # 4 x 2 salient + 2 anchors x 2
        ({"ratio": 0.75, "segments": 1, "threshold": -1.0}, 10),  # 4 x 2 salient + one anchor, capped at 2
        ({"keep": 12}, 12),  # four single-frame segments: 2 salient + 1 context each
    ],
)
def test_fastvid_core_invariants_on_onevision_videos(onevision, budget, count):
    family, model = onevision
    check_method(family, model, "fastvid", budget, SHAPES, count=lambda size: count)


def test_fastvid_is_refused_where_no_received_attention():
    with pytest.raises(ValueError, match="fastvid"):
        vlprune.wrap(VIDEO_FAMILIES["llava_next_video"].build(layers=2), "fastvid", keep=8)


def test_presets(onevision):
    """``fastvid-25``: a quarter of each frame's 4 tokens (one salient token, no context), positions kept."""
    family, model = onevision
    config = vlprune.load_config("fastvid-25")
    assert (config.stages[0].method, config.stages[0].ratio, config.positions) == ("fastvid", 0.25, "original")
    with vlprune.wrap(model, "fastvid-25") as pruned:
        run(model, family.inputs(model, SHAPES[:1]))
        assert pruned.plans[0].kept_per_sample == [4]
    assert vlprune.load_config("fastvid-10").stages[0].ratio == 0.1


def test_qwen_saliency_is_the_frame_mean_query_attention_of_the_last_block():
    """Qwen2.5-VL's ``received_attention`` (FastVID's Qwen saliency) against the definition: per temporal patch, the
    mean query of its patches against the mean key of each 2 x 2 block, softmax, mean over heads, in the tower's last
    block; the window order undone by matching the merger's outputs to the tower's raster output."""
    family = VIDEO_FAMILIES["qwen2_5_vl"]
    model = family.build(layers=2)
    inputs = family.inputs(model, ((3, 2, ((3, 4, 8),)),), seed=3)
    visual = model.model.visual
    attn = visual.blocks[-1].attn
    grabbed = {}

    def grab(module, args, kwargs):
        grabbed["hidden"] = args[0] if args else kwargs["hidden_states"]
        grabbed["cos_sin"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    handle.remove()
    with torch.no_grad():
        merged = visual.merger(out.last_hidden_state)  # window order
        raster_of = [int((out.pooler_output - row).abs().sum(-1).argmin()) for row in merged]
        assert sorted(raster_of) != raster_of  # the tiny tower's windows do reorder the tokens
        hidden, (cos, sin) = grabbed["hidden"], grabbed["cos_sin"]
        q, k, _ = attn.qkv(hidden).reshape(hidden.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    n, d = h * w // 4, q.shape[-1]
    expected = torch.zeros(t * n)
    for f in range(t):
        for head in range(attn.num_heads):
            query = q[f * h * w : (f + 1) * h * w, head].mean(0)
            logits = [
                float(query @ k[f * h * w + 4 * u : f * h * w + 4 * u + 4, head].mean(0)) / d**0.5 for u in range(n)
            ]
            probs = torch.tensor(logits).softmax(0)
            for u in range(n):
                expected[raster_of[f * n + u]] += probs[u] / attn.num_heads
    with torch.no_grad(), seen_views(FastVID, "received_attention") as seen:
        with vlprune.wrap(model, "fastvid", ratio=0.5, variant="qwen2_5_vl"):
            model(**inputs)
    torch.testing.assert_close(seen[0].float().cpu(), expected, rtol=1e-4, atol=1e-6)


QWEN_PARAMS = {"segments": 1, "threshold": -1.0, "ignore": 1.01, "variant": "qwen2_5_vl"}  # one segment, frame runs


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen2_vl"])
def test_qwen_variant_under_the_core_invariants(name, monkeypatch):
    family = VIDEO_FAMILIES[name]
    model = family.build(layers=4)
    run(model, family.inputs(model, DYCOKE_SHAPES["qwen"][:1]))
    monkeypatch.setitem(TINY_PARAMS, "fastvid", QWEN_PARAMS)

    def count(size) -> int:
        frames, n = family.frames(size)
        g = torch.ones(frames, 2) / 2**0.5  # no DySeg cut either way (one segment, threshold -1)
        return sum(map(sum, qwen_counts(g, [frames], n, int(n * 0.5), 0.4, 4, QWEN_PARAMS["ignore"])))

    check_method(family, model, "fastvid", {"ratio": 0.5}, DYCOKE_SHAPES["qwen"], count)


def test_qwen_preset():
    (stage,) = vlprune.load_config("fastvid-qwen2_5_vl").stages
    assert (stage.method, stage.ratio, stage.params["variant"], stage.params["ignore"]) == (
        "fastvid",
        0.27,
        "qwen2_5_vl",
        0.95,
    )
    family = VIDEO_FAMILIES["qwen2_5_vl"]
    model = family.build(layers=2)
    with torch.no_grad(), vlprune.wrap(model, "fastvid-qwen2_5_vl") as pruned:
        model(**family.inputs(model, DYCOKE_SHAPES["qwen"][:1]))
        (kept,) = pruned.plans[0].kept_per_sample
    assert 0 < kept < 16
