"""Video pruning: each method's own decision time and peak extra memory at 6,272 and 25,088 visual tokens (32 and 128
frames of 196 tokens), and the prefill speed-up on a Qwen2.5-VL-architecture random model with a video prompt.

    python benchmarks/video.py [--frames 32 128 --width 3584 --ratio 0.25 --methods dycoke divprune ...]
                               [--prefill-frames 16 --hidden 512 --layers 4 --vision-hidden 128 --repeats 3]

Decisions: the selector sees one video's features (random values at ``--width``: the cost does not depend on them)
in (frames, 14 x 14) layout and keeps ``--ratio`` of its tokens. Time is the median over ``--repeats`` runs after a
warm-up; peak extra memory is the rise of the process's peak resident memory during the decision (Linux
``/proc/self/clear_refs``), or of CUDA's peak allocation with ``--device cuda``. Prefill: the whole forward (vision
tower, merger, decoder, ``logits_to_keep=1``) of one prompt with a video of ``--prefill-frames`` frames at 392 px
(196 tokens per temporal patch of two frames), unpruned vs each method at ``--ratio`` before the LLM, side by side in
this process, with the analytic FLOP ratio (:class:`vlprune.eval.measure.FlopCount`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from prefill import median_time  # noqa: E402

import vlprune  # noqa: E402
from vlprune.eval.measure import FlopCount  # noqa: E402
from vlprune.registry import create_selector  # noqa: E402
from vlprune.signals import TokenView  # noqa: E402

SIDE = 14  # tokens per frame side: 196 per frame (LLaVA-OneVision after its 2 x 2 pooling)
IMAGE_METHODS = ["divprune", "dart", "random", "uniform", "pool"]  # pre-LLM or feature-only image methods


def peak_rss() -> int:
    """Peak resident memory of this process since the last :func:`reset_peak`, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def video_view(selector, frames: int, width: int, device: str) -> TokenView:
    """One video's candidates with the signals ``selector`` requests (random values)."""
    g = torch.Generator().manual_seed(0)
    n = frames * SIDE * SIDE
    view = TokenView(index=torch.arange(n), grid=(SIDE, SIDE), image=0, frames=frames)
    view.text = TokenView(index=torch.arange(32), grid=None, image=0)
    for r in selector.requests(selector.default_layer, 24):
        if r.name == "features":
            view.features = view.all_features = torch.randn(n, width, generator=g).to(device)
        elif r.name in ("hidden", "normed_hidden", "embeddings"):
            setattr(view, r.name, torch.randn(n, width, generator=g).to(device))
            setattr(view.text, r.name, torch.randn(32, width, generator=g).to(device))
        elif r.name == "llm_keys":
            view.llm_keys[r.layer] = torch.randn(n, width, generator=g).to(device)
            view.text.llm_keys[r.layer] = torch.randn(32, width, generator=g).to(device)
        elif r.name == "llm_attention":
            view.llm_attention[r.layer] = torch.rand(n, generator=g).to(device)
    return view


def decision_cost(method: str, frames: int, args) -> tuple[float, int]:
    """(median seconds, peak extra bytes) of one decision on a video of ``frames`` frames."""
    selector = create_selector(method)
    view = video_view(selector, frames, args.width, args.device)
    keep = round(args.ratio * view.n)
    cuda = args.device == "cuda"
    selector.select(view, keep)  # warm-up
    times, extra = [], 0
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak()
            base = current_rss()
        start = time.perf_counter()
        selector.select(view, keep)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        extra = max(extra, (torch.cuda.max_memory_allocated() if cuda else peak_rss()) - base)
    return statistics.median(times), extra


def qwen_video_model(args):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(
        vocab_size=1024, bos_token_id=1, eos_token_id=2,
        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
    )  # fmt: skip
    vision = dict(
        depth=args.vision_layers, hidden_size=args.vision_hidden, intermediate_size=args.vision_hidden * 4,
        out_hidden_size=args.hidden, num_heads=max(1, args.vision_hidden // 64), patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[args.vision_layers - 1],
    )  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=1000, video_token_id=1001,
        vision_start_token_id=1002, vision_end_token_id=1003,
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def video_prompt(model, frames: int, text: int) -> dict:
    t, h, w = frames // 2, 2 * SIDE, 2 * SIDE  # temporal patches of two frames; 28 x 28 patches -> 14 x 14 tokens
    video = t * SIDE * SIDE
    ids = torch.cat([torch.randint(3, 900, (text // 2,)), torch.tensor([1002]), torch.full((video,), 1001)])
    ids = torch.cat([ids, torch.tensor([1003]), torch.randint(3, 900, (text // 2,))])[None]
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values_videos=torch.randn(t * h * w, 3 * 2 * 14 * 14),
        video_grid_thw=torch.tensor([[t, h, w]]),
        mm_token_type_ids=2 * (ids == 1001).int(),
    )


def prefill_flops(model, inputs) -> float:
    with torch.no_grad(), FlopCount(model) as count:
        model(**inputs, logits_to_keep=1)
    return count.total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--width", type=int, default=3584, help="feature width (Qwen2-7B / LLaVA-OV-7B)")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prefill-frames", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--text", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or vlprune.list_methods("video") + IMAGE_METHODS
    print(f"decisions: width {args.width}, keep {args.ratio:.0%} of each video, {args.device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'method':<10}" + "".join(f"{f'{f} fr ({f * SIDE * SIDE} tok)':>28}" for f in args.frames))
    for method in methods:
        cells = []
        with torch.no_grad():
            for frames in args.frames:
                seconds, extra = decision_cost(method, frames, args)
                cells.append(f"{seconds * 1e3:>10.1f} ms {extra / 2**20:>9.1f} MiB")
        print(f"{method:<10}" + "".join(f"{c:>28}" for c in cells))

    model = qwen_video_model(args)
    inputs = video_prompt(model, args.prefill_frames, args.text)
    tokens = int((inputs["input_ids"] == 1001).sum())
    base_time, base_flops = median_time(model, inputs, args.repeats), prefill_flops(model, inputs)
    widths = f"decoder {args.layers} x {args.hidden}, vision {args.vision_layers} x {args.vision_hidden}"
    video = f"one video of {args.prefill_frames} frames = {tokens} tokens, keep {args.ratio:.0%}"
    print(f"\nprefill: Qwen2.5-VL architecture, {widths}, {video}")
    print(f"{'setting':<12}{'prefill s':>10}{'speed-up':>10}{'FLOP ratio':>12}")
    print(f"{'unpruned':<12}{base_time:>10.3f}{1.0:>10.2f}{1.0:>12.3f}")
    for method in methods:
        if vlprune.support_table()[method]["qwen2_5_vl"] == "no":
            continue
        with vlprune.wrap(model, method, ratio=args.ratio):  # each method at its own default layer
            seconds, flops = median_time(model, inputs, args.repeats), prefill_flops(model, inputs)
        print(f"{method:<12}{seconds:>10.3f}{base_time / seconds:>10.2f}{flops / base_flops:>12.3f}")


if __name__ == "__main__":
    main()
