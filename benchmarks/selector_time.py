"""Each selector's own decision time as a fraction of the unpruned prefill of the same model, at 576 visual tokens
(one LLaVA-1.5 image) and 6,272 (a high-resolution or multi-image prompt).

    python benchmarks/selector_time.py [--hidden 1024 --layers 8 --heads 16 --vision-hidden 512 --vision-layers 6]
                                   [--tokens 576 6272 --ratio 0.111 --text 64 --threads N]

The selector sees the signals it requests at this model's widths (random values: decision cost does not depend on
them) and keeps ``ratio`` of the tokens. "Prefill" is the model's forward over the embeddings of the visual tokens
plus ``--text`` text tokens (decoder only, ``logits_to_keep=1``), measured in the same process; each decision runs
in a fresh subprocess; a tower selector (FlowCut) is timed over all its per-layer scoring and pruning steps in the
tower. Memory: no selector builds an N x N matrix (DivPrune streams its nearest-neighbour search in 1024-row chunks;
SparseVLM's DPC-KNN is quadratic only in the recycled tokens, about 0.3 (N - keep); FlowCut needs only the [CLS] row
of each layer's attention).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

sys.path.insert(0, str(Path(__file__).parent))
from prefill import add_model_arguments, build, median_time  # noqa: E402

import vlprune  # noqa: E402
from vlprune.registry import create_selector  # noqa: E402
from vlprune.signals import TokenView  # noqa: E402

PARAMS = {"vtc_cls": {"start_layer": 2}}  # the 6-layer benchmark tower


def make_view(config, projector, selector, n: int, text: int, device: str = "cpu") -> TokenView:
    view = _cpu_view(config, projector, selector, n, text)
    if device != "cpu":
        moved = _moved(view, device)
        moved.text = _moved(view.text, device)
        return moved
    return view


def _moved(view: TokenView, device: str) -> TokenView:
    """``view`` with its tensors (and per-layer tensors) on ``device``; the index stays on the CPU."""
    for name, value in vars(view).items():
        if isinstance(value, torch.Tensor) and name != "index":
            setattr(view, name, value.to(device))
        elif isinstance(value, dict):
            setattr(view, name, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in value.items()})
    return view


def _cpu_view(config, projector, selector, n: int, text: int) -> TokenView:
    g = torch.Generator().manual_seed(0)
    t, v = config.text_config, config.vision_config
    side = round(n**0.5)
    grid = (side, side) if side * side == n else None
    view = TokenView(index=torch.arange(n), grid=grid, image=0)
    view.text = TokenView(index=torch.arange(text), grid=None, image=0)
    d, dv, dk = t.hidden_size, v.hidden_size, v.hidden_size // v.num_attention_heads
    for r in selector.requests(selector.default_layer, v.num_hidden_layers):
        if r.name == "features":
            view.all_features = torch.randn(n, d, generator=g)
            view.features = view.all_features
        elif r.name in ("cls_attention", "llm_attention", "received_attention"):
            getattr(view, r.name)[r.layer] = torch.rand(n, generator=g)
        elif r.name == "incoming_attention":
            view.incoming_attention = torch.rand(n, generator=g)
        elif r.name == "text_attention":
            view.text_attention[r.layer] = torch.rand(text, n, generator=g)
        elif r.name == "llm_keys":
            view.llm_keys[r.layer] = torch.randn(n, d, generator=g)
            view.text.llm_keys[r.layer] = torch.randn(text, d, generator=g)
        elif r.name in ("hidden", "normed_hidden", "embeddings"):
            setattr(view, r.name, torch.randn(n, d, generator=g))
            setattr(view.text, r.name, torch.randn(text, d, generator=g))
        elif r.name in ("vision_hidden", "projector"):
            view.vision_hidden = torch.randn(n, dv, generator=g)
            view.cls_hidden = torch.randn(dv, generator=g)
            view.project = lambda x: projector.forward(x.to(next(projector.parameters())))
        elif r.name == "vision_keys":
            view.vision_keys, view.cls_key = torch.randn(n, dk, generator=g), torch.randn(dk, generator=g)
    return view


def tower_decisions(config, selector, n: int, keep: int, device: str = "cpu") -> float:
    """A tower selector's own work over one image's vision forward (every layer's scores, every pruning step) with
    random queries, keys and values at the tower's widths; nearly flat attention, so few tokens go early (the most
    work). Returns seconds."""
    v = config.vision_config
    heads, dk = v.num_attention_heads, v.hidden_size // v.num_attention_heads
    feature = v.num_hidden_layers - 2  # features from hidden_states[-2]
    g = torch.Generator().manual_seed(0)
    state, count, elapsed = {}, n, 0.0
    prune_after = selector.prune_after(feature)
    for layer in range(feature):
        q, k, value = (torch.randn(1, heads, 1 + count, dk, generator=g).to(device) for _ in range(3))
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        selector.observe(state, q, k, value, None, dk**-0.5)
        if layer in prune_after:
            count = int(selector.prune(state, layer, feature, [count], keep)[0].numel())
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
    return elapsed


def one_case(args, method: str, n: int) -> None:
    """Child process: time one decision, the median of ``--repeats`` after a discarded warm-up (a cold first call
    overstates the cost: lazy imports, allocator growth)."""
    config = build(args, config_only=True)  # the child needs the widths and the projector, not the model
    projector = LlavaMultiModalProjector(config).eval()
    selector = create_selector(method, **PARAMS.get(method, {}))
    keep = max(1, round(args.ratio * n))
    times = []
    with torch.no_grad():
        view = None if selector.tower else make_view(config, projector, selector, n, args.text)
        for _ in range(args.repeats + 1):
            if selector.tower:
                elapsed = tower_decisions(config, selector, n, keep)
            else:
                start = time.perf_counter()
                selector.select(view, keep)
                elapsed = time.perf_counter() - start
            times.append(elapsed)
    print(f"{statistics.median(times[1:]):.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--tokens", type=int, nargs="+", default=[576, 6272])
    parser.add_argument("--ratio", type=float, default=0.111, help="fraction kept (64 of 576)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        one_case(args, args.one[0], int(args.one[1]))
        return
    model = build(args)
    methods = args.methods or vlprune.list_methods("image")
    forwarded = [a for a in sys.argv[1:] if a != "--methods" and a not in methods]
    print(f"decoder {args.layers} x {args.hidden}, vision {args.vision_layers} x {args.vision_hidden}, "
          f"keep {args.ratio:.3f} of the visual tokens, {torch.get_num_threads()} threads")  # fmt: skip
    for n in args.tokens:
        embeds = torch.randn(1, n + args.text, model.config.text_config.hidden_size)
        prefill = median_time(model, {"inputs_embeds": embeds}, args.repeats)
        print(f"\n{n} visual tokens: unpruned decoder prefill {prefill * 1000:.0f} ms")
        print(f"{'method':<12}{'select ms':>11}{'of prefill':>12}")
        for method in methods:
            out = subprocess.run(
                [sys.executable, __file__, *forwarded, "--one", method, str(n)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            elapsed = float(out[-1])
            print(f"{method:<12}{elapsed * 1000:>11.1f}{elapsed / prefill:>11.1%}")


if __name__ == "__main__":
    main()
