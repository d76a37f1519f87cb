"""VisPruner against a transcription of its release's selection (``Theia-4869/VisPruner`` at ``aefa01a``,
``llava_arch.py::encode_images``, batched tensor code as there) on crafted inputs with planted near-duplicates, and
its options."""

import pytest
import torch

import vlprune
from vlprune.selectors.vispruner import VisPruner, remove_duplicates
from vlprune.signals import TokenView


def release(attention: torch.Tensor, features: torch.Tensor, visual_token_num: int, important_ratio: float) -> list:
    """The release's ``encode_images`` selection for one image: ``attention`` (N,) the [CLS] row (head mean),
    ``features`` (N, C) the feature layer's patch states; the indices it keeps, sorted."""
    B = 1
    image_features, image_attentions = features[None], attention[None]
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat(
            [
                residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
                residual_indices[..., 1::2],
            ],
            dim=-1,
        )
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    return sorted(selected_indices[0].tolist())


def crafted(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct attention scores, and features in which every third patch nearly repeats the one before it."""
    g = torch.Generator().manual_seed(seed)
    attention = torch.randperm(n, generator=g).float() / n + 0.01  # no ties
    features = torch.randn(n, 16, generator=g)
    for i in range(1, n, 3):
        features[i] = features[i - 1] + 0.01 * torch.randn(16, generator=g)
    return attention, features


def view_of(attention, features) -> TokenView:
    view = TokenView(index=torch.arange(attention.numel()), grid=(8, 8), image=0)
    view.cls_attention[None], view.vision_hidden = attention, features
    return view


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("keep", "ratio"), [(16, 0.5), (24, 0.5), (32, 0.75), (20, 0.0), (8, 1.0)])
def test_vispruner_equals_the_release(seed, keep, ratio):
    attention, features = crafted(seed=seed)
    chosen = VisPruner(important_ratio=ratio).select(view_of(attention, features), keep)
    assert chosen.tolist() == release(attention, features, keep, ratio)


def test_a_round_drops_the_duplicates_it_matches():
    """Eight near-identical pairs laid out at places (2k, 2k + 1): one round of matching pairs each ``a`` with its
    twin in ``b``, so removing 8 drops exactly the pairs' first members."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(32, 16, generator=g)
    features[1:16:2] = features[0:16:2] + 0.01 * torch.randn(8, 16, generator=g)
    survivors = remove_duplicates(features, torch.arange(32), 24)
    assert sorted(survivors.tolist()) == [i for i in range(32) if not (i < 16 and i % 2 == 0)]


def test_an_odd_remainder_and_bad_options():
    attention, features = crafted()
    for keep in (5, 7, 63):  # odd remainders, and fewer than 2 x 8 patches left in the last rounds
        chosen = VisPruner().select(view_of(attention, features), keep)
        assert chosen.numel() == keep and len(set(chosen.tolist())) == keep
    with pytest.raises(ValueError, match="important_ratio must be a number in"):
        VisPruner(important_ratio=1.5)
    assert vlprune.load_config("vispruner-64").stages[0].params == {"important_ratio": 0.5}
