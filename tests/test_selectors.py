"""Each selector: exact counts, and its choice against a hand-computed or independently computed expectation."""

import pytest
import torch

import vlprune
from vlprune.selectors.base import top_k
from vlprune.selectors.divprune import max_min_greedy
from vlprune.selectors.uniform import lattice
from vlprune.signals import TokenView

from reference import original_positions
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
    from vlprune.schedule import SampleLayout, StageInputs, decide, resolve

    config = vlprune.PruneConfig([vlprune.Stage("fastv", keep=2, layer=2), vlprune.Stage("fastv", keep=1, layer=4)])

    class Shape:  # just what resolve() reads
        num_layers, vision_depth, model_type = 6, 3, "llava"

        def check_request(self, request, method):
            pass

    first, second = resolve(config, Shape())
    layout = SampleLayout(torch.tensor([1, 2, 3, 4]), torch.zeros(4, dtype=torch.long), torch.arange(4), [0], [None])
    rows = torch.arange(6)[None]
    llm = {1: torch.tensor([[0.0, 9, 8, 0, 0, 0]]), 3: torch.tensor([[0.0, 0, 0, 7, 9, 0]])}
    inputs = StageInputs(rows=rows, vision={}, llm=llm)
    assert decide(first, inputs, [layout])[2].keep_visual[0].tolist() == [0, 1]  # layer 1's scores
    assert decide(second, inputs, [layout])[2].keep_visual[0].tolist() == [3]  # layer 3's scores
