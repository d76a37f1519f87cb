"""``order="release"`` (DyCoke, HoliTom): the LLM reads the kept tokens in the release's order at contiguous positions,
checked against the unhooked language model run on a sequence assembled by hand."""

from __future__ import annotations

import pytest
import torch
from test_families import DYCOKE_SHAPES, check_method, run, video_shapes

import vlprune
from vlprune.selectors.dycoke import DyCoke, reference_frame
from vlprune.signals import TokenView

from families import VIDEO, VIDEO_FAMILIES
from reference import embed
from test_methods import TINY_PARAMS


def release_dycoke(features: torch.Tensor, frames: int, per_frame: int, ratio: float) -> list[int]:
    """DyCoke's TTM as the release hands its tokens on: frames in order, every fourth whole, each other frame's
    ``int((1 - ratio) N)`` tokens least cosine-similar to its reference frame, least similar first."""
    x = features.reshape(frames, per_frame, -1).float()
    order = []
    for f in range(frames):
        if f % 4 == 0:
            order += [f * per_frame + p for p in range(per_frame)]
            continue
        a, b = torch.nn.functional.normalize(x[f], dim=-1), torch.nn.functional.normalize(x[reference_frame(f)], dim=-1)
        similarity = (a * b).sum(-1)
        order += [f * per_frame + int(p) for p in similarity.argsort()[: int((1 - ratio) * per_frame)]]
    return order


def test_dycoke_release_order_at_the_selector():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5 * 6, 8, generator=g)
    view = TokenView(index=torch.arange(30), grid=(2, 3), image=0, frames=5, features=features)
    released = DyCoke(prune_ratio=0.5, order="release").select(view, 1)
    assert released.ordered and released.keep.tolist() == release_dycoke(features, 5, 6, 0.5)
    plain = DyCoke(prune_ratio=0.5).select(view, 1)  # the same tokens, in an order the core does not follow
    assert sorted(plain.tolist()) == sorted(released.keep.tolist()) != released.keep.tolist()
    with pytest.raises(ValueError, match=r"dycoke order must be one of \('position', 'release'\), got 'first'"):
        DyCoke(order="first")


@pytest.fixture(scope="module")
def onevision():
    family = VIDEO_FAMILIES["llava_onevision"]
    return family, family.build(layers=3)


def test_the_llm_reads_dycoke_in_the_releases_order(onevision):
    """One LLaVA-OneVision video of 6 frames x 4 tokens: the wrapped model's logits equal the unhooked language
    model's on [text, kept video tokens in the release's order, newline, text] at positions 0, 1, 2, ... (and differ
    from position order, so the test sees the order)."""
    family, model = onevision
    inputs = family.inputs(model, [(3, 2, (6,))])
    ids = inputs["input_ids"]
    with torch.no_grad():
        embeds = embed(model, ids, inputs["pixel_values_videos"], videos=True)
    rows = torch.nonzero(ids[0] == VIDEO).flatten()[:-1]  # the last placeholder is the newline
    order = release_dycoke(embeds[0, rows], 6, 4, 0.5)  # frames 1, 2, 3 and 5 keep two tokens each
    assert order != sorted(order)
    keep = torch.cat([torch.arange(int(rows[0])), rows[order], torch.arange(int(rows[-1]) + 1, ids.shape[1])])
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds[:, keep]).last_hidden_state
        expected = model.lm_head(hidden)[0, -1]
        by_position = model.model.language_model(inputs_embeds=embeds[:, keep.sort().values]).last_hidden_state
    results = {}
    for order_name in ("release", "position"):
        with vlprune.wrap(model, "dycoke", ratio=1.0, prune_ratio=0.5, order=order_name, positions="renumber"):
            with torch.no_grad():
                results[order_name] = model(**inputs).logits[0, -1]
    torch.testing.assert_close(results["release"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["position"], model.lm_head(by_position)[0, -1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(results["release"], results["position"], atol=1e-4)


def test_release_order_needs_renumbered_positions(onevision):
    family, model = onevision
    for method, params in (("dycoke", {"prune_ratio": 0.7}), ("holitom", {})):
        with pytest.raises(ValueError, match=f"'{method}' with order='release'.*use positions='renumber'"):
            vlprune.wrap(model, method, ratio=0.5, order="release", **params)
    vlprune.wrap(model, "dycoke", ratio=0.5, order="release", positions="renumber").unwrap()


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize("method", ["dycoke", "holitom"])
def test_release_order_under_the_core_invariants(name, method, monkeypatch):
    """Reordered (and for HoliTom merged) tokens: forward equal to the hand loop applying the plan (a reordering is a
    merge of weight 1 in it), generate() equal to a manual greedy loop, a batch equal to each prompt alone."""
    family = VIDEO_FAMILIES[name]
    model = family.build(layers=3)
    run(model, family.inputs(model, video_shapes(family, DYCOKE_SHAPES)[:1]))  # transformers' lazy hooks first
    monkeypatch.setitem(TINY_PARAMS, method, {**TINY_PARAMS.get(method, {}), "order": "release"})
    if method == "holitom":  # at threshold 0.2 the tiny models' videos have static and dynamic positions
        monkeypatch.setitem(TINY_PARAMS, method, {**TINY_PARAMS[method], "threshold": 0.2})

    def count(size) -> int:
        frames, n = family.frames(size)
        return n * len(range(0, frames, 4)) + (frames - len(range(0, frames, 4))) * int(0.5 * n)

    budget = {"ratio": 1.0, "prune_ratio": 0.5} if method == "dycoke" else {"keep": 5}
    budget["positions"] = "renumber"
    shapes = video_shapes(family, DYCOKE_SHAPES)
    check_method(family, model, method, budget, shapes, count=count if method == "dycoke" else (lambda size: 5))
    # the order did change something: a kept slot holds another kept token's own value (weight 1)
    with vlprune.wrap(model, method, **budget, **TINY_PARAMS[method]) as pruned, torch.no_grad():
        model(**family.inputs(model, shapes, seed=2))
    plan = pruned.plans[0]
    moved = [
        bool(((into != torch.arange(into.numel())) & (into >= 0) & (weight == 1)).any())
        for into, weight in zip(plan.merged_into, plan.merge_weight, strict=True)
    ]
    assert any(moved)
