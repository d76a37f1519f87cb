"""InternVL videos: the processor writes each frame as a one-tile image of its own, and ``Pruned.set_videos`` says
which runs are frames. The layout built from it by hand, ``received_attention`` against an eager recomputation, every
video method and every image method under the core invariants (videos alone, and images and videos in one prompt),
the identity at keep-all, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from test_families import caller_query, check_method, reads_the_query, run, supported

import vlprune
from vlprune.captures import VisionCaptures
from vlprune.registry import adapter_class
from vlprune.selectors.holitom import HoliTom

from families import IMAGE, InternVLVideo
from reference import seen_views, state
from test_methods import TINY_PARAMS
from tiny import TINY_CLIP

FAMILY = InternVLVideo()
VIDEOS = ((3, 2, (4,)), (1, 3, (3, 2)), (5, 1, (2,)))  # frames per video
MIXED = ((3, 2, ((2,), 3)), (1, 3, (2, (1,))), (5, 1, ((1,), 2, (2,))))  # (n,): an image of n tiles


@pytest.fixture(scope="module")
def model():
    model = FAMILY.build(layers=10)  # deep enough for every default layer (pdrop: 8)
    run(model, FAMILY.inputs(model, VIDEOS[:1]))  # a first call sets lazy attributes the checks compare
    return model


def test_the_described_runs_form_videos(model):
    """Per sample, consecutive runs of one tile become one video of ``frames x 4 x 4`` tokens whose tiles are its
    frames, the text between them stays text, and images keep their own runs, all written out by hand."""
    inputs = FAMILY.inputs(model, MIXED)
    adapter = adapter_class("internvl")(model)
    hint = [[None if isinstance(s, tuple) else s for s in shape[2]] for shape in MIXED]
    layouts = adapter.layouts(inputs["input_ids"] == IMAGE, VisionCaptures(video_frames=hint))
    first = 0
    for b, (layout, shape) in enumerate(zip(layouts, MIXED, strict=True)):
        ids = inputs["input_ids"][b]
        assert torch.equal(layout.positions, torch.nonzero(ids == IMAGE).flatten())
        tokens = [16 * (s[0] if isinstance(s, tuple) else s) for s in shape[2]]
        assert torch.bincount(layout.image_of).tolist() == tokens
        assert torch.equal(layout.local, torch.cat([torch.arange(n) for n in tokens]))
        assert layout.frames == [1 if isinstance(s, tuple) else s for s in shape[2]]
        assert layout.grids == [(4, 4) if s != (2,) else None for s in shape[2]]  # a two-tile image has no one grid
        assert layout.tile_grids == [[(4, 4)] * (n // 16) for n in tokens]
        assert torch.equal(layout.tile_of, layout.local // 16)
        videos = iter(range(9))
        assert layout.video_of == [None if isinstance(s, tuple) else next(videos) for s in shape[2]]
        assert layout.images == list(range(first, first + len(tokens)))
        first += len(tokens)
    # without a description every run is an image of its own
    plain = adapter.layouts(inputs["input_ids"] == IMAGE, VisionCaptures())
    assert plain[0].frames == [1] * 4 and plain[0].video_of is None


def test_received_attention_is_the_feature_layers_received_attention_summed_per_token():
    """What HoliTom sees: per frame, the feature layer's attention each patch receives (softmax, mean over heads and
    queries, the [CLS] key dropped), summed over the 2 x 2 patches of each token, written out by hand."""
    model = FAMILY.build(layers=2, attn="eager")
    shapes = VIDEOS[:1]
    inputs = FAMILY.inputs(model, shapes, seed=3)
    with seen_views(HoliTom, "received_attention") as seen, vlprune.wrap(model, "holitom", keep=6) as pruned:
        FAMILY.hint(shapes)(pruned, [0])
        run(model, inputs)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    patches = attentions[-1].mean(1).mean(1)[:, 1:].reshape(4, 8, 8)  # feature layer -1: the last layer
    expected = torch.stack(
        [patches[:, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].sum((1, 2)) for r in range(4) for c in range(4)], dim=1
    )
    assert len(seen) == 2  # forward, then generate's prefill
    for got in seen:
        torch.testing.assert_close(got, expected.flatten(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "budget"),
    [
        *((m, {"ratio": r}) for m in vlprune.list_methods("video") for r in (0.5, 0.75)),
        ("holitom", {"keep": 5}),
        ("holitom-inner", {"ratio": 0.5, "layer": 2}),
        ("prunevid-inner", {"ratio": 0.5, "layer": 2}),
    ],
)
def test_every_video_method_under_the_core_invariants(model, method, budget, tiny_clip, monkeypatch):
    """Every video method (its defaults at two ratios, and the stages inside the LLM alone): reference equality,
    ``generate()`` against a manual greedy loop, batch equal to single, on videos of two to four frames (two videos
    in one prompt included); the frames named by the caller (``set_videos``), and the question too for a method
    reading it."""
    name = method.split("-")[0]
    count = None
    if method.endswith("inner"):  # the stages inside the LLM keep half of each video, rounded half up

        def count(size) -> int:
            frames, n = FAMILY.frames(size)
            return math.floor(0.5 * frames * n + 0.5)

    back = 2 if method == "prunevid-inner" else None
    prepare = FAMILY.hint(VIDEOS)
    if reads_the_query(name):
        monkeypatch.setitem(TINY_PARAMS, name, {**TINY_PARAMS.get(name, {}), **TINY_CLIP})
        query = caller_query(FAMILY, VIDEOS)

        def prepare(pruned, samples, hint=prepare):
            hint(pruned, samples)
            query(pruned, samples)

    check_method(FAMILY, model, name, budget, VIDEOS, count=count, back=back, prepare=prepare)


@pytest.mark.parametrize("method", vlprune.list_methods("image"))
def test_every_image_method_on_images_and_videos(model, method):
    """Image methods with one budget per video (its frames' tokens together) and per image, in prompts that mix
    them."""
    check_method(FAMILY, model, method, {"keep": 5}, MIXED, prepare=FAMILY.hint(MIXED))


def test_every_method_is_the_identity_at_keep_all(model):
    inputs = FAMILY.inputs(model, VIDEOS, seed=4)
    reference = run(model, inputs)
    methods = supported(FAMILY, "image") + supported(FAMILY, "video")
    assert {"dycoke", "prunevid", "holitom", "fastvid"} <= set(methods)
    for method in methods:
        with vlprune.wrap(model, method, keep=10_000, **TINY_PARAMS.get(method, {})) as pruned:
            FAMILY.hint(VIDEOS)(pruned, [0, 1, 2])
            got = run(model, inputs)
            assert pruned.plans[0].kept_per_sample == pruned.plans[0].num_visual
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), method


def test_per_frame_budgets():
    """``per="tile"``: each frame of a video is a tile with its own budget."""
    model = FAMILY.build(layers=2)
    inputs = FAMILY.inputs(model, VIDEOS, seed=5)
    with vlprune.wrap(model, "divprune", keep=3, per="tile") as pruned:
        FAMILY.hint(VIDEOS)(pruned, [0, 1, 2])
        run(model, inputs, steps=1)
        plan = pruned.plans[0]
    for b, shape in enumerate(VIDEOS):
        frames = sum(shape[2])
        assert torch.bincount(plan.keep_visual[b] // 16, minlength=frames).tolist() == [3] * frames


def test_errors_leave_the_model_as_it_was(model):
    inputs = FAMILY.inputs(model, VIDEOS[:1])
    before = state(model)
    with torch.no_grad(), vlprune.wrap(model, "dycoke", ratio=0.5) as pruned:
        with pytest.raises(ValueError, match=r"call pruned.set_videos\(\.\.\.\)"):
            model(**inputs)
        pruned.set_videos([3])
        with pytest.raises(ValueError, match=r"described sample 0 as \[3\] \(3 image runs .*but its prompt has 4"):
            model(**inputs)
        pruned.set_videos([[4], [4]])
        with pytest.raises(ValueError, match="set_videos described 2 sample"):
            model(**inputs)
        pruned.set_videos([[2, 2]])
        model(**inputs)  # two videos of two frames
        assert pruned.plans[0].num_visual == [64]
    two_tiles = FAMILY.inputs(model, ((3, 2, ((2,), (2,))),))
    with torch.no_grad(), vlprune.wrap(model, "divprune", keep=3) as pruned:
        pruned.set_videos([[2]])
        with pytest.raises(ValueError, match=r"runs have \[32, 32\] placeholders; each frame of a video is one tile"):
            model(**two_tiles)
        for bad, kind in (("4", TypeError), ([], TypeError), ([[0]], ValueError), ([[True]], ValueError)):
            with pytest.raises(kind, match="frames must"):
                pruned.set_videos(bad)
        pruned.set_videos(None)
        model(**two_tiles)  # images again
    assert state(model) == before
