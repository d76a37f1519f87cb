"""DyCoke's decode-time cache stage against a hand-written decode: greedy decoding without a cache, the prompt
compacted by the TTM plan, where each generated token's query in layers >= L sees only the visual entries chosen
from its own head-mean attention at layer L - 1 (the model's eager attention weights), with the similarity rule."""

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import vlprune

from families import VIDEO_FAMILIES
from reference import add_deepstack, deepstack_of, embed, gather, state

LAYER, RATIO, THRESHOLD = 2, 0.5, 0.9
SHAPES = {
    "qwen": ((3, 2, ((4, 4, 4),)), (1, 3, ((2, 4, 8),))),
    "llava_onevision": ((3, 2, (4,)), (1, 3, (4,))),
    "llava_next_video": ((3, 2, (4,)), (1, 3, (4,))),
}


def decide(state: dict, scores: torch.Tensor) -> torch.Tensor | None:
    """The rule by hand: prune on the first step or when the attention changed; top int((1 - P) n)."""
    previous, state["previous"] = state.get("previous"), scores
    if previous is not None:
        cos = (previous @ scores) / (previous.norm() * scores.norm())
        if cos >= THRESHOLD:
            return None
    return torch.sort(torch.argsort(scores, descending=True, stable=True)[: int((1 - RATIO) * scores.numel())]).values


def record(weights: dict):
    """A forward hook keeping an eager attention module's weights (B, H, Lq, Lk)."""

    def hook(module, args, out):
        weights["w"] = out[1]

    return hook


def hand_decode(model, family, inputs, plan, steps: int, eos=2, pad=0):
    """Tokens, per step and sample the kept visual rows (or None), and each step's last logits, as DyCoke's cache
    stage defines them."""
    lm, config = model.model.language_model, model.config.text_config
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = embed(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))
    stack = deepstack_of(model, ids, family.pixels(inputs), **family.image_kwargs(inputs))  # Qwen3-VL; else None
    b_count, length = ids.shape
    new = torch.zeros(b_count, 0, dtype=torch.long)
    states, decisions, scores_per_step = [{} for _ in range(b_count)], [], []
    for _ in range(steps):
        full_ids = torch.cat([ids, new], 1)
        full_mask = torch.cat([mask.bool(), torch.ones_like(new, dtype=torch.bool)], 1)
        embeds = torch.cat([prompt, lm.get_input_embeddings()(new)], 1)
        positions = family.positions(model, {**inputs, "input_ids": full_ids, "attention_mask": full_mask})
        pos = positions.permute(1, 2, 0) if positions.dim() == 3 else positions
        tail = torch.arange(length, length + new.shape[1])
        keep = [torch.cat([k, tail]) for k in plan.keep_tokens]
        (h, pos, m, rows), valid = gather(
            keep, embeds, pos, full_mask, torch.arange(full_ids.shape[1]).expand(b_count, -1)
        )
        m = m & valid
        pos = pos.masked_fill(~valid if pos.dim() == 2 else ~valid[..., None], 1)
        text_pos = pos if pos.dim() == 2 else None
        cos_sin = lm.rotary_emb(h, position_ids=pos if pos.dim() == 2 else pos.permute(2, 0, 1))
        mask4 = create_causal_mask(config, h, m, None, position_ids=text_pos)  # no cache (its keyword was renamed)
        weights = {}
        hook = lm.layers[LAYER - 1].self_attn.register_forward_hook(record(weights))
        for i in range(LAYER):
            h = lm.layers[i](h, attention_mask=mask4, position_embeddings=cos_sin, position_ids=text_pos)
            h = add_deepstack(h, rows, stack, i)
        hook.remove()
        restricted = mask4.clone()
        fill = False if restricted.dtype == torch.bool else torch.finfo(restricted.dtype).min
        step = []
        for b in range(b_count):
            visual = torch.nonzero(torch.isin(rows[b], plan.visual_rows[b])).flatten()  # slots of visual tokens
            for j in range(new.shape[1]):  # generated token j's query row: decided at its own step
                slot = h.shape[1] - new.shape[1] + j
                if j == new.shape[1] - 1:
                    scores = weights["w"][b, :, slot].mean(0)[visual]
                    chosen = decide(states[b], scores)
                    step.append(None if chosen is None else rows[b, visual[chosen]])
                kept = step[b] if j == new.shape[1] - 1 else decisions[j][b]
                if kept is not None:
                    dropped = visual[~torch.isin(rows[b, visual], kept)]
                    restricted[b, :, slot, dropped] = fill
        if new.shape[1]:
            decisions.append(step)
        for i in range(LAYER, len(lm.layers)):
            h = lm.layers[i](h, attention_mask=restricted, position_embeddings=cos_sin, position_ids=text_pos)
            h = add_deepstack(h, rows, stack, i)
        logits = model.lm_head(lm.norm(h))
        scores_per_step.append(logits[:, -1])
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    done = (new == eos).long().cumsum(1) - (new == eos).long() > 0
    return new.masked_fill(done, pad), decisions, scores_per_step


@pytest.mark.parametrize("family_name", list(VIDEO_FAMILIES))
@pytest.mark.parametrize("ttm", [{"ratio": 1.0}, {"ratio": 0.75}], ids=["ttm-keep-all", "ttm-0.75"])
def test_dycoke_cache_stage_equals_the_hand_decode(family_name, ttm):
    family = VIDEO_FAMILIES[family_name]
    model = family.build(layers=4, attn="eager")
    shapes = SHAPES.get(family.name, SHAPES["qwen"])
    inputs = family.inputs(model, shapes, seed=3)
    params = dict(cache_prune_ratio=RATIO, cache_layer=LAYER, cache_threshold=THRESHOLD)
    with torch.no_grad():
        model(**inputs)  # transformers installs its own hooks on the first call
        before = state(model)
        with vlprune.wrap(model, "dycoke", **ttm, **params) as pruned:
            out = model.generate(
                **inputs,
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
            plan, steps = pruned.plans[0], [list(s) for s in pruned.cache_plans]
        expected, decisions, logits = hand_decode(model, family, inputs, plan, tokens.shape[1])
    assert state(model) == before
    assert torch.equal(tokens, expected)
    for got, want in zip(out.logits, logits, strict=True):  # every step, the restricted ones included
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(steps) == len(decisions) == tokens.shape[1] - 1  # the first token comes from the prefill
    pruned_steps = 0
    for got, want in zip(steps, decisions, strict=True):
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                pruned_steps += 1
                assert torch.equal(g, w)
    assert pruned_steps >= 2  # the first step always prunes, per sample


def test_cache_stage_errors():
    family = VIDEO_FAMILIES["qwen2_5_vl"]
    model = family.build(layers=4)
    with pytest.raises(ValueError, match="prunes the KV cache from decoder layer 4 while decoding: that layer must be"):
        vlprune.wrap(model, "dycoke", ratio=0.5, cache_prune_ratio=0.5, cache_layer=4)
    with pytest.raises(ValueError, match="cache_layer must be an integer >= 1, got 0"):
        vlprune.wrap(model, "dycoke", ratio=0.5, cache_prune_ratio=0.5, cache_layer=0)
    with pytest.raises(ValueError, match=r"cache_prune_ratio must be in \[0, 1\], got 2"):
        vlprune.wrap(model, "dycoke", ratio=0.5, cache_prune_ratio=2)
    stages = [
        vlprune.Stage("dycoke", ratio=0.5, params={"cache_prune_ratio": 0.5, "cache_layer": 2}),
        vlprune.Stage("fastv", keep=4, layer=2),
    ]
    with pytest.raises(ValueError, match="after every prefill stage"):
        vlprune.wrap(model, vlprune.PruneConfig(stages))


def test_the_paper_preset_prunes_the_prefill_and_the_cache():
    family = VIDEO_FAMILIES["llava_onevision"]
    model = family.build(layers=4)
    inputs = family.inputs(model, ((3, 2, (4,)),), seed=1)  # one video: 4 frames x 4 tokens
    with torch.no_grad(), vlprune.wrap(model, "dycoke-paper") as pruned:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert pruned.plans[0].kept_per_sample == [4 + 3 * int(0.3 * 4)]  # frame 0 whole, int(0.3 N) of the others
        first = pruned.cache_plans[0][0]  # the first decoding step always prunes: int(0.3 * 7) of the 7 kept
        assert first is not None and first.numel() == 2
        assert torch.isin(first, pruned.plans[0].keep_tokens[0]).all()
    assert out.shape[1] > inputs["input_ids"].shape[1]
