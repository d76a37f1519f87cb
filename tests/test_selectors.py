"""Each selector: exact counts, and its choice against a hand-computed or independently computed expectation."""

import pytest
import torch

import vlprune
from vlprune.selectors.base import top_k
from vlprune.selectors.divprune import max_min_greedy
from vlprune.selectors.shared import lattice
from vlprune.signals import TokenView

from reference import embed, original_positions
from tiny import batch, pixels, prompt


def view(n=16, grid=(4, 4), **signals):
    return TokenView(index=torch.arange(n), grid=grid, image=0, **signals)


def test_top_k_breaks_ties_towards_lower_index():
    assert top_k(torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5]), 2).tolist() == [1, 2]


def test_uniform_lattice_is_hand_computed():
    assert sorted(lattice(4, 4, 4).tolist()) == [5, 7, 13, 15]  # centres of the four 2x2 cells
    assert sorted(lattice(24, 24, 64).tolist())[:3] == [25, 28, 31]  # 8x8 lattice, rows/cols 1, 4, 7: 24+1, 24+4, ...
    assert sorted(lattice(1, 10, 2).tolist()) == [2, 7]
    for k in range(1, 17):
        picks = lattice(4, 4, k)
        assert picks.numel() == k and picks.unique().numel() == k


def test_random_matches_seeded_permutation():
    selector = vlprune.create_selector("random", seed=7)
    expected = torch.randperm(16, generator=torch.Generator().manual_seed(7 + 2))[:5]
    chosen = selector.select(TokenView(index=torch.arange(16), grid=(4, 4), image=2), 5)
    assert torch.equal(chosen, expected)


def test_score_selectors_on_crafted_scores():
    scores = torch.tensor([0.0, 9.0, 1.0, 8.0, 2.0, 7.0])
    v = view(6, None, llm_attention={1: scores}, cls_attention={None: -scores})
    assert sorted(vlprune.create_selector("fastv").select(v, 3).tolist()) == [1, 3, 5]
    assert sorted(vlprune.create_selector("fastervlm").select(v, 2).tolist()) == [0, 2]
    summed = view(6, None, cls_attention={0: scores, 1: torch.tensor([0.0, 0.0, 20.0, 0.0, 0.0, 0.0])})
    assert sorted(vlprune.create_selector("vtc_cls", start_layer=0).select(summed, 2).tolist()) == [1, 2]


@pytest.mark.parametrize(
    "method,params",
    [("random", {}), ("uniform", {}), ("fastervlm", {}), ("vtc_cls", {"start_layer": 0}), ("fastv", {})],
)
@pytest.mark.parametrize(
    "budget", [{"keep": 1}, {"keep": 5}, {"keep": 16}, {"keep": 40}, {"ratio": 0.3}, {"ratio": 1.0}]
)
def test_every_selector_keeps_min_of_budget_and_available(llava, method, params, budget):
    ids, mask = batch([prompt(llava, 2, 3, images=2), prompt(llava, 4, 1, images=1)])
    pv = pixels(3)
    with vlprune.wrap(llava, method, **budget, **params) as pruned, torch.no_grad():
        llava(input_ids=ids, attention_mask=mask, pixel_values=pv)
    per_image = min(budget["keep"], 16) if "keep" in budget else max(1, int(budget["ratio"] * 16 + 0.5))
    plan = pruned.plans[0]
    assert plan.kept_per_sample == [2 * per_image, per_image]
    for b in range(2):
        assert torch.bincount(plan.image_of[b]).tolist() == [per_image] * (plan.num_visual[b] // 16)
        text = torch.nonzero(ids[b] != 100).flatten()
        assert set(text.tolist()) <= set(plan.keep_tokens[b].tolist())


def test_fastv_matches_eager_attention_of_layer_k_minus_1(llava_eager):
    model = llava_eager
    ids, mask = batch([prompt(model, 3, 5, images=1)])
    pv = pixels(1)
    k_layer = 2
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True)
        scores = out.attentions[k_layer - 1][0, :, -1].mean(0)  # last prompt token's row, mean over heads
        visual = torch.nonzero(ids[0] == 100).flatten()
        expected = torch.sort(torch.topk(scores[visual], 5).indices).values
        with vlprune.wrap(model, "fastv", keep=5, layer=k_layer) as pruned:
            model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert torch.equal(pruned.plans[0].keep_visual[0], expected)


@pytest.mark.parametrize(
    "method,params,layers",
    [("fastervlm", {}, [1]), ("fastervlm", {"vision_layer": 0}, [0]), ("vtc_cls", {"start_layer": 0}, [0, 1])],
)
def test_cls_selectors_match_eager_vision_attention(llava, method, params, layers):
    ids, mask = batch([prompt(llava, 3, 5, images=2)])
    pv = pixels(2)
    tower = llava.model.vision_tower
    with torch.no_grad():
        llava.set_attn_implementation({"vision_config": "eager"})
        attentions = tower(pv, output_attentions=True).attentions
        llava.set_attn_implementation({"vision_config": "sdpa"})
        scores = sum(attentions[layer][:, :, 0, 1:].mean(1) for layer in layers)  # (images, 16), CLS row
        expected = torch.cat([torch.sort(torch.topk(s, 4).indices).values + 16 * i for i, s in enumerate(scores)])
        with vlprune.wrap(llava, method, keep=4, **params) as pruned:
            llava(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert torch.equal(pruned.plans[0].keep_visual[0], expected)


def test_fastervlm_default_layer_is_the_feature_layer(llava):
    adapter = vlprune.api.adapter_class("llava")(llava)
    assert adapter.vision_layer(None) == llava.config.vision_config.num_hidden_layers - 2  # feature layer -2


def test_positions_helper_matches_generate_convention():
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    assert original_positions(mask).tolist() == [[1, 1, 0, 1, 2]]


def greedy_on_full_matrix(x: torch.Tensor, k: int) -> list[int]:
    """The greedy max-min rule written out on the full n x n cosine-distance matrix."""
    unit = x / x.norm(dim=-1, keepdim=True)
    d = 1 - unit @ unit.T
    n = len(x)
    nearest = [min(d[i, j].item() for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: nearest[i])]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: min(d[s, j].item() for s in chosen)))
    return chosen


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_divprune_greedy_equals_full_matrix_rule(seed, k):
    x = torch.randn(13, 6, generator=torch.Generator().manual_seed(seed))
    assert max_min_greedy(x, k, chunk=4).tolist() == greedy_on_full_matrix(x, k)


def test_divprune_picks_one_token_per_cluster():
    centres = torch.eye(4)[:3] * 10  # three well separated directions
    noise = 0.01 * torch.randn(15, 4, generator=torch.Generator().manual_seed(0))
    x = centres.repeat_interleave(5, 0) + noise  # tokens 0-4, 5-9, 10-14 are near-duplicates
    chosen = max_min_greedy(x, 3)
    assert sorted(int(c) // 5 for c in chosen) == [0, 1, 2]


def test_a_stage_sees_only_the_signals_it_requested():
    from vlprune.captures import VisionCaptures
    from vlprune.layout import SampleLayout
    from vlprune.resolve import resolve
    from vlprune.schedule import decide
    from vlprune.views import StageInputs

    config = vlprune.PruneConfig([vlprune.Stage("fastv", keep=2, layer=2), vlprune.Stage("fastv", keep=1, layer=4)])

    class Shape:  # just what resolve() reads
        num_layers, vision_depth, model_type, signals = 6, 3, "llava", {"llm_attention": "yes"}
        feature_layer_only = ()

        def check_request(self, request, method):
            pass

    first, second = resolve(config, Shape())
    layout = SampleLayout(torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.long), torch.arange(4), [0], [None])
    rows = torch.arange(6)[None]
    llm = {1: torch.tensor([[0.0, 9, 8, 0, 0, 0]]), 3: torch.tensor([[0.0, 0, 0, 7, 9, 0]])}
    inputs = StageInputs(rows=rows, vision=VisionCaptures(), llm={"llm_attention": llm})
    assert decide(first, inputs, [layout])[2].keep_visual[0].tolist() == [0, 1]  # layer 1's scores
    assert decide(second, inputs, [layout])[2].keep_visual[0].tolist() == [3]  # layer 3's scores


# --- pool -----------------------------------------------------------------------------------------------------------
def test_pooled_grid_and_bands_are_hand_computed():
    from vlprune.selectors.pool import bands, pooled_grid

    assert pooled_grid(24, 24, 64) == (8, 8) and pooled_grid(24, 24, 144) == (12, 12)
    assert pooled_grid(24, 24, 192) == (12, 16)  # 12x16 and 16x12 distort equally; the first wins
    assert pooled_grid(4, 4, 5) == (2, 3)  # no fitting factor pair of 5: the smallest grid with >= 5 cells
    assert bands(24, 8) == [(i * 3, i * 3 + 3) for i in range(8)]
    assert bands(5, 2) == [(0, 2), (2, 5)]


def test_pool_equals_avg_pool2d_end_to_end(llava):
    ids, mask = batch([prompt(llava, 3, 4, images=1)])
    pv = pixels(1)
    captured = []
    with vlprune.wrap(llava, "pool", keep=4) as pruned, torch.no_grad():
        handle = llava.model.language_model.layers[0].register_forward_pre_hook(  # runs after vlprune's own
            lambda module, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
        llava(input_ids=ids, attention_mask=mask, pixel_values=pv)
        handle.remove()
    with torch.no_grad():
        visual = embed(llava, ids, pv)[0, ids[0] == 100]  # (16, D), raster order of the 4x4 grid
    grid = visual.T.reshape(1, -1, 4, 4)
    expected = torch.nn.functional.avg_pool2d(grid, 2).reshape(visual.shape[1], 4).T  # 4 cells, raster order
    plan = pruned.plans[0]
    assert plan.keep_visual[0].tolist() == [0, 2, 8, 10]  # each 2x2 window's centre (upper-left of the middle)
    assert plan.merged_into[0].tolist() == [0, 0, 2, 2, 0, 0, 2, 2, 8, 8, 10, 10, 8, 8, 10, 10]
    assert torch.equal(plan.merge_weight[0], torch.full((16,), 0.25))
    first = int((ids[0] == 100).nonzero()[0])  # text before the image; no padding in a single prompt
    torch.testing.assert_close(captured[0][0, first : first + 4], expected, rtol=1e-6, atol=1e-6)


# --- dart -----------------------------------------------------------------------------------------------------------
def test_dart_pivots_and_duplicates_are_hand_computed():
    from vlprune.selectors.dart import dart_pick

    # 6 visual tokens; keys give token 4 the largest L1 norm (image pivot), text token 1 the text pivot.
    keys = torch.tensor([[1.0], [2.0], [0.5], [1.5], [9.0], [0.1]])
    text_keys = torch.tensor([[1.0], [-5.0]])
    e = torch.eye(3)
    hidden = torch.stack([e[0], e[0] + 0.1 * e[1], e[1], e[2], e[0], e[0] + e[2]])
    text_hidden = torch.stack([e[1], e[1]])
    # pivot 4 (= e0): least similar non-pivots are 2 (e1, cos 0) and 3 (e2, cos 0), ties to the lower index -> 2;
    # then text pivot (e1): among {0, 1, 3, 5}, lowest cosine to e1 is 0 (0) or 3 (0) or 5 (0) -> 0.
    chosen = dart_pick(hidden, keys, text_hidden, text_keys, image_pivots=1, text_pivots=1, per_pivot=[1, 1])
    assert chosen.tolist() == [4, 2, 0]
    chosen = dart_pick(hidden, keys, text_hidden, text_keys, image_pivots=1, text_pivots=1, per_pivot=[2, 1])
    assert chosen.tolist() == [4, 2, 3, 0]


def test_dart_counts_exact_and_as_the_paper():
    text = TokenView(index=torch.arange(5), grid=None, image=0)
    v = view(576, (24, 24), text=text)
    assert vlprune.create_selector("dart").count(v, 128) == 128
    assert vlprune.create_selector("dart", exact=False).count(v, 128) == 132
    assert vlprune.create_selector("dart", exact=False).count(v, 64) == 68
    assert vlprune.create_selector("dart", exact=False).count(v, 192) == 196


def test_dart_keys_and_norm_match_eager_layer_k_minus_1(llava_eager):
    from vlprune.selectors.dart import dart_pick

    model = llava_eager
    ids, mask = batch([prompt(model, 3, 6, images=1)])
    pv = pixels(1)
    captured = {}
    attention = model.model.language_model.layers[1].self_attn
    handle = attention.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_hidden_states=True)
    handle.remove()
    lm = model.model.language_model
    hidden = out.hidden_states[2][0]  # output of layer 1 = input of layer 2
    normed = lm.norm(hidden)
    # post-RoPE keys of layer 1, repeated to the 4 query heads, flattened
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.arange(ids.shape[1])[None]
    cos, sin = lm.rotary_emb(hidden[None], position_ids=positions)
    k = captured["k"].view(1, -1, 2, 8).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    keys = k.repeat_interleave(2, dim=1).transpose(1, 2).reshape(ids.shape[1], -1)
    visual = (ids[0] == 100).nonzero().flatten()
    after = torch.arange(visual[-1] + 1, ids.shape[1])
    expected = dart_pick(normed[visual], keys[visual], normed[after], keys[after], 4, 4, [1] * 8)
    with vlprune.wrap(model, "dart", keep=12) as pruned, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert pruned.plans[0].keep_visual[0].tolist() == sorted(expected.tolist())


# --- pdrop ----------------------------------------------------------------------------------------------------------
def test_pdrop_scores_are_layer_l_attention_of_the_last_token(llava_eager):
    model = llava_eager
    ids, mask = batch([prompt(model, 3, 5, images=1)])
    pv = pixels(1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True)
    visual = (ids[0] == 100).nonzero().flatten()
    scores = out.attentions[2][0, :, -1].mean(0)[visual]  # layer 2 itself, as computed from its own input
    expected = sorted(top_k(scores, 5).tolist())
    with vlprune.wrap(model, "pdrop", keep=5, layer=2) as pruned, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    assert pruned.plans[0].keep_visual[0].tolist() == expected


# --- zoo ------------------------------------------------------------------------------------------------------------
def test_zoo_sensitivity_of_a_linear_projector_is_analytic():
    from vlprune.selectors.zoo import sensitivity

    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(5, 8)
    s = sensitivity(x, lambda v: 3.0 * v @ q.T, directions=16, step=0.01, seed=1)  # ||3 Q u|| = 3 for unit u
    torch.testing.assert_close(s, torch.full((5,), 3.0), rtol=1e-4, atol=1e-4)
    # elementwise square: the central difference is exact, 2 x * u; constant rows a give ||2 a u|| = 2 |a|
    rows = torch.tensor([0.5, -2.0, 1.0])[:, None].expand(3, 8)
    s = sensitivity(rows, lambda v: v * v, directions=8, step=0.01, seed=0)
    torch.testing.assert_close(s, torch.tensor([1.0, 4.0, 2.0]), rtol=1e-4, atol=1e-4)


def test_zoo_greedy_is_hand_computed():
    from vlprune.selectors.zoo import sensitivity_diversity_greedy

    scores = torch.tensor([1.0, 3.0, 2.9, 2.0])  # normalised: 0, 1, 0.95, 0.5
    e = torch.eye(2)
    features = torch.stack([e[1], e[0], e[0], e[1]])
    # first the most sensitive (1); then 2 has cos 1 to it -> gain 0; 3 is orthogonal -> gain 0.5; 0 -> 0
    assert sensitivity_diversity_greedy(scores, features, 2).tolist() == [1, 3]


# --- visionzip ------------------------------------------------------------------------------------------------------
def test_visionzip_merge_arithmetic_is_hand_computed():
    from vlprune.selectors.visionzip import split_budget

    assert [split_budget(k, None, None) for k in (192, 128, 64)] == [(162, 30), (108, 20), (54, 10)]
    n = 8
    attention = torch.tensor([0.0, 9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0])  # patches 1 and 4 dominate
    e = torch.eye(2)
    # remaining patches 0, 2, 3, 5, 6, 7; 2 contextual targets at stride 3: patches 0 and 5
    keys = torch.stack([e[0], e[0], e[0], e[1], e[0], e[1], e[0], e[1]])
    hidden = torch.arange(n, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])
    cls = torch.tensor([100.0, 100.0])
    v = view(n, None, cls_attention={None: attention}, vision_keys=keys, vision_hidden=hidden, cls_hidden=cls)
    selection = vlprune.create_selector("visionzip", dominant=3, contextual=2).select(v, 5)
    outputs = selection.apply(torch.cat([hidden, cls[None]]))
    # [CLS], patch 1, patch 4, target 0 + mean(2, 6) (keys e0), target 5 + mean(3, 7) (keys e1)
    expected = torch.stack([cls, hidden[1], hidden[4], hidden[0] + (hidden[2] + hidden[6]) / 2,
                            hidden[5] + (hidden[3] + hidden[7]) / 2])  # fmt: skip
    assert selection.keep.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(outputs, expected)


def test_visionzip_end_to_end_matches_eager_tower_outputs(llava_eager):
    model = llava_eager
    ids, mask = batch([prompt(model, 2, 3, images=1)])
    pv = pixels(1)
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pv, output_hidden_states=True, output_attentions=True)
        layer = tower.vision_model.encoder.layers[1] if hasattr(tower, "vision_model") else tower.encoder.layers[1]
        feature = out.hidden_states[-2][0]  # (17, 32): [CLS] + 16 patches, output of layer 1
        keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[1][0])).view(17, 4, 8).mean(1)
        attention = out.attentions[1][0, :, 0, 1:].mean(0)
        v = view(16, (4, 4), cls_attention={None: attention}, vision_keys=keys[1:], vision_hidden=feature[1:],
                 cls_hidden=feature[0])  # fmt: skip
        selection = vlprune.create_selector("visionzip").select(v, 6)
        merged = selection.apply(torch.cat([feature[1:], feature[:1]]))
        expected = model.model.multi_modal_projector(merged)
    with vlprune.wrap(model, "visionzip", keep=6) as pruned, torch.no_grad():
        captured = {}
        handle = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: captured.update(e=kw["inputs_embeds"]), with_kwargs=True
        )
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        handle.remove()
    visual = (ids[0] == 100).nonzero().flatten()
    torch.testing.assert_close(captured["e"][0, visual[:6]], expected, rtol=1e-5, atol=1e-5)
    assert pruned.plans[0].keep_visual[0].tolist() == list(range(6)) and pruned.plans[0].space == "vision"


# --- sparsevlm ------------------------------------------------------------------------------------------------------
def test_sparsevlm_rater_choice_and_recycling_counts_are_hand_computed():
    from vlprune.selectors.shared import dpc_knn
    from vlprune.selectors.sparsevlm import choose_raters, recycled_counts

    visual = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[3.0, 0.0], [0.0, 1.0], [3.0, 0.0]])  # softmax over text: 0.488, 0.024, 0.488 > 1/3
    m = torch.softmax(torch.tensor([3.0, 0.0, 3.0]), 0)
    assert choose_raters(visual, text).tolist() == torch.nonzero(m > m.mean()).flatten().tolist() == [0, 2]
    assert recycled_counts(276, 0.3) == (83, 9)  # 576 -> 300: int(82.8) + 1 recycled, int(8.3) + 1 clusters
    assert recycled_counts(0, 0.3) == (0, 0) and recycled_counts(3, 0.3) == (1, 1)
    selector = vlprune.create_selector("sparsevlm")
    kept, recycled, clusters = selector.split(576, 192)
    assert kept + clusters == 192 and (recycled, clusters) == recycled_counts(576 - kept, 0.3)
    assert vlprune.create_selector("sparsevlm", exact=False).split(576, 300) == (300, 83, 9)
    # two tight, far-apart groups: each group's densest point is a centre, and every point joins its own group
    x = torch.tensor([0.0, 0.01, 0.03, 0.06, 10.0, 10.02, 10.05])[:, None]
    centres, assignment = dpc_knn(x, 2, k=3)
    assert sorted(centres.tolist()) == [1, 5]
    assert assignment[centres].tolist() == [0, 1]
    assert len(set(assignment[:4].tolist())) == 1 and len(set(assignment[4:].tolist())) == 1
    assert assignment[0] != assignment[4]


def test_sparsevlm_scores_and_recycled_values(llava_eager):
    model = llava_eager
    ids, mask = batch([prompt(model, 3, 6, images=1)])
    pv = pixels(1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, output_attentions=True,
                    output_hidden_states=True)  # fmt: skip
    from vlprune.selectors.sparsevlm import choose_raters

    visual = (ids[0] == 100).nonzero().flatten()
    after = torch.arange(visual[-1] + 1, ids.shape[1])
    embeds = embed(model, ids, pv)[0]
    raters = after[choose_raters(embeds[visual], embeds[after])]
    scores = out.attentions[1][0].mean(0)[raters][:, visual].mean(0)  # layer L-1 = 1 for a stage at layer 2
    with vlprune.wrap(model, "sparsevlm", keep=8, layer=2) as pruned, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    plan = pruned.plans[0]
    kept, recycled, clusters = vlprune.create_selector("sparsevlm").split(16, 8)
    top = torch.sort(scores, descending=True, stable=True).indices
    assert set(top[:kept].tolist()) <= set(plan.keep_visual[0].tolist())
    into = plan.merged_into[0]
    pool = top[kept : kept + recycled]
    assert int((into >= 0).sum()) == kept + recycled and set(torch.nonzero(into >= 0).flatten().tolist()) == set(
        top[: kept + recycled].tolist()
    )
    for target in set(into[pool].tolist()):  # each recycled token is its cluster's mean
        members = torch.nonzero(into == target).flatten()
        torch.testing.assert_close(plan.merge_weight[0][members], torch.full((members.numel(),), 1 / members.numel()))


def release_dart(states: torch.Tensor, keys: torch.Tensor, start: int, length: int, per_pivot: int) -> set[int]:
    """DART's official selection transcribed: pivots by key L1 norm (4 image, 4 text after the image), kept in a
    Python set of sequence positions and visited in that set's order; each takes the ``per_pivot`` unpicked image
    tokens least cosine-similar to it. Returns the kept image tokens' sequence positions."""
    image = (keys[start : start + length].abs().sum(-1).topk(4).indices + start).tolist()
    query = (keys[start + length :].abs().sum(-1).topk(4).indices + start + length).tolist()
    pivots = set(image + query)
    valid = set(range(start, start + length)) - set(image)
    for item in list(pivots):
        candidates = list(valid)
        similarity = -torch.nn.functional.cosine_similarity(states[item], states[candidates], dim=-1)
        picked = [candidates[i] for i in similarity.topk(per_pivot).indices.tolist()]
        pivots.update(picked)
        valid.difference_update(picked)
    return pivots - set(query)


@pytest.mark.parametrize("start", [5, 35])
def test_dart_release_pivot_order_matches_the_release(start):
    """pivot_order="release" visits the pivots as the release's set of positions does; on these inputs the fixed
    order keeps other tokens (later pivots see different unpicked tokens)."""
    from vlprune.selectors.dart import dart_pick

    g = torch.Generator().manual_seed(3)
    n, t, d = 48, 9, 16
    states = torch.randn(start + n + t, d, generator=g)
    keys = torch.randn(start + n + t, d, generator=g)
    image, text = slice(start, start + n), slice(start + n, None)
    positions = (torch.arange(n) + start, torch.arange(t) + start + n)
    args = (states[image], keys[image], states[text], keys[text], 4, 4, 5)
    release = dart_pick(*args, positions=positions)
    assert set((release + start).tolist()) == release_dart(states, keys, start, n, 5)
    assert set(dart_pick(*args).tolist()) != set(release.tolist())


def test_dart_release_order_reads_positions_in_the_unpadded_prompt(llava, monkeypatch):
    """Through wrap(), the release order sees each sample's positions as a batch of one would: input rows minus the
    sample's left padding (the image tokens and the text after them)."""
    from vlprune.selectors import dart

    seen = []
    original = dart.dart_pick
    monkeypatch.setattr(dart, "dart_pick", lambda *a, positions=None: seen.append(positions) or original(*a))
    prompts = [prompt(llava, 3, 6, images=1), prompt(llava, 1, 2, images=1, seed=1)]
    ids, mask = batch(prompts)
    with vlprune.wrap(llava, "dart", keep=8, layer=1, pivot_order="release"), torch.no_grad():
        llava(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    for p, (image, text) in zip(prompts, seen, strict=True):
        row = torch.tensor(p)
        visual = (row == 100).nonzero().flatten()
        assert image.tolist() == visual.tolist()
        assert text.tolist() == list(range(int(visual[-1]) + 1, len(p)))


def test_scoring_selectors_keep_their_top_scores_and_fit_small_models():
    """FastV, PDrop, FasterVLM and VTC-CLS only define a score: the core's ``select`` keeps its top ``keep`` (ties to
    the lower index); VTC-CLS alone changes a default for a small tower (it has no layer 16 to start from)."""
    from vlprune.registry import selector_class
    from vlprune.selectors.base import ScoringSelector, Selector

    scoring = sorted(m for m in vlprune.list_methods() if issubclass(selector_class(m), ScoringSelector))
    assert scoring == ["fastervlm", "fastv", "pdrop", "vtc_cls"]
    score = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.9])
    view = TokenView(index=torch.arange(5), grid=None, image=0, llm_attention={1: score}, incoming_attention=score)
    assert vlprune.create_selector("fastv").select(view, 3).tolist() == [4, 1, 2]
    assert vlprune.create_selector("pdrop").select(view, 2).tolist() == [4, 1]
    assert selector_class("vtc_cls").small_model_params(4) == {"start_layer": 0}
    assert selector_class("vtc_cls").small_model_params(24) == {} == Selector.small_model_params(4)
