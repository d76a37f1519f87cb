"""HiPrune against a transcription of its release's selection (``Danielement321/HiPrune`` at ``6e83a12``,
``llava_arch.py::encode_images``, batched code as there) on crafted attention maps at LLaVA-1.5's 24 x 24 grid, the
layered ``received_attention`` it reads on a wrapped LLaVA against the tower's own attention maps, and its options."""

import pytest
import torch

import vlprune
from vlprune.model_adapters.llava import LlavaAdapter
from vlprune.selectors.hiprune import HiPrune
from vlprune.signals import TokenView

from reference import seen_views
from tiny import batch, pixels, prompt, tiny_llava


def release(attentions: dict, select_layer: int, object_layer: int, visual_token_num: int, alpha: float) -> list:
    """The release's ``encode_images`` selection for one image; ``attentions[l]`` (1, H, 577, 577) is layer ``l``'s
    attention (``image_forward_outs.attentions``), ``object_layer`` 1-based as its ``HIPRUNE_OBJECT_LAYER``."""
    deep_attention = attentions[select_layer].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_attention = attentions[object_layer - 1].mean(dim=1).mean(dim=1)[:, 1:]
    shallow_token_num = round(visual_token_num * alpha / 5)
    i = 0
    shallow_token_indices = torch.topk(shallow_attention[i].unsqueeze(0), k=shallow_token_num, dim=1)[1]
    shallow_token_indices = torch.cat(
        [
            shallow_token_indices,
            shallow_token_indices - 1,
            shallow_token_indices + 1,
            shallow_token_indices - 24,
            shallow_token_indices + 24,
        ],
        dim=1,
    )
    shallow_token_indices = shallow_token_indices.clamp(0, 575)
    shallow_token_indices = torch.unique(shallow_token_indices, sorted=False).unsqueeze(0)
    deep_token_num = visual_token_num - shallow_token_indices.shape[1]
    available_index_mask = torch.zeros(1, 576, dtype=torch.bool)
    available_index_mask.scatter_(1, shallow_token_indices, 1)
    deep_attention[i] -= available_index_mask.int().squeeze()
    deep_token_indices = torch.topk(deep_attention[i].unsqueeze(0), k=deep_token_num, dim=1)[1]
    token_indices = torch.cat([shallow_token_indices, deep_token_indices], dim=1)
    return torch.sort(token_indices, dim=1)[0][0].tolist()


def maps(seed: int, heads: int = 4, tokens: int = 577) -> torch.Tensor:
    """A random attention map (1, H, T, T), rows summing to 1, with a few patches that draw more attention."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, heads, tokens, tokens, generator=g)
    logits[..., torch.randint(1, tokens, (12,), generator=g)] += 2.0
    return logits.softmax(-1)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("keep", "alpha"), [(64, 0.1), (128, 0.1), (192, 0.1), (64, 0.5), (32, 1.0)])
def test_hiprune_equals_the_release(seed, keep, alpha):
    attentions = {8: maps(seed), 22: maps(seed + 10)}  # HIPRUNE_OBJECT_LAYER=9; mm_vision_select_layer -2 of 24
    view = TokenView(index=torch.arange(576), grid=(24, 24), image=0)
    for key, layer in ((8, 8), (None, 22)):  # what the adapter gives: heads, then queries; the [CLS] column dropped
        view.received_attention[key] = attentions[layer].mean(1).mean(1)[0, 1:]
    chosen = HiPrune(alpha=alpha, object_layer=8).select(view, keep)
    assert chosen.tolist() == release(attentions, 22, 9, keep, alpha)


def test_received_attention_at_any_vision_layer_of_a_wrapped_llava():
    """What HiPrune reads on a LLaVA: per image and requested layer, the tower's attention maps averaged over heads
    and queries, [CLS] column dropped, from the model's own ``output_attentions``."""
    model = tiny_llava("eager", vision_layers=4)
    ids, mask = batch([prompt(model, 3, 2, 2)])
    pv = pixels(2)
    with torch.no_grad():
        attentions = model.model.vision_tower(pv, output_attentions=True).attentions
    feature = LlavaAdapter(model).vision_layer(None)
    with seen_views(HiPrune, "received_attention", 1) as shallow, seen_views(HiPrune, "received_attention") as deep:
        with vlprune.wrap(model, "hiprune", keep=6, object_layer=1), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    for image in range(2):
        torch.testing.assert_close(shallow[image], attentions[1].mean(1).mean(1)[image, 1:], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(deep[image], attentions[feature].mean(1).mean(1)[image, 1:], rtol=1e-5, atol=1e-7)


def test_budgets_and_options():
    view = TokenView(index=torch.arange(576), grid=(24, 24), image=0)
    view.received_attention[8], view.received_attention[None] = maps(0).mean(1).mean(1)[0, 1:], torch.rand(576)
    for keep in (1, 3, 5, 600):  # anchors and buffers beyond a tiny budget are cut to it
        chosen = HiPrune(alpha=1.0).select(view, min(keep, 576))
        assert chosen.numel() == min(keep, 576) and len(set(chosen.tolist())) == chosen.numel()
    with pytest.raises(ValueError, match="alpha must be a number in"):
        HiPrune(alpha=2.0)
    with pytest.raises(TypeError, match="object_layer must be an int"):
        HiPrune(object_layer="9")
    assert HiPrune.small_model_params(4) == {"object_layer": 2} and HiPrune.small_model_params(24) == {}
    with pytest.raises(ValueError, match="received_attention at its vision feature layer only"):
        from families import FAMILIES

        vlprune.wrap(FAMILIES["internvl"].build(layers=2), "hiprune", keep=8)
