"""Every method on every model family (LLaVA's own matrix is in test_methods.py): the core invariants on a
left-padded batch of two or three prompts with one or two images each, or, for the pairs the support table marks
"no", the documented error before anything is installed."""

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

import vlprune
from vlprune.registry import adapter_class, create_selector
from vlprune.support import missing_signals, support

from families import FAMILIES, VIDEO_FAMILIES
from reference import deepstack_of, embed, greedy, layer_loop, merges_of, original_positions, state
from test_methods import TINY_PARAMS
from tiny import TINY_CLIP, random_frames

NEW = [name for name in FAMILIES if name != "llava"]
SHAPES = {
    "qwen": ((3, 2, ((8, 8),)), (1, 3, ((4, 8), (8, 8))), (5, 1, ((4, 8),))),  # patch grids
    "internvl": ((3, 2, (1,)), (1, 3, (2, 1)), (5, 1, (2,))),  # tiles per image
    "llava_next": ((3, 2, ((56, 112),)), (1, 3, ((30, 112), (56, 56))), (5, 1, ((56, 56),))),  # pixels (H, W)
    "llava_next_video": ((3, 2, ((56, 112),)), (1, 3, ((30, 112), (56, 56))), (5, 1, ((56, 56),))),
    "llava_onevision": ((3, 2, ((224, 224),)), (1, 3, ((30, 112), (56, 56))), (5, 1, ((56, 112),))),
    "llava": ((3, 2, (16,)), (1, 3, (16, 16)), (5, 1, (16,))),  # tokens per image (56 px CLIP images)
}
VIDEO_SHAPES = {  # Qwen-VL: (t, h, w) patch grids; LLaVA-OneVision, LLaVA-NeXT-Video: frames (one count per batch)
    "qwen": ((3, 2, ((2, 4, 8),)), (1, 3, ((1, 4, 8), (2, 8, 8))), (5, 1, ((3, 4, 4),))),
    "llava_onevision": ((3, 2, (4,)), (1, 3, (4, 4)), (5, 1, (4,))),
    "llava_next_video": ((3, 2, (4,)), (1, 3, (4, 4)), (5, 1, (4,))),
}
DYCOKE_SHAPES = {  # two frames at least
    "qwen": ((3, 2, ((4, 4, 4),)), (1, 3, ((2, 4, 8), (3, 8, 4))), (5, 1, ((2, 4, 4),))),
    "llava_onevision": ((3, 2, (4,)), (1, 3, (4, 4)), (5, 1, (4,))),
    "llava_next_video": ((3, 2, (4,)), (1, 3, (4, 4)), (5, 1, (4,))),
}


def video_shapes(family, table=VIDEO_SHAPES):
    return table.get(family.name, table["qwen"])


def shapes_of(family: str):
    return SHAPES.get(family, SHAPES["qwen"])


@pytest.fixture(scope="module", params=NEW)
def case(request):
    family = FAMILIES[request.param]
    model = family.build(layers=10)  # deep enough for every default layer (pdrop: 8)
    run(model, family.inputs(model, shapes_of(family.name)[:1]))  # transformers installs its own hooks on first use
    return family, model


def supported(family, kind: str, videos: bool = False) -> list[str]:
    """Methods for ``kind`` ("image" or "video") methods that the family supports (on its video inputs when
    ``videos``)."""
    table = vlprune.support_table()
    ok = [m for m in vlprune.list_methods(kind) if table[m][family.name] != "no"]
    return [m for m in ok if not (videos and image_only(family, m))]


def image_only(family, method: str) -> bool:
    """Whether ``method`` reads a signal that ``family`` gives for images only (a clear error on its videos)."""
    adapter = adapter_class(family.name)
    video_signals = {k: v for k, v in adapter.signals.items() if k not in adapter.image_only}
    return bool(missing_signals(create_selector(method), video_signals))


def check_first_plan(plan, candidates, counts):
    """Exact count per image (``counts[b]``, images of different sizes), everything else (text, LLaVA-NeXT's
    newlines) intact, ascending order. ``candidates`` (B, L): the visual tokens, computed independently of vlprune."""
    for b in range(candidates.shape[0]):
        expected = counts[b]
        assert torch.bincount(plan.image_of[b], minlength=len(expected)).tolist() == expected
        visual = torch.nonzero(candidates[b]).flatten()
        assert torch.equal(plan.visual_rows[b], visual)
        others = torch.nonzero(~candidates[b]).flatten()
        tokens = plan.keep_tokens[b]
        assert torch.equal(tokens, torch.sort(torch.cat([others, visual[plan.keep_visual[b]]])).values)


def run(model, inputs, steps=3):
    """Forward logits and greedy tokens. 1-D models get the positions generate would give a left-padded batch
    (their forward alone would number padding too), so that both calls decide on the same inputs."""
    mrope = "image_grid_thw" in inputs or "video_grid_thw" in inputs
    extra = {} if mrope else {"position_ids": original_positions(inputs["attention_mask"])}
    with torch.no_grad():
        logits = model(**inputs, **extra).logits
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    return logits, out[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("method", vlprune.list_methods("image"))
@pytest.mark.parametrize("budget", [{"keep": 3}, {"ratio": 0.5}], ids=["keep3", "ratio0.5"])
def test_every_method_on_every_family(case, method, budget):
    family, model = case
    check_method(family, model, method, budget, shapes_of(family.name))


@pytest.fixture(scope="module", params=list(VIDEO_FAMILIES))
def video_case(request):
    family = VIDEO_FAMILIES[request.param]
    model = family.build(layers=10)
    run(model, family.inputs(model, video_shapes(family)[:1]))
    return family, model


@pytest.mark.parametrize("method", vlprune.list_methods("image"))
@pytest.mark.parametrize("budget", [{"keep": 3}, {"ratio": 0.5}], ids=["keep3", "ratio0.5"])
def test_every_method_on_qwen_videos(video_case, method, budget):
    """Image methods on video tokens: one budget per video, M-RoPE rows (the temporal one included) kept; a method
    reading a signal the family gives for images only is a clear error when it meets a video."""
    family, model = video_case
    if image_only(family, method) and support(method, family.name) != "no":
        inputs = family.inputs(model, video_shapes(family)[:1])
        before = state(model)
        with vlprune.wrap(model, method, **budget, **TINY_PARAMS.get(method, {})):
            with pytest.raises(ValueError, match="do not map to its video tokens"):
                run(model, inputs)
        assert state(model) == before
        return
    check_method(family, model, method, budget, video_shapes(family))


def reads_the_query(method: str) -> bool:
    """Whether ``method`` reads the caller's question and decoded frames (given here with ``tiny.TINY_CLIP``)."""
    return any(r.name == "query" for r in create_selector(method).requests(0, 4))


def caller_query(family, shapes):
    """``prepare(pruned, samples)`` for :func:`check_method`: a question and each video's decoded frames (random
    pixels, two frames per temporal patch) for those samples."""
    videos = [
        [random_frames(2 * family.frames(size)[0], seed=b + i) for i, size in enumerate(s[2])]
        for b, s in enumerate(shapes)
    ]

    def prepare(pruned, samples):
        pruned.set_query([f"what moves in video {b} ?" for b in samples], videos=[videos[b] for b in samples])

    return prepare


@pytest.mark.parametrize("method", vlprune.list_methods("video"))
@pytest.mark.parametrize("budget", [{"ratio": 0.5}, {"ratio": 0.75}], ids=["ratio0.5", "ratio0.75"])
def test_every_video_method_on_every_video_family(video_case, method, budget, tiny_clip, monkeypatch):
    """Every video method at its defaults on the videos of every family that takes them (InternVL's, whose frames the
    caller names, in test_internvl_video.py): exact count per video, text intact, reference equality, generate()
    against a manual greedy loop, batch equal to single; on a family without its signals, the documented error."""
    family, model = video_case
    shapes = video_shapes(family, DYCOKE_SHAPES)
    prepare = None
    if reads_the_query(method):
        monkeypatch.setitem(TINY_PARAMS, method, {**TINY_PARAMS.get(method, {}), **TINY_CLIP})
        prepare = caller_query(family, shapes)
    check_method(family, model, method, budget, shapes, prepare=prepare)


def test_every_supported_method_is_the_identity_at_keep_all_on_videos(video_case):
    check_identity(*video_case, video_shapes(video_case[0])[:2], "image", videos=True)
    check_identity(*video_case, video_shapes(video_case[0], DYCOKE_SHAPES)[:2], "video", videos=True)


@pytest.mark.parametrize("budget", [{"ratio": 0.75}, {"keep": 9}, "paper"], ids=["ratio0.75", "keep9", "paper-count"])
def test_dycoke_on_qwen_videos(video_case, budget):
    """DyCoke's TTM under the core invariants, on videos of two to four temporal patches."""
    family, model = video_case
    shapes = video_shapes(family, DYCOKE_SHAPES)
    if budget == "paper":  # the paper's own count: first frame of each group whole, int(0.3 N) of the others

        def count(size) -> int:
            frames, n = family.frames(size)
            return n + (frames - 1) * int(0.3 * n)  # frames <= 4: one group

        check_method(family, model, "dycoke", {"ratio": 1.0, "prune_ratio": 0.7}, shapes, count=count)
    else:
        check_method(family, model, "dycoke", budget, shapes)


def test_dycoke_refuses_images_and_budgets_below_its_floor(video_case):
    family, model = video_case
    images = FAMILIES[family.name]
    inputs = images.inputs(model, shapes_of(family.name)[:1])
    with vlprune.wrap(model, "dycoke", keep=3), pytest.raises(ValueError, match="at least two frames"):
        model(**inputs)
    inputs = family.inputs(model, video_shapes(family, DYCOKE_SHAPES)[:1])  # 4 frames x 4 tokens: frame 0 stays whole
    with vlprune.wrap(model, "dycoke", keep=3), pytest.raises(ValueError, match=r"needs keep >= 4 \(ratio >= 0.250\)"):
        model(**inputs)
    with pytest.raises(ValueError, match="dycoke.*llava cannot provide.*no video geometry"):
        vlprune.wrap(FAMILIES["llava"].build(layers=2), "dycoke", keep=8)


def test_a_batch_of_images_and_videos_is_a_clear_error(video_case):
    family, model = video_case
    inputs = family.inputs(model, video_shapes(family)[:1])
    ids = inputs["input_ids"].clone()
    ids[0, 2] = model.config.image_token_id
    with vlprune.wrap(model, "divprune", keep=3), pytest.raises(ValueError, match="images or batches of videos"):
        model(**{**inputs, "input_ids": ids})


def family_greedy(family, model, inputs, plans, steps: int, renumber: bool, back=None) -> torch.Tensor:
    """The manual greedy loop of :func:`reference.greedy` with the family's own positions and vision inputs."""
    return greedy(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        family.pixels(inputs),
        plans,
        steps=steps,
        renumber=renumber,
        positions_fn=lambda i, m: family.positions(model, {**inputs, "input_ids": i, "attention_mask": m}),
        image_kwargs=family.image_kwargs(inputs),
        back=back,
    )


def check_method(family, model, method, budget, shapes, count=None, back=None, prepare=None):
    """The invariants for ``method`` (or a preset, with ``count(size)`` its kept tokens per input) on ``shapes``;
    ``back``: the layer of a stage that also compacts the earlier layers' cache; ``prepare(pruned, samples)`` before
    the calls on those samples of ``shapes`` (the caller's query)."""
    inputs = family.inputs(model, shapes, seed=2)
    candidates, sizes = family.visual_tokens(model, inputs, shapes)
    before = state(model)
    if count is None and vlprune.support_table()[method][family.name] == "no":
        with pytest.raises(ValueError, match=f"method '{method}'.*{family.name}|{family.name}.*'{method}'"):
            vlprune.wrap(model, method, **budget, **TINY_PARAMS.get(method, {}))
        assert state(model) == before
        return
    if count is None:
        stage = vlprune.Stage(method, **budget)
        counts = [[stage.budget(n) for n in sizes[b]] for b in range(len(shapes))]
    else:
        counts = [[count(size) for size in shape[2]] for shape in shapes]
    with vlprune.wrap(model, method, **budget, **TINY_PARAMS.get(method, {})) as pruned:
        if prepare is not None:
            prepare(pruned, list(range(len(shapes))))
        logits, tokens = run(model, inputs)
        plans = list(pruned.plans)
        ids = inputs["input_ids"]
        check_first_plan(plans[0], candidates, counts)
        # forward equals the hand-written loop on the same inputs with the unpruned sequence's positions
        positions = family.positions(model, inputs)
        embeds = embed(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
        stages = [(p.layer, p.keep_tokens, merges_of(p, ids)) for p in plans]
        with torch.no_grad():
            stack = deepstack_of(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
            renumber = pruned.config.positions == "renumber"
            expected = layer_loop(model, embeds, inputs["attention_mask"], positions, stages, renumber, stack)
            expected_tokens = family_greedy(family, model, inputs, plans, tokens.shape[1], renumber, back)
        last = plans[-1].keep_tokens
        real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in last])
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-5)
        assert torch.equal(tokens, expected_tokens)
        # a batch equals each prompt alone
        for b in range(len(shapes)):
            one = family.split(inputs, shapes, b)
            if prepare is not None:
                prepare(pruned, [b])
            logits1, tokens1 = run(model, one)
            assert torch.equal(pruned.plans[0].keep_visual[0], plans[0].keep_visual[b])
            torch.testing.assert_close(logits[b, -1], logits1[0, -1], rtol=1e-4, atol=1e-5)
            n = tokens1.shape[1]  # alone, generation stops at EOS; in the batch the row goes on with padding
            assert torch.equal(tokens1[0], tokens[b, :n]) and not tokens[b, n:].any()
    assert state(model) == before


def test_every_supported_method_is_the_identity_at_keep_all(case):
    check_identity(*case, shapes_of(case[0].name)[:2], "image")


def check_identity(family, model, shapes, kind, videos: bool = False):
    inputs = family.inputs(model, shapes, seed=4)
    reference = run(model, inputs)
    for method in supported(family, kind, videos):
        with vlprune.wrap(model, method, keep=10_000, **TINY_PARAMS.get(method, {})) as pruned:
            got = run(model, inputs)
            assert pruned.plans[0].kept_per_sample == pruned.plans[0].num_visual
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), method


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_qwen2_vl_original_positions_match_the_reference_and_renumbered_ones_differ(method):
    """The GAP finding on position ids: under M-RoPE, renumbering the kept tokens changes the outputs; the default
    keeps every row of each kept token's position, as the reference does, so it cannot silently regress."""
    family = FAMILIES["qwen2_vl"]
    model = family.build(layers=4, seed=1)
    shapes = shapes_of(family.name)[:2]
    inputs = family.inputs(model, shapes, seed=7)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    embeds = embed(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
    outputs = {}
    for positions in ("original", "renumber"):
        with vlprune.wrap(model, method, keep=3, positions=positions) as pruned:
            logits, tokens = run(model, inputs)
            plans = list(pruned.plans)
        renumber = positions == "renumber"
        stages = [(p.layer, p.keep_tokens) for p in plans]
        with torch.no_grad():
            expected = layer_loop(model, embeds, mask, family.positions(model, inputs), stages, renumber=renumber)
            expected_tokens = family_greedy(family, model, inputs, plans, tokens.shape[1], renumber)
        torch.testing.assert_close(logits[:, -1], expected[:, -1], rtol=1e-4, atol=1e-5)
        assert torch.equal(tokens, expected_tokens)
        outputs[positions] = (logits[:, -1], expected[:, -1])
    # renumbered outputs are far outside the tolerance within which the default matches its reference
    assert not torch.allclose(outputs["renumber"][0], outputs["original"][1], rtol=1e-4, atol=1e-5)
    assert (outputs["renumber"][0] - outputs["original"][1]).abs().max() > 20 * 1e-5


def packed_sources(size, pinpoints, side=4, tile_px=56) -> list[tuple[int, int]]:
    """(tile, patch) of each visual token of a LLaVA-NeXT image of ``size`` (H, W) pixels, in the order the model
    packs them, written out by hand: the base tile in raster order, then the rows of the tile grid that survive the
    unpadding (the side that the image's aspect ratio leaves short loses equal margins)."""
    height, width = size
    rows, cols = select_best_resolution(size, pinpoints)
    nh, nw = rows // tile_px, cols // tile_px
    grid_h, grid_w = nh * side, nw * side
    top, bottom, left, right = 0, grid_h, 0, grid_w
    if width / height > grid_w / grid_h:
        margin = (grid_h - round(height * grid_w / width)) // 2
        top, bottom = margin, grid_h - margin
    else:
        margin = (grid_w - round(width * grid_h / height)) // 2
        left, right = margin, grid_w - margin
    out = [(0, p) for p in range(side * side)]
    for r in range(top, bottom):
        for c in range(left, right):
            out.append((1 + (r // side) * nw + c // side, (r % side) * side + c % side))
    return out


def test_llava_next_cls_attention_follows_the_anyres_packing():
    """FasterVLM on LLaVA-NeXT keeps, per image, the top [CLS]-attention patches over all its tiles, scored by the
    tower's own attention maps and mapped to the packed tokens by hand (base tile, unpadded grid, no newlines)."""
    family = FAMILIES["llava_next"]
    model = family.build(layers=2, attn="eager")
    shapes = SHAPES["llava_next"]
    inputs = family.inputs(model, shapes, seed=3)
    sizes = inputs["image_sizes"].tolist()
    tiles = [len({t for t, _ in packed_sources(s, family.pinpoints)}) for s in sizes]
    pixels = torch.cat([family.pixels(inputs)[i, :n] for i, n in enumerate(tiles)])
    with torch.no_grad():
        attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
    cls = attentions[0][:, :, 0, 1:].mean(1)  # feature layer -2 of a 2-layer tower: layer 0's output
    starts = [sum(tiles[:i]) for i in range(len(tiles))]
    scores = [
        torch.stack([cls[start + t, p] for t, p in packed_sources(s, family.pinpoints)])
        for s, start in zip(sizes, starts, strict=True)
    ]
    with vlprune.wrap(model, "fastervlm", keep=5) as pruned:
        run(model, inputs, steps=1)
        per_image = pruned.plans[0]
    with vlprune.wrap(model, "fastervlm", keep=2, per="tile") as pruned:
        run(model, inputs, steps=1)
        per_tile = pruned.plans[0]
    image = 0
    for b, shape in enumerate(shapes):
        offset = 0
        for j in range(len(shape[2])):
            kept = per_image.keep_visual[b][per_image.image_of[b] == j] - offset
            assert torch.equal(kept, torch.sort(torch.topk(scores[image], 5).indices).values)
            # per tile: the top 2 of each tile's own tokens (the base tile and every crop the unpadding left)
            tile_of = torch.tensor([t for t, _ in packed_sources(sizes[image], family.pinpoints)])
            expected = [
                torch.nonzero(tile_of == t).flatten()[torch.topk(scores[image][tile_of == t], 2).indices]
                for t in torch.unique(tile_of)
            ]
            kept = per_tile.keep_visual[b][per_tile.image_of[b] == j] - offset
            assert torch.equal(kept, torch.sort(torch.cat(expected)).values)
            offset += len(scores[image])
            image += 1


def test_per_tile_budgets_on_internvl():
    """InternVL with ``per="tile"``: every tile of a multi-tile image keeps its own budget."""
    family = FAMILIES["internvl"]
    model = family.build(layers=2)
    shapes = SHAPES["internvl"]
    inputs = family.inputs(model, shapes, seed=5)
    with vlprune.wrap(model, "divprune", keep=3, per="tile") as pruned:
        run(model, inputs, steps=1)
        plan = pruned.plans[0]
    for b, shape in enumerate(shapes):
        kept = plan.keep_visual[b]
        tiles = [t for n in shape[2] for t in range(n)]  # one entry per tile, image by image
        assert len(kept) == 3 * len(tiles)
        tile = kept // 16  # 16 tokens per tile, tiles of the sample in order
        assert torch.bincount(tile, minlength=len(tiles)).tolist() == [3] * len(tiles)
