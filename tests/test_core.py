"""Core invariants of wrap(): identity at keep-all, equality with hand-written references, generate vs a manual
greedy loop, batches, positions."""

import pytest
import torch

import vlprune

from reference import embed, greedy, layer_loop, original_positions
from tiny import batch, pixels, prompt

PRE_LLM = [("random", {}), ("uniform", {}), ("fastervlm", {}), ("vtc_cls", {"start_layer": 0}), ("divprune", {})]
IN_LLM = [("fastv", {"layer": 2}), ("fastv", {"layer": 1}), ("random", {"layer": 3}), ("fastervlm", {"layer": 2})]
ALL = PRE_LLM + IN_LLM


def inputs(model, lengths=((3, 4, 1),), seed=0):
    prompts = [prompt(model, before, after, images, seed=seed + i) for i, (before, after, images) in enumerate(lengths)]
    ids, mask = batch(prompts)
    pv = torch.cat([pixels(images, seed=seed + i) for i, (_, _, images) in enumerate(lengths)])
    return ids, mask, pv


def run(model, ids, mask, pv, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw).logits


def generate(model, ids, mask, pv, steps=4):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", ALL)
def test_keep_all_is_bit_identical(request, attn, method, params):
    model = request.getfixturevalue("llava" if attn == "sdpa" else "llava_eager")
    ids, mask, pv = inputs(model, ((3, 4, 1), (1, 2, 2)))
    ref_logits, ref_tokens = run(model, ids, mask, pv), generate(model, ids, mask, pv)
    with vlprune.wrap(model, method, keep=1000, **params) as pruned:
        logits, tokens = run(model, ids, mask, pv), generate(model, ids, mask, pv)
        assert pruned.plans[0].kept_per_sample == pruned.plans[0].num_visual == [16, 32]
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", PRE_LLM)
def test_pre_llm_equals_language_model_on_gathered_embeddings(request, attn, method, params):
    model = request.getfixturevalue("llava" if attn == "sdpa" else "llava_eager")
    ids, mask, pv = inputs(model, ((3, 4, 1), (1, 2, 2), (5, 1, 1)))
    with vlprune.wrap(model, method, keep=5, **params) as pruned:
        logits = run(model, ids, mask, pv)
        plan = pruned.plans[0]
    with torch.no_grad():
        embeds = embed(model, ids, pv)
        positions = original_positions(mask)
        length = max(len(k) for k in plan.keep_tokens)
        rows = [torch.cat([torch.zeros(length - len(k), dtype=torch.long), k]) for k in plan.keep_tokens]
        valid = torch.stack([torch.arange(length) >= length - len(k) for k in plan.keep_tokens])
        take = lambda t: torch.stack([t[b, r] for b, r in enumerate(rows)])  # noqa: E731
        kept_mask = take(mask.bool()) & valid
        out = model.model.language_model(
            inputs_embeds=take(embeds),
            attention_mask=kept_mask.long(),
            position_ids=take(positions).masked_fill(~valid, 1),
        )
        expected = model.lm_head(out.last_hidden_state)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[kept_mask], expected[kept_mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,params", IN_LLM)
def test_in_llm_equals_hand_written_layer_loop(request, attn, method, params):
    model = request.getfixturevalue("llava" if attn == "sdpa" else "llava_eager")
    ids, mask, pv = inputs(model, ((3, 4, 1), (1, 2, 2)))
    with vlprune.wrap(model, method, keep=3, **params) as pruned:
        logits = run(model, ids, mask, pv)
        plan = pruned.plans[0]
    assert plan.layer == params["layer"]
    with torch.no_grad():
        expected = layer_loop(
            model, embed(model, ids, pv), mask, original_positions(mask), [(plan.layer, plan.keep_tokens)]
        )
    real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in plan.keep_tokens])
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "method,params", [("random", {}), ("fastervlm", {}), ("fastv", {"layer": 2}), ("random", {"layer": 1})]
)
@pytest.mark.parametrize("shapes", [((3, 4, 1),), ((3, 4, 1), (1, 2, 2), (6, 1, 1))], ids=["single", "batch"])
def test_generate_equals_manual_greedy_loop(request, attn, method, params, shapes):
    model = request.getfixturevalue("llava" if attn == "sdpa" else "llava_eager")
    ids, mask, pv = inputs(model, shapes, seed=3)
    with vlprune.wrap(model, method, keep=4, **params) as pruned:
        tokens = generate(model, ids, mask, pv, steps=5)
        plan = pruned.plans[0]
    with torch.no_grad():
        expected = greedy(model, ids, mask, pv, [plan], steps=5)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize(
    "method,params", [("fastv", {"layer": 2}), ("fastervlm", {}), ("uniform", {}), ("random", {"layer": 1})]
)
def test_batch_equals_each_prompt_alone(llava, method, params):
    shapes = ((3, 4, 1), (1, 2, 2), (7, 3, 1))
    ids, mask, pv = inputs(llava, shapes, seed=5)
    with vlprune.wrap(llava, method, keep=6, **params) as pruned:
        logits, tokens = run(llava, ids, mask, pv), generate(llava, ids, mask, pv, steps=5)
        plan = pruned.plans[0]
        first = 0
        for b, shape in enumerate(shapes):
            ids1, mask1, pv1 = inputs(llava, (shape,), seed=5 + b)
            pv1 = pv[first : first + shape[2]]
            first += shape[2]
            logits1, tokens1 = run(llava, ids1, mask1, pv1), generate(llava, ids1, mask1, pv1, steps=5)
            assert torch.equal(pruned.plans[0].keep_visual[0], plan.keep_visual[b])
            pad = ids.shape[1] - ids1.shape[1]
            kept = plan.keep_tokens[b]
            assert torch.equal(pruned.plans[0].keep_tokens[0] + pad, kept[kept >= pad])  # the rest is padding
            torch.testing.assert_close(logits[b, -1], logits1[0, -1], rtol=1e-4, atol=1e-5)
            assert torch.equal(tokens[b], tokens1[0])


def test_plans_keep_text_and_order(llava):
    ids, mask, pv = inputs(llava, ((3, 4, 1), (1, 2, 2)))
    with vlprune.wrap(llava, "random", keep=3) as pruned:
        run(llava, ids, mask, pv)
    plan = pruned.plans[0]
    for b in range(ids.shape[0]):
        visual = torch.nonzero(ids[b] == 100).flatten()
        text = torch.nonzero(ids[b] != 100).flatten()
        tokens = plan.keep_tokens[b]
        assert torch.equal(tokens, torch.sort(torch.cat([text, visual[plan.keep_visual[b]]])).values)
        assert bool((tokens[1:] > tokens[:-1]).all())
        assert plan.image_of[b].tolist() == sorted(plan.image_of[b].tolist())
        assert torch.bincount(plan.image_of[b]).tolist() == [3] * (len(visual) // 16)


def test_no_images_runs_unchanged(llava):
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = llava(input_ids=ids).logits
        ref_tokens = llava.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    with vlprune.wrap(llava, "fastv", keep=2) as pruned:
        with torch.no_grad():
            assert torch.equal(llava(input_ids=ids).logits, ref)
            assert torch.equal(llava.generate(input_ids=ids, max_new_tokens=4, do_sample=False), ref_tokens)
        assert pruned.plans[0].num_visual == [0]


@pytest.mark.parametrize("layer", [0, 2])
def test_original_and_renumbered_positions(llava, layer):
    ids, mask, pv = inputs(llava, ((3, 4, 1), (1, 2, 2)), seed=7)
    results = {}
    for positions in ("original", "renumber"):
        with vlprune.wrap(llava, "uniform", keep=4, layer=layer, positions=positions) as pruned:
            logits, tokens = run(llava, ids, mask, pv), generate(llava, ids, mask, pv, steps=5)
            plan = pruned.plans[0]
        renumber = positions == "renumber"
        with torch.no_grad():
            expected = layer_loop(
                llava,
                embed(llava, ids, pv),
                mask,
                original_positions(mask),
                [(layer, plan.keep_tokens)],
                renumber=renumber,
            )
            expected_tokens = greedy(llava, ids, mask, pv, [plan], steps=5, renumber=renumber)
        real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in plan.keep_tokens])
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)
        assert torch.equal(tokens, expected_tokens)
        results[positions] = logits
    # The same tokens are kept; only their rotary positions differ, so the outputs must differ.
    assert not torch.allclose(results["original"][:, -1], results["renumber"][:, -1], atol=1e-4)


def test_forward_without_cache_uses_explicit_masks(llava):
    ids, mask, pv = inputs(llava, ((3, 4, 1),))
    with vlprune.wrap(llava, "random", keep=3, layer=1) as pruned:
        a = run(llava, ids, mask, pv, use_cache=False)
        b = run(llava, ids, None, pv, use_cache=False)
        plan = pruned.plans[0]
    expected = layer_loop(llava, embed(llava, ids, pv), mask, original_positions(mask), [(1, plan.keep_tokens)])
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_multi_stage_schedule_equals_reference(request, attn):
    model = request.getfixturevalue("llava" if attn == "sdpa" else "llava_eager")
    ids, mask, pv = inputs(model, ((3, 4, 1), (1, 2, 2)), seed=11)
    config = vlprune.PruneConfig([vlprune.Stage("uniform", keep=9, layer=0), vlprune.Stage("fastv", keep=3, layer=2)])
    with vlprune.wrap(model, config) as pruned:
        logits, tokens = run(model, ids, mask, pv), generate(model, ids, mask, pv, steps=5)
        plans = list(pruned.plans)
    assert [p.layer for p in plans] == [0, 2]
    assert plans[0].kept_per_sample == [9, 18] and plans[1].kept_per_sample == [3, 6]
    for first, second in zip(plans[0].keep_tokens, plans[1].keep_tokens, strict=True):
        assert set(second.tolist()) <= set(first.tolist())
    stages = [(p.layer, p.keep_tokens) for p in plans]
    with torch.no_grad():
        expected = layer_loop(model, embed(model, ids, pv), mask, original_positions(mask), stages)
        expected_tokens = greedy(model, ids, mask, pv, plans, steps=5)
    real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in plans[1].keep_tokens])
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


def test_a_token_merged_into_several_kept_tokens(llava):
    """The pair form of a Selection (``source``): a token may feed several kept tokens, as FastVID's merging does.
    The outputs equal the hand-written loop with each target the weighted sum of its contributions; the plan lists
    every contribution and names, per token, the target it weighs most in."""
    from vlprune.registry import _SELECTORS, register_selector
    from vlprune.selectors.base import Selection, Selector

    from reference import merges_of

    @register_selector("test_pairs")
    class Pairs(Selector):  # keeps candidates 0 and 1; every other one goes into both, with weights 0.25 and 0.75
        summary = "test only"

        def select(self, view, keep):
            n, rest = view.n, torch.arange(2, view.n)
            source = torch.cat([torch.tensor([0, 1]), rest, rest])
            into = torch.cat([torch.tensor([0, 1]), torch.zeros(n - 2, dtype=torch.long), torch.ones(n - 2).long()])
            weight = torch.cat([torch.ones(2), torch.full((n - 2,), 0.25), torch.full((n - 2,), 0.75)])
            return Selection(torch.tensor([0, 1]), into, weight, source)

    try:
        ids, mask, pv = inputs(llava, ((3, 4, 1), (1, 2, 2)))
        with vlprune.wrap(llava, "test_pairs", keep=2) as pruned:
            logits = run(llava, ids, mask, pv)
            plan = pruned.plans[0]
        n = plan.num_visual[0]
        source, target, weight = plan.merge_pairs[0]
        assert len(source) == 2 + 2 * (n - 2) and set(target.tolist()) == {0, 1}
        assert plan.merged_into[0].tolist() == [0, 1] + [1] * (n - 2)  # the larger of each token's two weights
        assert plan.merge_weight[0].tolist() == [1, 1] + [0.75] * (n - 2)
        merges = merges_of(plan, ids)
        assert [len(sources) for _, sources in merges[0]] == [n - 1, n - 1]
        stages = [(0, plan.keep_tokens, merges)]
        with torch.no_grad():
            expected = layer_loop(llava, embed(llava, ids, pv), mask, original_positions(mask), stages)
        real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in plan.keep_tokens])
        torch.testing.assert_close(logits[real], expected[real], rtol=1e-5, atol=1e-5)
        sources = torch.randn(5, 3)  # Selection.apply: the same sums
        selection = Pairs().select(type("View", (), {"n": 5})(), 2)
        applied = selection.apply(sources)
        torch.testing.assert_close(applied[1], sources[1] + 0.75 * sources[2:].sum(0))
        bad = Selection(torch.tensor([0, 1]), selection.into, selection.weight, selection.source + 5)
        from vlprune.schedule import check_selection

        with pytest.raises(RuntimeError, match="merge map that does not fit 5 sources"):
            check_selection("test_pairs", bad, 5, 5, 2)
    finally:
        _SELECTORS.pop("test_pairs", None)
