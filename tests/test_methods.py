"""Registry-wide: every method, and every shipped preset, under the core invariants — exact kept count, text intact
and in order, forward equal to a hand-written layer loop (original or renumbered positions, merges applied),
identity at keep-all, generate equal to a manual greedy loop, a batch equal to each prompt alone."""

import pytest
import torch

import vlprune

from reference import embed, greedy, layer_loop, merges_of, original_positions
from tiny import IMAGE, batch, pixels, prompt, tiny_llava

# Parameters that fit the tiny towers (at most 4 layers), as each method states them; every other default is its own.
TINY_PARAMS = {
    m: params for m in vlprune.list_methods() if (params := vlprune.registry.selector_class(m).small_model_params(4))
}
SHAPES = ((3, 4, 1), (1, 2, 2), (6, 3, 1))  # (text before, text after each image, images) per prompt


@pytest.fixture(scope="module")
def deep():
    return tiny_llava("sdpa", layers=10)  # deep enough for every default layer (pdrop: 8)


@pytest.fixture(scope="module")
def llava15():
    """LLaVA-1.5's geometry at tiny widths: 576 tokens per image, 24 CLIP layers, 32 decoder layers."""
    return tiny_llava("sdpa", layers=32, side=336, vision_layers=24)


def make_inputs(model, shapes, seed=0, side=56):
    prompts = [prompt(model, before, after, images, seed=seed + i) for i, (before, after, images) in enumerate(shapes)]
    ids, mask = batch(prompts)
    pv = torch.cat([pixels(images, seed=seed + i, side=side) for i, (_, _, images) in enumerate(shapes)])
    return ids, mask, pv


class Capture:
    """Records the language model's input embeddings during a wrapped forward (vision-space merges change them)."""

    def __init__(self, model):
        self.embeds = None
        self.handle = model.model.language_model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if self.embeds is None:
            self.embeds = kwargs["inputs_embeds"].detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def forward(model, ids, mask, pv):
    with torch.no_grad(), Capture(model) as capture:
        positions = original_positions(mask)  # as generate numbers a left-padded batch
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pv, position_ids=positions).logits
    return logits, capture.embeds


def generate(model, ids, mask, pv, steps=3):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=pv, max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :]


def check_plans(plans, ids, per_image: list[int], tokens_per_image: int):
    """Exact counts per image, text intact, ascending order, each stage's tokens within the previous stage's."""
    previous = None
    for plan, count in zip(plans, per_image, strict=True):
        for b in range(ids.shape[0]):
            visual = torch.nonzero(ids[b] == IMAGE).flatten()
            text = torch.nonzero(ids[b] != IMAGE).flatten()
            assert torch.bincount(plan.image_of[b]).tolist() == [count] * (len(visual) // tokens_per_image)
            tokens = plan.keep_tokens[b]
            assert torch.equal(tokens, torch.sort(torch.cat([text, visual[plan.keep_visual[b]]])).values)
            assert bool((tokens[1:] > tokens[:-1]).all())
            if previous is not None:
                assert set(tokens.tolist()) <= set(previous[b].tolist())
        previous = plan.keep_tokens


def same_plans(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) for p, q in zip(a, b, strict=True) for x, y in zip(p.keep_tokens, q.keep_tokens, strict=True)
    )


def check_reference(model, ids, mask, pv, plans, logits, embeds, tokens, renumber):
    """Forward against the hand-written loop, generate against the manual greedy loop."""
    vision = any(p.space == "vision" for p in plans)
    prompt_embeds = embeds if vision else embed(model, ids, pv)
    stages = [(p.layer, p.keep_tokens, merges_of(p, ids)) for p in plans]
    with torch.no_grad():
        expected = layer_loop(model, prompt_embeds, mask, original_positions(mask), stages, renumber)
        expected_tokens = greedy(
            model, ids, mask, pv, plans, steps=tokens.shape[1], renumber=renumber, embeds=embeds if vision else None
        )
    last = plans[-1].keep_tokens
    real = torch.stack([torch.arange(logits.shape[1]) >= logits.shape[1] - len(k) for k in last])
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("method", vlprune.list_methods("image"))
@pytest.mark.parametrize("budget", [{"keep": 3}, {"keep": 10}, {"ratio": 0.5}], ids=["keep3", "keep10", "ratio0.5"])
def test_every_method_keeps_the_invariants(deep, method, budget):
    params = TINY_PARAMS.get(method, {})
    ids, mask, pv = make_inputs(deep, SHAPES, seed=2)
    with vlprune.wrap(deep, method, **budget, **params) as pruned:
        logits, embeds = forward(deep, ids, mask, pv)
        plans = list(pruned.plans)
        tokens = generate(deep, ids, mask, pv)
        assert same_plans(pruned.plans, plans)  # generate's prefill decided the same
        per_image = budget.get("keep") or round(budget["ratio"] * 16)
        assert plans[0].kept_per_sample == [per_image * images for _, _, images in SHAPES]
        check_plans(plans, ids, [per_image], 16)
        check_reference(deep, ids, mask, pv, plans, logits, embeds, tokens, renumber=False)
        # a batch equals each prompt alone
        first = 0
        for b, shape in enumerate(SHAPES):
            ids1, mask1, _ = make_inputs(deep, (shape,), seed=2 + b)
            pv1 = pv[first : first + shape[2]]
            first += shape[2]
            logits1, _ = forward(deep, ids1, mask1, pv1)
            assert torch.equal(pruned.plans[0].keep_visual[0], plans[0].keep_visual[b])
            torch.testing.assert_close(logits[b, -1], logits1[0, -1], rtol=1e-4, atol=1e-5)
            assert torch.equal(generate(deep, ids1, mask1, pv1)[0], tokens[b])


@pytest.mark.parametrize("method", vlprune.list_methods("image"))
def test_every_method_is_the_identity_at_keep_all(deep, method):
    ids, mask, pv = make_inputs(deep, SHAPES[:2], seed=4)
    reference_logits, reference_tokens = forward(deep, ids, mask, pv)[0], generate(deep, ids, mask, pv)
    with vlprune.wrap(deep, method, keep=10_000, **TINY_PARAMS.get(method, {})) as pruned:
        logits, tokens = forward(deep, ids, mask, pv)[0], generate(deep, ids, mask, pv)
        assert pruned.plans[0].kept_per_sample == pruned.plans[0].num_visual
        assert not pruned.plans[0].merges
    assert torch.equal(logits, reference_logits)
    assert torch.equal(tokens, reference_tokens)


def preset_counts(name: str) -> list[int]:
    """Visual tokens per image after each stage of a preset on LLaVA-1.5's 576 tokens, derived by hand from the
    method's counting rule (see each YAML's comment)."""
    n = int(name.rsplit("-", 1)[1]) if name[-1].isdigit() else None
    method = name.rsplit("-", 1)[0]
    if method == "dart":
        return [4 + 8 * (n // 8)]
    if method == "sparsevlm":  # kept + clusters of the recycled int(0.3 d) + 1 deleted, int(r / 10) + 1 clusters
        counts, available = [], 576
        for keep in {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}[n]:
            deleted = available - keep
            recycled = int(0.3 * deleted) + 1
            available = keep + int(recycled / 10) + 1
            counts.append(available)
        return counts
    if method == "pdrop":
        if n is None:
            return [288, 144, 72]
        k0 = round((32 * n - 1152) / 13)
        return [k0, k0 // 2, k0 // 4, k0 // 8]
    return [n]


IMAGE_PRESETS = [
    name
    for name in vlprune.preset_names()
    if not any(vlprune.registry.selector_class(s.method).video for s in vlprune.load_config(name).stages)
]


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_every_preset_keeps_the_invariants(llava15, name):
    shapes = ((2, 5, 1), (4, 6, 1))  # at least 4 text tokens after the image: DART has all its text pivots
    ids, mask, pv = make_inputs(llava15, shapes, seed=6, side=336)
    with vlprune.wrap(llava15, name) as pruned:
        logits, embeds = forward(llava15, ids, mask, pv)
        plans = list(pruned.plans)
        tokens = generate(llava15, ids, mask, pv, steps=2)
    assert same_plans(pruned.plans, plans)
    check_plans(plans, ids, preset_counts(name), 576)
    renumber = pruned.config.positions == "renumber"
    check_reference(llava15, ids, mask, pv, plans, logits, embeds, tokens, renumber)
