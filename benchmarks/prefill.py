"""Prefill time of a LLaVA-architecture random model, unpruned vs pruned, beside the analytic FLOP ratio.

    python benchmarks/prefill.py [--hidden 1024 --layers 8 --heads 16 --vision-hidden 512 --vision-layers 6]
                                 [--keep 64 --repeats 5 --threads N]

Prefill = the whole forward of one prompt (CLIP tower on a 336 px image -> 576 image tokens, projector, decoder) with
``logits_to_keep=1``, as ``generate`` runs it. Times are medians of ``--repeats`` runs after one discarded warm-up,
measured side by side in one process. "FLOP ratio" is the analytic prefill FLOPs (vision tower, projector, decoder,
head; each layer counted on the tokens it actually saw) pruned over unpruned; "achieved" is the measured speed-up over
the FLOP-ratio speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlprune
from vlprune.eval.measure import FlopCount

IMAGE = 576


def build(args, config_only: bool = False):
    """The benchmark model (or only its ``LlavaConfig`` with ``config_only``)."""
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
    )
    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden,
        intermediate_size=args.vision_hidden * 4,
        num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64),
        image_size=336,
        patch_size=14,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2)
    return config if config_only else LlavaForConditionalGeneration(config).eval()


def prefill_flops(model, inputs) -> float:
    """Analytic FLOPs of one prefill as the model runs now (wrapped or not): :class:`vlprune.eval.measure.FlopCount`
    (every layer's weights times the tokens it saw, plus attention), vision tower and decoder."""
    with torch.no_grad(), FlopCount(model) as count:
        model(**inputs, logits_to_keep=1)
    return count.total


def median_time(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            if i:  # the first run is a warm-up
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Widths and depths of the benchmark model, and the text length (shared by the benchmarks)."""
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=6)
    parser.add_argument("--text", type=int, default=64, help="text tokens around the image")
    parser.add_argument("--threads", type=int, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    half = args.text // 2
    ids = torch.tensor([[1] + [5] * (half - 1) + [32000] * IMAGE + [6] * (args.text - half)])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 3, 336, 336))
    n_layers = args.layers
    print(
        f"LLaVA-architecture random model: decoder {n_layers} layers x {args.hidden} wide, CLIP {args.vision_layers} "
        f"layers x {args.vision_hidden}; {IMAGE} image + {args.text} text tokens; keep={args.keep}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, sdpa"
    )
    base_time = median_time(model, inputs, args.repeats)
    base_flops = prefill_flops(model, inputs)
    print(f"{'setting':34s} {'prefill s':>10s} {'speed-up':>9s} {'FLOP ratio':>11s} {'achieved':>9s}")
    print(f"{'unpruned':34s} {base_time:10.3f} {1.0:9.2f} {1.0:11.3f} {'':>9s}")
    cases = [
        ("uniform, pre-LLM (layer=0)", "uniform", 0),
        ("fastervlm, pre-LLM (layer=0)", "fastervlm", 0),
        ("flowcut, in the tower (layer=0)", "flowcut", 0),
        ("uniform, in-LLM (layer=2)", "uniform", 2),
        ("fastv, in-LLM (layer=2)", "fastv", 2),
    ]
    for label, method, layer in cases:
        with vlprune.wrap(model, method, keep=args.keep, layer=layer):
            elapsed = median_time(model, inputs, args.repeats)
            flops = prefill_flops(model, inputs)
        ratio = flops / base_flops
        speedup = base_time / elapsed
        print(f"{label:34s} {elapsed:10.3f} {speedup:9.2f} {ratio:11.3f} {speedup * ratio:9.1%}")


if __name__ == "__main__":
    main()
