"""Video pruning: each method's own decision time and peak extra memory at 6,272 and 25,088 visual tokens (32 and 128
frames of 196 tokens), and the prefill speed-up on a LLaVA-OneVision-architecture random model with a video prompt.

    python benchmarks/video.py [--frames 32 128 --width 3584 --ratio 0.25 --methods dycoke divprune ...]
                               [--prefill-frames 16 --hidden 512 --layers 4 --vision-hidden 128 --repeats 3]

Decisions: the selector sees one video's features (random values at ``--width``, every other position static over
time with a little noise, as temporal methods expect) in (frames, 14 x 14) layout and keeps ``--ratio`` of its
tokens (``query_frames``: random 384 px decoded frames and a question, CLIP ViT-B-32 with random weights). Time
is the median over ``--repeats`` runs after a warm-up; peak extra memory is the rise of the process's
peak resident memory during the decision (Linux ``/proc/self/clear_refs``), or of CUDA's peak allocation with
``--device cuda``. On the CPU each method's decisions run in a process of their own (memory the allocator kept
from an earlier method would hide a later one's peak); ``--decisions-only`` is that process's mode.

Prefill: the whole forward (vision tower, projector, 2 x 2 pooling, decoder,
``logits_to_keep=1``) of one prompt with a video of ``--prefill-frames`` frames at 384 px (196 tokens each), unpruned
vs each method at ``--ratio`` (at its default layer), side by side in this process, with the analytic FLOP ratio
(:class:`vlprune.eval.measure.FlopCount`).
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
PARAMS = {"query_frames": {"pretrained": None}}  # ViT-B-32 with random weights: the same cost, no download
QUESTION = "what does the person in the video do after opening the door ?"


def decoded_frames(frames: int, side: int = 384):
    """Random decoded frames (frames, side, side, 3) uint8, for methods reading the ``query`` signal."""
    return torch.randint(0, 256, (frames, side, side, 3), dtype=torch.uint8, generator=torch.Generator()).numpy()


IMAGE_METHODS = ["divprune", "dart", "random", "uniform", "pool"]  # pre-LLM or feature-only image methods


def status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``: peak since :func:`reset_peak`), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def video_view(selector, frames: int, width: int, device: str) -> TokenView:
    """One video's candidates with the signals ``selector`` requests (random values, half the positions static)."""
    g = torch.Generator().manual_seed(0)
    n = frames * SIDE * SIDE
    view = TokenView(index=torch.arange(n), grid=(SIDE, SIDE), image=0, frames=frames)
    view.text = TokenView(index=torch.arange(32), grid=None, image=0)
    for r in selector.requests(selector.default_layer, 24):
        if r.name == "features":  # half the positions static over time (with a little noise), half new each frame
            base = torch.randn(1, SIDE * SIDE, width, generator=g).expand(frames, -1, -1)
            moving = torch.randn(frames, SIDE * SIDE, width, generator=g)
            noise = torch.randn(frames, SIDE * SIDE, width, generator=g)
            static = (torch.arange(SIDE * SIDE) % 2 == 0)[None, :, None]
            features = torch.where(static, base + 0.05 * noise, moving).reshape(n, width)
            view.features = view.all_features = features.to(device)
        elif r.name == "received_attention":
            view.received_attention = torch.rand(n, generator=g).to(device)
        elif r.name in ("hidden", "normed_hidden", "embeddings"):
            setattr(view, r.name, torch.randn(n, width, generator=g).to(device))
            setattr(view.text, r.name, torch.randn(32, width, generator=g).to(device))
        elif r.name == "llm_keys":
            view.llm_keys[r.layer] = torch.randn(n, width, generator=g).to(device)
            view.text.llm_keys[r.layer] = torch.randn(32, width, generator=g).to(device)
        elif r.name == "llm_attention":
            view.llm_attention[r.layer] = torch.rand(n, generator=g).to(device)
        elif r.name == "query":
            view.question, view.raw_frames = QUESTION, decoded_frames(frames)
    return view


def decision_cost(method: str, frames: int, args) -> tuple[float, int]:
    """(median seconds, peak extra bytes) of one decision on a video of ``frames`` frames."""
    selector = create_selector(method, **PARAMS.get(method, {}))
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
            base = status_bytes("VmRSS")
        start = time.perf_counter()
        selector.select(view, keep)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        extra = max(extra, (torch.cuda.max_memory_allocated() if cuda else status_bytes("VmHWM")) - base)
    return statistics.median(times), extra


def decision_row_apart(method: str, argv: list[str]) -> str:
    """``method``'s decision row, measured by this script in a process of its own (the other options as given)."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop --methods and its values
        if a == "--methods":
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    command = [sys.executable, __file__, *rest, "--decisions-only", "--methods", method]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def onevision_model(args):
    """A LLaVA-OneVision-architecture random model: SigLIP at 384 px (27 x 27 patches, pooled to 14 x 14 per frame),
    a Qwen2 decoder, at the widths given."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    torch.manual_seed(0)
    vision = SiglipVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=args.vision_hidden * 4, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), image_size=384, patch_size=14,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=1024, bos_token_id=1, eos_token_id=2, hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=1000, video_token_id=1001,
        vision_feature_layer=-1, vision_feature_select_strategy="full",
    )  # fmt: skip
    return LlavaOnevisionForConditionalGeneration(config).eval()


def video_prompt(frames: int, text: int) -> dict:
    """One prompt: text, a video of ``frames`` frames (196 tokens each, then its newline), text."""
    placeholders = frames * SIDE * SIDE + 1
    ids = torch.cat(
        [torch.randint(3, 900, (text // 2,)), torch.full((placeholders,), 1001), torch.randint(3, 900, (text // 2,))]
    )[None]
    return dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=torch.randn(1, frames, 3, 384, 384)
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
    parser.add_argument("--decisions-only", action="store_true", help="the decision rows alone, in this process")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or vlprune.list_methods("video") + IMAGE_METHODS
    print(f"decisions: width {args.width}, keep {args.ratio:.0%} of each video, {args.device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'method':<10}" + "".join(f"{f'{f} fr ({f * SIDE * SIDE} tok)':>28}" for f in args.frames))
    for method in methods:
        if args.device == "cpu" and not args.decisions_only:  # a fresh process per method: see the docstring
            print(decision_row_apart(method, argv if argv is not None else sys.argv[1:]), flush=True)
            continue
        cells = []
        with torch.no_grad():
            for frames in args.frames:
                seconds, extra = decision_cost(method, frames, args)
                cells.append(f"{seconds * 1e3:>10.1f} ms {extra / 2**20:>9.1f} MiB")
        print(f"{method:<10}" + "".join(f"{c:>28}" for c in cells), flush=True)
    if args.decisions_only:
        return

    model = onevision_model(args)
    inputs = video_prompt(args.prefill_frames, args.text)
    tokens = args.prefill_frames * SIDE * SIDE
    base_time, base_flops = median_time(model, inputs, args.repeats), prefill_flops(model, inputs)
    widths = f"decoder {args.layers} x {args.hidden}, vision {args.vision_layers} x {args.vision_hidden}"
    video = f"one video of {args.prefill_frames} frames = {tokens} tokens, keep {args.ratio:.0%}"
    print(f"\nprefill: LLaVA-OneVision architecture, {widths}, {video}")
    print(f"{'setting':<12}{'prefill s':>10}{'speed-up':>10}{'FLOP ratio':>12}")
    print(f"{'unpruned':<12}{base_time:>10.3f}{1.0:>10.2f}{1.0:>12.3f}")
    for method in methods:
        if vlprune.support_table()[method]["llava_onevision"] == "no":
            continue
        with vlprune.wrap(model, method, ratio=args.ratio, **PARAMS.get(method, {})) as pruned:  # default layer
            pruned.set_query(QUESTION, videos=[decoded_frames(args.prefill_frames)])
            seconds, flops = median_time(model, inputs, args.repeats), prefill_flops(model, inputs)
        print(f"{method:<12}{seconds:>10.3f}{base_time / seconds:>10.2f}{flops / base_flops:>12.3f}")


if __name__ == "__main__":
    main()
