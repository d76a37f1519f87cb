"""PruneVid: its segment clean-up by the release's rules, segmentation on planted scene cuts, the stage before the LLM
against a hand transcription (pairwise loops, loop DPC-KNN), the release's counting, the stage inside the LLM
(per-group top tokens by head-max, text-max attention), ``frame_span``, and both stages under the core invariants,
decoding included: the dropped tokens leave the cache of the earlier layers too."""

from __future__ import annotations

import math

import pytest
import torch
from test_families import DYCOKE_SHAPES, check_method, run, video_shapes
from test_holitom import dpc_centres

import vlprune
from vlprune import hf
from vlprune.layout import SampleLayout, frame_spans
from vlprune.plan import KeepPlan
from vlprune.selectors.prunevid import PruneVid, prunevid_segments
from vlprune.signals import TokenView
from vlprune.temporal import label_segments, refine_runs

from families import VIDEO_FAMILIES
from reference import embed, layer_loop, merges_of

T, N, D = 8, 9, 16  # frames, tokens per frame (3 x 3), width


def test_refine_runs_follows_the_release_rules():
    # label 0: runs of 2 and 3 -> the 2 goes; label 1: 1 and 3 -> the 1 goes; label 3: single frames only -> goes
    assert refine_runs([0, 0, 1, 0, 0, 0, 2, 2, 1, 1, 1, 3]) == [0, 0, 0, 0, 0, 0, 2, 2, 1, 1, 1, 1]
    assert refine_runs([0, 1, 0, 1]) == [0, 0, 0, 0]  # nothing survives: label 0
    assert refine_runs([0, 0, 1, 2, 2, 2]) == [0, 0, 2, 2, 2, 2]  # the longer neighbour wins
    assert refine_runs([0, 0, 1, 2, 2]) == [0, 0, 0, 2, 2]  # a tie goes left
    assert refine_runs([3, 3, 1, 1, 3, 3]) == [3, 3, 1, 1, 3, 3]  # equal longest runs all stay
    assert label_segments([0, 0, 2, 2, 2, 1]) == [(0, 1), (2, 4), (5, 5)]


def scenes(cuts=(0, 3, 5), frames=T, seed=0) -> torch.Tensor:
    """(frames, N, D): a new random scene at each cut, barely changing in between."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(frames, N, D)
    for start, end in zip(cuts, (*cuts[1:], frames), strict=True):
        x[start:end] = torch.randn(N, D, generator=g) + 0.05 * torch.randn(end - start, N, D, generator=g)
    return x


def test_segmentation_finds_the_planted_cuts():
    x = scenes()
    assert prunevid_segments(x.mean(1), 3, 7) == [(0, 2), (3, 4), (5, 7)]
    assert prunevid_segments(x.mean(1), 1, 7) == [(0, T - 1)]


def planted_video(seed=1) -> torch.Tensor:
    """Two scenes (frames 0-3, 4-7); in each, positions 0-4 stay put and the others move."""
    x = scenes((0, 4), seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    x[:, 5:] = 0.3 * torch.randn(T, N - 5, D, generator=g)
    return x


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def hand_reference(x, keep, tau=0.8, k=7):
    """PruneVid before the LLM, written out: {slot: value} of the output tokens."""
    segments = prunevid_segments(x.mean(1), int(T * 0.25), k)  # checked on its own above
    groups = []  # (slots of the group's tokens, their values, the frames they average over)
    for start, end in segments:
        w = end - start + 1
        pair = [
            sum(cosine(x[a, p], x[b, p]) for a in range(start, end + 1) for b in range(start, end + 1) if a != b)
            / (w * (w - 1))
            for p in range(N)
        ]
        static = [p for p in range(N) if pair[p] > tau]
        moving = [p for p in range(N) if p not in static]
        groups.append(([start * N + p for p in static], torch.stack([x[start : end + 1, p].mean(0) for p in static])))
        for f in range(start, end + 1):
            groups.append(([f * N + p for p in moving], x[f, moving]))
    sizes = [len(slots) for slots, _ in groups]
    total = sum(sizes)
    counts = vlprune.selectors.shared.largest_remainder([n * keep / total for n in sizes], sizes, keep)
    out = {}
    for (slots, values), count in zip(groups, counts, strict=True):
        if count == 0:  # the budget left this group nothing: its tokens are dropped
            continue
        if count == len(slots):
            out.update({s: v for s, v in zip(slots, values, strict=True)})
            continue
        centres, dist = dpc_centres(values, count, k)
        nearest = [min(centres, key=lambda c: dist[i][c]) for i in range(len(slots))]
        for c in centres:
            members = [values[i] for i in range(len(slots)) if nearest[i] == c or i == c]
            out[slots[c]] = torch.stack(members).mean(0)
    return out


def view_of(x):
    return TokenView(index=torch.arange(T * N), grid=(3, 3), image=0, frames=T, features=x.reshape(T * N, D))


@pytest.mark.parametrize("keep", [30, 20, 12, 4])  # 4: most groups get none
def test_before_the_llm_matches_the_hand_reference(keep):
    x = planted_video()
    expected = hand_reference(x, keep)
    selection = PruneVid().select(view_of(x), keep)
    got = dict(zip(selection.keep.tolist(), selection.apply(x.reshape(T * N, D)), strict=True))
    assert len(got) == keep and sorted(got) == sorted(expected)
    for slot, value in expected.items():
        torch.testing.assert_close(got[slot], value, rtol=1e-5, atol=1e-6)
    statics = [s for s in got if s % N < 5 and s // N in (0, 4)]
    assert statics  # the still positions went into tokens in each scene's first frame


def test_budgets():
    x = planted_video()
    view = view_of(x)
    # merged over time only: 5 static + 4 x 4 moving per scene = 42 tokens, whatever budget above
    assert PruneVid().count(view, 60) == 42
    assert torch.equal(PruneVid().select(view, T * N), torch.arange(T * N))  # the whole budget: untouched
    # the release's counting: groups of more than min_cluster tokens become int(n r) clusters, r = keep / (T N)
    assert PruneVid(exact=False).count(view, 36) == 42
    assert PruneVid(exact=False, min_cluster=4).count(view, 36) == 2 * (2 + 4 * 4)  # static 5 -> int(2.5)
    assert PruneVid(exact=False, min_cluster=3).count(view, 36) == 2 * (2 + 4 * 2)
    # a ratio budget: the release's cluster_ratio is the ratio itself (0.4965), not the rounded 36 / 72 = 0.5
    view.ratio = 0.4965
    assert vlprune.Stage("prunevid", ratio=0.4965).budget(T * N) == 36
    assert PruneVid(exact=False, min_cluster=3).count(view, 36) == 2 * (2 + 4 * 1)


def test_inside_the_llm_keeps_the_best_of_each_group():
    """Per group (same frame span), the tokens with the largest head-max attention from any text token."""
    g = torch.Generator().manual_seed(3)
    n = 10
    span = torch.tensor([[0, 1]] * 3 + [[0, 0]] * 3 + [[1, 1]] * 4)
    top = torch.rand(4, n, generator=g)
    view = TokenView(index=torch.arange(n), grid=(2, 3), image=0, frames=2, frame_span=span)
    view.text_attention_max = {5: top}
    view.text_attention = {5: torch.zeros(4, n)}  # the head mean plays no part
    kept = PruneVid().select(view, 5)
    score = top.amax(0)
    expected = []
    for members, count in (([0, 1, 2], 2), ([3, 4, 5], 1), ([6, 7, 8, 9], 2)):  # quotas 1.5, 1.5, 2: ties go first
        expected += sorted(members, key=lambda i: -float(score[i]))[:count]
    assert sorted(kept.tolist()) == sorted(expected)
    assert PruneVid().requests(11, 24)[0] == vlprune.signals.SignalRequest("text_attention", 10)


def test_frame_span_follows_the_merges():
    layout = SampleLayout(
        positions=torch.arange(12),
        image_of=torch.zeros(12, dtype=torch.long),
        local=torch.arange(12),
        images=[0],
        grids=[(2, 2)],
        frames=[3],
    )
    into = torch.tensor([0, 1, 2, 3, 0, 1, 6, 7, 0, 1, 10, -1])  # positions 0, 1 of frames 1, 2 merge into frame 0
    plan = KeepPlan(0, "x", [], [], [], [12], [into], [torch.ones(12)])
    span = frame_spans([plan], [layout])[0]
    assert span[:2].tolist() == [[0, 2], [0, 2]] and span[2:4].tolist() == [[0, 0], [0, 0]]
    assert span[6:8].tolist() == [[1, 1], [1, 1]] and span[10].tolist() == [2, 2]


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def video_case(request):
    family = VIDEO_FAMILIES[request.param]
    model = family.build(layers=4)
    run(model, family.inputs(model, video_shapes(family)[:1]))  # a first call sets lazy attributes the checks compare
    return family, model


def test_before_the_llm_under_the_core_invariants(video_case):
    family, model = video_case
    check_method(family, model, "prunevid", {"ratio": 0.5}, video_shapes(family, DYCOKE_SHAPES))


def test_inside_the_llm_under_the_core_invariants(video_case):
    """A stage at layer 2 alone (each frame a group): the forward equals the layer loop, generation the manual loop
    in which the tokens generated do not see the dropped ones at layers 0 and 1 either, and a batch its prompts."""
    family, model = video_case

    def count(size) -> int:
        frames, n = family.frames(size)
        return math.floor(0.5 * frames * n + 0.5)

    check_method(family, model, "prunevid", {"ratio": 0.5, "layer": 2}, video_shapes(family, DYCOKE_SHAPES), count, 2)


def test_both_stages_compact_every_layers_cache(video_case):
    family, model = video_case
    inputs = family.inputs(model, video_shapes(family, DYCOKE_SHAPES), seed=4)
    config = vlprune.PruneConfig(
        stages=[vlprune.Stage("prunevid", ratio=0.5, layer=0), vlprune.Stage("prunevid", ratio=0.4, layer=2)]
    )
    with torch.no_grad(), vlprune.wrap(model, config) as pruned:
        out = model(**inputs, use_cache=True)
        first, second = pruned.plans
        lengths = [hf.output_cache(out).get_seq_length(i) for i in range(4)]
        assert len(set(lengths)) == 1 and lengths[0] == max(len(k) for k in second.keep_tokens)
        for b in range(len(second.keep_visual)):  # groups of the first stage: a kept token per group at least
            assert set(second.keep_visual[b].tolist()) <= set(first.keep_visual[b].tolist())
        ids = inputs["input_ids"]
        stages = [(p.layer, p.keep_tokens, merges_of(p, ids)) for p in (first, second)]
        embeds = embed(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
        expected = layer_loop(model, embeds, inputs["attention_mask"], family.positions(model, inputs), stages)
        real = torch.stack(
            [torch.arange(out.logits.shape[1]) >= out.logits.shape[1] - len(k) for k in second.keep_tokens]
        )
        torch.testing.assert_close(out.logits[real], expected[real], rtol=1e-4, atol=1e-5)


def test_prunevid_refusals(video_case):
    family, model = video_case
    with pytest.raises(ValueError, match="prunevid segment_ratio must be a number in"):
        vlprune.wrap(model, "prunevid", ratio=0.5, segment_ratio=2)
    with pytest.raises(ValueError, match="prunevid min_cluster must be an integer"):
        PruneVid(min_cluster=-1)
    view = TokenView(index=torch.arange(9), grid=(3, 3), image=0, features=torch.randn(9, D))
    with pytest.raises(ValueError, match="needs a video of at least two frames"):
        PruneVid().select(view, 4)


def test_the_paper_preset():
    config = vlprune.load_config("prunevid-paper")
    first, second = config.stages
    assert (first.method, first.ratio, first.layer, first.params) == ("prunevid", 0.5, 0, {"exact": False})
    assert (second.method, second.ratio, second.layer, config.positions) == ("prunevid", 0.4, 11, "renumber")
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(layers=12)
    inputs = family.inputs(model, video_shapes(family, DYCOKE_SHAPES)[:1], seed=1)
    with torch.no_grad(), vlprune.wrap(model, "prunevid-paper") as pruned:
        out = model(**inputs, use_cache=True)
        merged, kept = pruned.plans
        # 4 tokens per frame: no group above 14, so merging over time only; then 40 % of what is left
        assert kept.kept_per_sample == [round(0.4 * merged.kept_per_sample[0])]
        assert {hf.output_cache(out).get_seq_length(i) for i in range(12)} == {len(kept.keep_tokens[0])}
