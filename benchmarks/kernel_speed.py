"""Each kernel against its PyTorch reference, side by side in one run, and its achieved memory bandwidth as a fraction
of the device's measured copy bandwidth.

    python benchmarks/kernel_speed.py            # on a CUDA GPU with Triton
    python benchmarks/kernel_speed.py --smoke    # tiny sizes through Triton's interpreter on the CPU: checks the script

Sizes: LLaVA-1.5 (576 visual of 640 tokens, D = 4096, 32 layers x 32 KV heads) and video (6,272 visual of 6,400
tokens, D = 3,584, M-RoPE rows, 28 layers x 4 KV heads), batch 1 and 8, a quarter of the visual tokens kept.
``merge_compact`` merges every dropped visual token into a random kept one. Bytes are what an ideal pass moves: the
kept rows read and written (every merged source read as well). Times are medians of CUDA-event timings after
warm-up; the reference is timed on the same packed indices.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

CASES = {  # name: (tokens, visual tokens, hidden width, rotary width, position rows, layers, kv heads)
    "llava-1.5": (640, 576, 4096, 128, 0, 32, 32),
    "video": (6400, 6272, 3584, 128, 3, 28, 4),
}
SMOKE = {"llava-1.5": (40, 32, 48, 8, 0, 2, 2), "video": (70, 64, 40, 8, 3, 2, 1)}


def timed(fn, repeats: int, device: str, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` (CUDA events on ``"cuda"``, the wall clock elsewhere) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes/s of a plain device-to-device copy (read + write) of a large buffer."""
    n = (1 << 28) if device == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), repeats, device)


def inputs(case, batch: int, dtype, device: str, seed: int = 0):
    from vlprune import kernels

    length, visual, dim, width, pos_rows, layers, heads = case
    g = torch.Generator().manual_seed(seed)
    text = length - visual
    keep, merges = [], []
    for _ in range(batch):
        kept_visual = torch.randperm(visual, generator=g)[: visual // 4].sort().values + text // 2
        kept = torch.cat([torch.arange(text // 2), kept_visual, torch.arange(text // 2 + visual, length)])
        dropped = torch.tensor(sorted(set(range(text // 2, text // 2 + visual)) - set(kept_visual.tolist())))
        targets = kept_visual[torch.randint(0, kept_visual.numel(), (dropped.numel(),), generator=g)]
        merges.append(
            (
                torch.cat([kept_visual, dropped]).to(device),
                torch.cat([kept_visual, targets]).to(device),
                torch.rand(visual, generator=g).to(device),
            )
        )
        keep.append(kept.to(device))
    hidden = torch.randn(batch, length, dim, dtype=dtype, device=device)
    tokens = {
        "mask": torch.ones(batch, length, dtype=torch.bool, device=device),
        "rows": torch.arange(length, device=device).expand(batch, length).contiguous(),
        "position_ids": torch.arange(length, device=device).expand(*([pos_rows] if pos_rows else []), batch, length),
        "cos": torch.randn(batch, length, width, dtype=dtype, device=device),
        "sin": torch.randn(batch, length, width, dtype=dtype, device=device),
    }
    tokens["position_ids"] = tokens["position_ids"].contiguous()
    cache = [torch.randn(batch, heads, length, 128, dtype=dtype, device=device) for _ in range(2 * layers)]
    ragged = kernels.pack(keep, length, hidden.device)
    return ragged, merges, hidden, tokens, cache


def operations(case, batch: int, dtype, device: str) -> dict:
    """op name -> (Triton call, reference call, bytes an ideal pass moves) on one case's inputs."""
    from vlprune import kernels
    from vlprune.kernels import reference, triton_ops

    ragged, merges, hidden, tokens, cache = inputs(case, batch, dtype, device)
    table = kernels.merge_table(ragged, merges, hidden.shape[1])
    element = hidden.element_size()
    kept = int(ragged.counts.sum())
    ids = tokens["position_ids"]
    id_rows = ids.shape[0] if ids.dim() == 3 else 1
    int_bytes = kept * (8 + 16 + 16 * id_rows + 2)  # keep index; rows, position ids, mask read + written
    token_bytes = 2 * kept * (hidden.shape[-1] + 2 * tokens["cos"].shape[-1]) * element + int_bytes
    source_bytes = int(table.count.sum()) * hidden.shape[-1] * element
    heads, width = cache[0].shape[1], cache[0].shape[-1]
    return {
        "compact": (
            lambda: triton_ops.compact(ragged, hidden, **tokens),
            lambda: reference.compact(ragged, hidden, **tokens),
            token_bytes,
        ),
        "merge_compact": (
            lambda: triton_ops.compact(ragged, hidden, **tokens, table=table),
            lambda: reference.compact(ragged, hidden, **tokens, merges=merges),
            token_bytes + source_bytes,
        ),
        "gather_cache": (
            lambda: triton_ops.gather_cache(ragged, cache),
            lambda: reference.gather_cache(ragged, cache),
            2 * len(cache) * heads * kept * width * element,
        ),
    }


def run(args) -> list[dict]:
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bandwidth = copy_bandwidth(device, args.repeats)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (Triton interpreter)'}")
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s; dtype {dtype}")
    rows = []
    for name, case in (SMOKE if args.smoke else CASES).items():
        for batch in args.batches:
            for op, (fused, ref, moved) in operations(case, batch, dtype, device).items():
                t_fused = timed(fused, args.repeats, device)
                t_ref = timed(ref, args.repeats, device)
                r = dict(op=op, case=name, batch=batch, fused_ms=t_fused * 1e3, reference_ms=t_ref * 1e3)
                r.update(speedup=t_ref / t_fused, gbs=moved / t_fused / 1e9, of_copy=moved / t_fused / bandwidth)
                rows.append(r)
                print(
                    f"{op:14s} {name:10s} B={batch}  triton {r['fused_ms']:8.3f} ms  reference {r['reference_ms']:8.3f}"
                    f" ms  x{r['speedup']:5.2f}  {r['gbs']:7.1f} GB/s = {r['of_copy']:5.1%} of copy"
                )
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU through Triton's interpreter")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.repeats = min(args.repeats, 2)
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA GPU (or --smoke for the CPU interpreter)")
    return run(args)


if __name__ == "__main__":
    main()
