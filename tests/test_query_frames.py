"""query_frames on a tiny random CLIP built with open_clip: its relevance against open_clip's own encoders, the budget
split and the choice within frames by hand, the ``then`` composition, a [CLS] method within InternVL's frames, and
its errors (the core invariants on every video family: the registry's matrix in test_families.py)."""

from __future__ import annotations

import pytest
import torch
from test_families import DYCOKE_SHAPES, check_method, run, video_shapes

import vlprune
from vlprune.selectors.query_frames import QueryFrames, clip_relevance, frame_budgets, load_clip
from vlprune.signals import TokenView

from families import VIDEO_FAMILIES, InternVLVideo
from test_methods import TINY_PARAMS
from tiny import TINY_CLIP, random_frames

QUESTION = "what is the red square doing ?"
pytestmark = pytest.mark.usefixtures("tiny_clip")


def test_relevance_matches_open_clips_encoders():
    model, tokenizer, mean, std, size = load_clip("vlprune-tiny-clip", None)
    frames = random_frames(3)
    frame, patch = clip_relevance(model, tokenizer, mean, std, size, QUESTION, frames)
    pixels = torch.nn.functional.interpolate(
        torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255, size=(size, size), mode="bilinear"
    )
    pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    captured = {}
    hook = model.visual.ln_post.register_forward_hook(lambda m, a, out: captured.update(x=out))
    with torch.no_grad():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(tokenizer([QUESTION]), normalize=True)[0]
    hook.remove()
    torch.testing.assert_close(frame, image @ text, rtol=1e-5, atol=1e-6)
    tokens = torch.nn.functional.normalize(captured["x"][:, 1:] @ model.visual.proj, dim=-1)  # patches, projected
    torch.testing.assert_close(patch, (tokens @ text).reshape(3, 4, 4), rtol=1e-5, atol=1e-6)


def test_budgets_by_hand():
    relevance = torch.tensor([0.2, 0.1, 0.3])
    share = torch.softmax(relevance.double() / 0.1, 0) * 10  # 2.45, 0.90, 6.65
    assert [round(float(s), 2) for s in share] == [2.45, 0.9, 6.65]
    assert frame_budgets(relevance, 10, 9, 0.1) == [2, 1, 7]  # floors 2, 0, 6; the remainder to .90 then .65
    assert frame_budgets(relevance, 10, 4, 0.1) == [4, 2, 4]  # capped at 4 per frame: the excess spills over


def view_of(frames: int, seed: int = 1) -> TokenView:
    g = torch.Generator().manual_seed(seed)
    view = TokenView(index=torch.arange(frames * 9), grid=(3, 3), image=0, frames=frames)
    view.features = torch.randn(frames * 9, 8, generator=g)
    view.cls_attention = {None: torch.rand(frames * 9, generator=g)}
    view.question, view.raw_frames = QUESTION, random_frames(2 * frames, seed)
    return view


def test_alone_keeps_the_most_relevant_patches_of_each_frames_budget():
    view = view_of(4)
    selector = QueryFrames(**TINY_CLIP)
    kept = selector.select(view, 12)
    model, tokenizer, mean, std, size = load_clip("vlprune-tiny-clip", None)
    selector_model = selector._loaded[0]
    model.load_state_dict(selector_model.state_dict())
    frame, patch = clip_relevance(model, tokenizer, mean, std, size, QUESTION, view.raw_frames)
    patch = torch.nn.functional.interpolate(patch[:, None], size=(3, 3), mode="bilinear")[:, 0]
    slot_frame = frame.reshape(4, 2).mean(1)  # two decoded frames per token slot
    slot_patch = patch.reshape(4, 2, 3, 3).mean(1)
    budgets = frame_budgets(slot_frame, 12, 9, 0.1)
    expected = []
    for f, b in enumerate(budgets):
        order = sorted(range(9), key=lambda i: (-float(slot_patch[f].flatten()[i]), i))[:b]
        expected += [f * 9 + i for i in order]
    assert sorted(kept.tolist()) == sorted(expected) and len(expected) == 12


@pytest.mark.parametrize("then", ["divprune", "pool", "uniform", "fastervlm"])
def test_then_an_image_method_chooses_within_each_frame(then):
    view = view_of(4)
    selector = QueryFrames(then=then, **TINY_CLIP)
    chosen = selector.select(view, 12)
    frame, _ = selector.relevance(view)
    budgets = frame_budgets(frame, 12, 9, 0.1)
    keep = chosen.keep if hasattr(chosen, "keep") else chosen
    assert torch.bincount(keep // 9, minlength=4).tolist() == budgets
    inner = vlprune.registry.create_selector(then)
    for f, b in enumerate(budgets):
        sub = TokenView(index=torch.arange(9), grid=(3, 3), image=0)
        sub.features = view.features[f * 9 : (f + 1) * 9]
        sub.cls_attention = {None: view.cls_attention[None][f * 9 : (f + 1) * 9]}
        alone = inner.select(sub, b)
        alone = alone.keep if hasattr(alone, "keep") else alone
        assert sorted((keep[keep // 9 == f] % 9).tolist()) == sorted(alone.tolist())


@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def video_case(request):
    family = VIDEO_FAMILIES[request.param]
    model = family.build(layers=4)
    run(model, family.inputs(model, video_shapes(family)[:1]))
    return family, model


def test_then_a_cls_method_on_internvl_videos(monkeypatch):
    """``then="fastervlm"`` reads InternViT's [CLS] attention of each frame: the core invariants on InternVL videos
    (two in one prompt included); on LLaVA-OneVision, whose tower has no [CLS], the wrap refuses it."""
    family = InternVLVideo()
    model = family.build(layers=4)
    shapes = ((3, 2, (4,)), (1, 3, (3, 2)), (5, 1, (2,)))
    run(model, family.inputs(model, shapes[:1]))  # a first call sets lazy attributes the checks compare
    monkeypatch.setitem(TINY_PARAMS, "query_frames", {**TINY_CLIP, "then": "fastervlm"})
    videos = [[random_frames(size, seed=b + i) for i, size in enumerate(s[2])] for b, s in enumerate(shapes)]

    def prepare(pruned, samples):
        pruned.set_query([f"{QUESTION} {b}" for b in samples], videos=[videos[b] for b in samples])
        family.hint(shapes)(pruned, samples)

    check_method(family, model, "query_frames", {"ratio": 0.5}, shapes, prepare=prepare)
    with pytest.raises(ValueError, match=r"needs \['cls_attention'\], which llava_onevision cannot provide"):
        vlprune.wrap(VIDEO_FAMILIES["llava_onevision"].build(layers=2), "query_frames", ratio=0.5, then="fastervlm")


def test_errors(video_case):
    family, model = video_case
    inputs = family.inputs(model, video_shapes(family, DYCOKE_SHAPES)[:1])
    with vlprune.wrap(model, "query_frames", ratio=0.5, **TINY_CLIP) as pruned, torch.no_grad():
        with pytest.raises(ValueError, match="call pruned.set_query"):
            model(**inputs)
        pruned.set_query(["one", "two"])
        with pytest.raises(ValueError, match="gave 2 question"):
            model(**inputs)
        with pytest.raises(TypeError, match="questions must be a string"):
            pruned.set_query(3)
        with pytest.raises(ValueError, match="videos must list"):
            pruned.set_query(["a", "b"], videos=[random_frames(2)])
        pruned.set_query(QUESTION, videos=[random_frames(1)])
        with pytest.raises(ValueError, match="needs at least"):
            model(**inputs)
    with vlprune.wrap(model, "query_frames", ratio=1.0, **TINY_CLIP) as pruned, torch.no_grad():
        model(**inputs)  # the whole budget: untouched, no query needed
        assert pruned.plans[0].kept_per_sample == [pruned.plans[0].num_visual[0]]
    for bad, kind, match in (
        ({"temperature": 0}, ValueError, "temperature must be > 0"),
        ({"then": "fastv"}, ValueError, "then must be None or one of"),
        ({"then": "visionzip"}, ValueError, "then must be None or one of"),
        ({"then_params": {"start_layer": 0}}, ValueError, "need a then= method"),
        ({"then": "vtc_cls", "then_params": {"start_layr": 0}}, TypeError, "start_layr"),
        ({"clip": ""}, TypeError, "clip must be an open_clip model name"),
    ):
        with pytest.raises(kind, match=match):
            QueryFrames(**bad)
