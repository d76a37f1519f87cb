"""Prune a LLaVA-architecture model built in code (random weights, no download) and show what each method kept.

    python examples/tiny_llava.py [--keep 64] [--methods fastv,fastervlm,uniform,random]

The model has the real LLaVA-1.5 token geometry (336 px images, 14 px patches: 576 visual tokens in a 24 x 24 grid)
at a tiny width, so it runs in seconds on a CPU. Its answers are random tokens: the point is to see the mechanism
(which tokens survive, how many the decoder sees, that generate() runs) at LLaVA-1.5's geometry. For answers that
mean something, `vlprune run` uses the trained model shipped in the package.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlprune

IMAGE_TOKEN = 100


def build_model(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=336, patch_size=14
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def grid(keep_visual: torch.Tensor, side: int = 24) -> str:
    """The kept tokens of one image as a character grid (# kept, . dropped)."""
    mask = torch.zeros(side * side, dtype=torch.bool)
    mask[keep_visual] = True
    return "\n".join("".join("#" if m else "." for m in row) for row in mask.view(side, side).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (of 576)")
    parser.add_argument("--methods", default="fastv,fastervlm,uniform,random", help="comma-separated method names")
    args = parser.parse_args()

    model = build_model()
    input_ids = torch.tensor([[1, 5, 6, 7] + [IMAGE_TOKEN] * 576 + [8, 9, 10, 11, 12]])
    pixel_values = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    inputs = dict(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=8, do_sample=False)

    start = time.perf_counter()
    with torch.no_grad():
        reference = model.generate(**inputs)[0, input_ids.shape[1] :].tolist()
    print(f"unpruned: 576 visual tokens, {input_ids.shape[1]} tokens in every decoder layer")
    print(f"  generated {reference}  ({time.perf_counter() - start:.2f} s)\n")

    for method in args.methods.split(","):
        with vlprune.wrap(model, method, keep=args.keep) as pruned, torch.no_grad():
            start = time.perf_counter()
            tokens = model.generate(**inputs)[0, input_ids.shape[1] :].tolist()
            elapsed = time.perf_counter() - start
        plan = pruned.plans[0]
        seen = len(plan.keep_tokens[0])
        print(f"{method}: kept {plan.kept_per_sample[0]}/576 visual tokens before decoder layer {plan.layer}")
        print(f"  layers {plan.layer}.. see {seen} of {input_ids.shape[1]} tokens")
        print(f"  generated {tokens}  ({elapsed:.2f} s, same as unpruned: {tokens == reference})")
        print("  " + grid(plan.keep_visual[0]).replace("\n", "\n  ") + "\n")
    assert not vlprune.unwrap(model), "every with-block unwraps the model"


if __name__ == "__main__":
    main()
