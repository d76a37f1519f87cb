"""Independent references: the unhooked model's own modules driven by hand, with explicit masks and positions."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.masking_utils import create_causal_mask

import vlprune


def embed(model, ids: torch.Tensor, pixel_values: torch.Tensor | None, **image_kwargs) -> torch.Tensor:
    """inputs_embeds with image features scattered in, as the base model's forward does (``image_kwargs``: e.g.
    ``image_grid_thw`` for Qwen-VL). Videos: ``video_grid_thw`` (Qwen-VL) or ``videos=True`` (LLaVA-OneVision), and
    ``pixel_values`` are the video batch."""
    base = model.model
    embeds = base.get_input_embeddings()(ids)
    video = bool(image_kwargs.pop("videos", False)) or "video_grid_thw" in image_kwargs
    token = model.config.video_token_id if video else model.config.image_token_id
    if pixel_values is None or not (ids == token).any():
        return embeds
    if video and "video_grid_thw" not in image_kwargs:  # LLaVA-OneVision: pooled frames, then a newline per video
        config = model.config
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        feats = base.get_video_features(
            pixel_values_videos=pixel_values, vision_feature_layer=layer, vision_feature_select_strategy=strategy
        )
    elif video:
        feats = base.get_video_features(pixel_values_videos=pixel_values, return_dict=True, **image_kwargs)
    else:
        feats = base.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
    feats = torch.cat(list(feats.pooler_output), 0).to(embeds.dtype)
    mask = (ids == token)[..., None].expand_as(embeds)
    return embeds.masked_scatter(mask, feats)


def deepstack_of(model, ids, pixel_values, **image_kwargs):
    """Qwen3-VL: ``(visual mask (B, L), [per level (n_visual, D)])`` as the model adds them after its first decoder
    layers; ``None`` for other models."""
    if not hasattr(model.config.vision_config, "deepstack_visual_indexes"):
        return None
    if "video_grid_thw" in image_kwargs:
        out = model.model.get_video_features(pixel_values_videos=pixel_values, return_dict=True, **image_kwargs)
        token = model.config.video_token_id
    else:
        out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        token = model.config.image_token_id
    return ids == token, [torch.cat(list(level), 0) for level in out.deepstack_features]


def original_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def gather(keep: list[torch.Tensor], *tensors: torch.Tensor):
    """Per sample, take ``keep[b]`` along dim 1 and left-pad to the longest (padding: index 0, mask 0)."""
    length = max(len(k) for k in keep)
    out = []
    for t in tensors:
        rows = []
        for b, k in enumerate(keep):
            pad = length - len(k)
            rows.append(torch.cat([t[b, :1].expand(pad, *t.shape[2:]) * 0, t[b, k]], 0))
        out.append(torch.stack(rows))
    valid = torch.zeros(len(keep), length, dtype=torch.bool)
    for b, k in enumerate(keep):
        valid[b, length - len(k) :] = True
    return out, valid


def merges_of(plan: vlprune.KeepPlan, ids: torch.Tensor, image_token: int = 100) -> list[list[tuple]] | None:
    """Per sample, ``(target_row, [(source_row, weight), ...])`` for every kept token of an LLM-space merging plan,
    in input-sequence rows (``None`` for plain pruning or vision-space plans)."""
    if plan.space != "llm" or not plan.merges:
        return None
    out = []
    for b, (into, weight) in enumerate(zip(plan.merged_into, plan.merge_weight, strict=True)):
        visual = plan.visual_rows[b] if plan.visual_rows is not None else torch.nonzero(ids[b] == image_token).flatten()
        pairs = plan.merge_pairs[b] if plan.merge_pairs is not None else None
        if pairs is None:  # one target per token
            used = torch.nonzero(into >= 0).flatten()
            pairs = (used, into[used], weight[used])
        groups: dict[int, list] = {}
        for v, target, w in zip(*(p.tolist() for p in pairs), strict=True):
            groups.setdefault(int(visual[target]), []).append((int(visual[v]), float(w)))
        out.append(sorted(groups.items()))
    return out


def layer_loop(model, embeds, mask, positions, stages: list[tuple], renumber=False, deepstack=None, back=None):
    """Logits of a hand-written decoder loop. ``stages`` lists ``(layer, keep_tokens)`` or ``(layer, keep_tokens,
    merges)``: from ``layer`` on, only the input tokens in ``keep_tokens[b]`` (indices into the input sequence) go
    on; with ``merges`` (see :func:`merges_of`), each target becomes the weighted sum of its sources first.
    ``deepstack`` (see :func:`deepstack_of`): after layer ``i``, each visual token still present gets its own row
    of level ``i`` added. ``back = (K, prompt_length)``: in the layers before the stage at ``K``, the tokens after
    the prompt (generated ones) do not see the prompt tokens that stage drops (a cache compacted after the
    prefill)."""
    lm = model.model.language_model
    config = model.config.text_config
    h, pos, m = embeds, positions, mask.bool()
    if pos.dim() == 3:  # M-RoPE (3, B, L): gather it like a per-token tensor
        pos = pos.permute(1, 2, 0)
    rows = torch.arange(h.shape[1]).expand(h.shape[0], -1)
    cuts = {stage[0]: stage[1:] for stage in stages}
    for i, block in enumerate(lm.layers):
        if i in cuts:
            keep, merges = cuts[i][0], (cuts[i][1] if len(cuts[i]) > 1 else None)
            if merges is not None:
                h = h.clone()
                for b, groups in enumerate(merges):
                    slot = {int(r): s for s, r in enumerate(rows[b].tolist()) if r >= 0}
                    old = h[b].clone()
                    for target, sources in groups:
                        h[b, slot[target]] = sum(w * old[slot[src]] for src, w in sources)
            slots = [torch.nonzero(torch.isin(rows[b], k)).flatten() for b, k in enumerate(keep)]
            (h, pos, m, rows), valid = gather(slots, h, pos, m, rows)
            m = m & valid
            rows = rows.masked_fill(~valid, -1)
            invalid = ~valid if pos.dim() == 2 else ~valid[..., None]
            pos = original_positions(m) if renumber else pos.masked_fill(invalid, 1)
        if i == 0 or i in cuts:
            text_pos = pos if pos.dim() == 2 else None
            cos_sin = lm.rotary_emb(h, position_ids=pos if pos.dim() == 2 else pos.permute(2, 0, 1))
            mask4 = create_causal_mask(config, h, m, None, position_ids=text_pos)  # no cache (its keyword was renamed)
            if back is not None and i < back[0]:
                mask4 = hide_dropped(mask4, rows, cuts[back[0]][0], back[1])
        h = block(h, attention_mask=mask4, position_embeddings=cos_sin, position_ids=text_pos)
        h = add_deepstack(h, rows, deepstack, i)
    return model.lm_head(lm.norm(h))


def hide_dropped(mask4: torch.Tensor, rows: torch.Tensor, keep: list[torch.Tensor], prompt: int) -> torch.Tensor:
    """``mask4`` (B, 1, S, S) with the query rows of tokens after the ``prompt`` kept from the key columns of prompt
    tokens not in ``keep[b]``."""
    mask4 = mask4.clone()
    fill = False if mask4.dtype == torch.bool else torch.finfo(mask4.dtype).min
    for b in range(rows.shape[0]):
        late = torch.nonzero(rows[b] >= prompt).flatten()
        gone = torch.nonzero((rows[b] >= 0) & (rows[b] < prompt) & ~torch.isin(rows[b], keep[b])).flatten()
        mask4[b, :, late[:, None], gone[None, :]] = fill
    return mask4


def add_deepstack(h: torch.Tensor, rows: torch.Tensor, deepstack, level: int) -> torch.Tensor:
    """``h`` (B, S, D) after decoder layer ``level`` with Qwen3-VL's DeepStack rows added: each slot holding the
    visual token of input row ``rows[b, slot]`` gets that token's row of ``deepstack`` (:func:`deepstack_of`)."""
    if deepstack is None or level >= len(deepstack[1]):
        return h
    visual, levels = deepstack
    index = {}
    for b in range(visual.shape[0]):
        for r in torch.nonzero(visual[b]).flatten().tolist():
            index[(b, r)] = len(index)
    h = h.clone()
    for b in range(h.shape[0]):
        for slot, r in enumerate(rows[b].tolist()):
            if (b, r) in index:
                h[b, slot] = h[b, slot] + levels[level][index[(b, r)]]
    return h


def greedy(
    model,
    ids,
    mask,
    pixel_values,
    plans: list[vlprune.KeepPlan],
    steps: int,
    renumber=False,
    eos=2,
    pad=0,
    embeds=None,
    positions_fn=None,
    image_kwargs=None,
    back=None,
):
    """Manual greedy decoding without a cache: each step recomputes everything with the prefill's fixed plans (and
    their merges). ``embeds`` replaces the prompt's input embeddings (for vision-space merges); ``positions_fn(ids,
    mask)`` gives the unpruned sequence's positions (default: 1-D, from the mask). ``back``: the layer of a stage
    that also compacts the earlier layers' cache (see :func:`layer_loop`)."""
    image_kwargs = image_kwargs or {}
    positions_fn = positions_fn or (lambda ids, mask: original_positions(mask))
    prompt = embed(model, ids, pixel_values, **image_kwargs) if embeds is None else embeds
    deepstack = deepstack_of(model, ids, pixel_values, **image_kwargs)
    b, length = ids.shape
    new = torch.zeros(b, 0, dtype=torch.long)
    for _ in range(steps):
        embeds = torch.cat([prompt, model.model.get_input_embeddings()(new)], 1)
        full_mask = torch.cat([mask.bool(), torch.ones_like(new, dtype=torch.bool)], 1)
        tail = torch.arange(length, length + new.shape[1])
        stages = [(p.layer, [torch.cat([k, tail]) for k in p.keep_tokens], merges_of(p, ids)) for p in plans]
        positions = positions_fn(torch.cat([ids, new], 1), full_mask)
        stack = None
        if deepstack is not None:
            stack = (torch.cat([deepstack[0], torch.zeros_like(new, dtype=torch.bool)], 1), deepstack[1])
        logits = layer_loop(
            model, embeds, full_mask, positions, stages, renumber, stack, None if back is None else (back, length)
        )
        new = torch.cat([new, logits[:, -1].argmax(-1, keepdim=True)], 1)
    # like generate: a sequence that produced EOS continues with padding
    done = (new == eos).long().cumsum(1) - (new == eos).long() > 0
    return new.masked_fill(done, pad)


@contextmanager
def seen_views(selector_class, attribute: str, key=None):
    """Within the block, every ``select`` of ``selector_class`` records a copy of its view's ``attribute`` (its entry
    ``key`` for a layered signal) in the list this yields."""
    seen, original = [], selector_class.select

    def spy(self, view, keep):
        value = getattr(view, attribute)
        seen.append((value[key] if isinstance(value, dict) else value).clone())
        return original(self, view, keep)

    selector_class.select = spy
    try:
        yield seen
    finally:
        selector_class.select = original


def state(model) -> dict:
    """Everything a wrap could leave behind: hooks, instance attributes, attention implementations.

    Take it after one forward: transformers adds its own output-capturing hooks on the first call."""
    hooks = {}
    for name, module in model.named_modules():
        hooks[name] = (
            sorted(module.__dict__),
            len(module._forward_hooks),
            len(module._forward_pre_hooks),
            len(module._forward_hooks_with_kwargs),
            len(module._forward_pre_hooks_with_kwargs),
            len(module._backward_hooks),
            len(module._state_dict_hooks),
        )
    configs = {
        k: getattr(model.config, k).__dict__.get("_attn_implementation_internal")
        for k in ("text_config", "vision_config")
    }
    return {"hooks": hooks, "attn": configs, "top_attn": model.config._attn_implementation_internal}
