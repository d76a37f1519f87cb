"""The markdown report of ``benchmarks/gpu.py``'s JSON, and the README's efficiency table drawn from it.

    python benchmarks/gpu_report.py benchmarks/results/DATE-MACHINE.json            # print the report
    python benchmarks/gpu_report.py benchmarks/results/DATE-MACHINE.json --readme   # rewrite the README's table

Each goal of the GPU issue is marked met or missed with the measured figure.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

README_START, README_END = "<!-- gpu-table:start -->", "<!-- gpu-table:end -->"


def _ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.2f}"


def _goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def goals(report: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, met/missed) for each goal that the report has numbers for."""
    sections = report.get("sections", {})
    out = []
    llava = sections.get("llava", {})
    rows = llava.get("rows", [])
    pre64 = [
        r for r in rows if r.get("method") in ("uniform", "divprune", "fastervlm", "visionzip") and r["keep"] == 64
    ]
    if pre64:
        worst = min(r["achieved"] for r in pre64)
        out.append(("pre-LLM speed-up at 64/576 >= 0.9 of the FLOP-ratio limit",
                    ", ".join(f"{r['method']} {r['achieved']:.2f}" for r in pre64), _goal(worst >= 0.9)))  # fmt: skip
    over = [r for r in rows if "over_limit" in r]
    if over:
        worst = max(r["over_limit"] for r in over)
        out.append(("vlprune's machinery <= 5 % over the limit (pre-LLM)",
                    f"median {statistics.median(r['over_limit'] for r in over):+.1%}, worst {worst:+.1%}",
                    _goal(worst <= 0.05)))  # fmt: skip
    hooks = llava.get("decode_hooks", {})
    per_method = {k: v for k, v in hooks.items() if isinstance(v, dict)}
    if per_method:
        worst = max(v["overhead"] for v in per_method.values())
        out.append(
            (
                "hook work per decoding step <= 2 % of the step",
                ", ".join(f"{k} {v['overhead']:+.1%}" for k, v in per_method.items()),
                _goal(worst <= 0.02),
            )
        )
    selectors = [r for r in sections.get("selectors", {}).get("rows", []) if "share" in r]
    for n, limit in ((576, 0.02), (6272, 0.05)):
        at = [r for r in selectors if r["tokens"] == n]
        if at:
            worst = max(at, key=lambda r: r["share"])
            missed = [f"{r['method']} {r['share']:.1%}" for r in at if r["share"] > limit]
            out.append((f"selector decision <= {limit:.0%} of the unpruned prefill at {n} tokens",
                        f"worst {worst['method']} {worst['share']:.1%}" + (f" (over: {', '.join(missed)})" if missed
                                                                          else ""), _goal(not missed)))  # fmt: skip
    kernels = sections.get("kernels", {}).get("rows", [])
    if kernels:
        worst = min(kernels, key=lambda r: r["of_copy"])
        out.append(("kernels >= 80 % of copy bandwidth", f"worst {worst['op']} {worst['case']} B={worst['batch']}: "
                    f"{worst['of_copy']:.0%}", _goal(worst["of_copy"] >= 0.8)))  # fmt: skip
    in_llm = [r for r in rows if r.get("method") in ("fastv", "sparsevlm", "pdrop")]
    if in_llm:
        worst = min(in_llm, key=lambda r: r["throughput_8_over_1"])
        out.append(("batch-8 prefill throughput >= 6x batch-1 with in-LLM pruning",
                    f"worst {worst['setting']} {worst['throughput_8_over_1']:.1f}x",
                    _goal(worst["throughput_8_over_1"] >= 6)))  # fmt: skip
    return out


def llava_table(report: dict) -> list[str]:
    rows = report.get("sections", {}).get("llava", {}).get("rows", [])
    lines = [
        "| setting | prefill ms | speed-up | FLOP ratio | achieved | over limit | b8 prefill ms | b8 speed-up | "
        "b8/b1 throughput | decode tok/s (one run) | KV MiB | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base8 = rows[0]["prefill8_s"] if rows else None
    for r in rows:
        over = f"{r['over_limit']:+.1%}" if "over_limit" in r else ""
        lines.append(
            f"| {r['setting']} | {_ms(r['prefill_s'])} | {r['speedup']:.2f}x | {r['flop_ratio']:.3f} | "
            f"{r['achieved']:.0%} | {over} | {_ms(r['prefill8_s'])} | {base8 / r['prefill8_s']:.2f}x | "
            f"{r['throughput_8_over_1']:.1f}x | {r['decode_tok_s']:.1f} | {r['kv_bytes'] / 2**20:.0f} | "
            f"{r['peak_bytes'] / 2**30:.1f} |"
        )
    return lines


def render(report: dict) -> str:
    m = report.get("machine", {})
    sections = report.get("sections", {})
    out = [f"# vlprune on {m.get('device', '?')} ({m.get('date', '?')})", "",
           f"torch {m.get('torch')}, CUDA {m.get('cuda', '—')}, Triton {m.get('triton', '—')}, transformers "
           f"{m.get('transformers')}, Python {m.get('python')}, vlprune {m.get('vlprune')}. Random bf16 weights "
           "(configs of the real models), SDPA; times are CUDA-event medians after warm-ups.", "", "## Goals", "",
           "| goal | measured | |", "|---|---|---|"]  # fmt: skip
    out += [f"| {g} | {v} | {ok} |" for g, v, ok in goals(report)]
    for name, section in sections.items():
        if "error" in section:
            out += ["", f"Section `{name}` failed: `{section['error']}`"]
        for setting, error in section.get("errors", {}).items():
            out += ["", f"`{setting}` failed: `{error}`"]
    tests = sections.get("cuda_tests")
    if tests:
        out += ["", "## CUDA tests", "", f"`pytest -m cuda tests/test_cuda.py tests/test_kernels.py`: "
                f"{tests.get('summary', '?')} (exit {tests.get('returncode')})"]  # fmt: skip
    if sections.get("llava", {}).get("rows"):
        llava = sections["llava"]
        out += ["", "## LLaVA-1.5-7B geometry (CLIP-L/336, 32 x 4096 Llama, 576 image + 60 text tokens), bf16", ""]
        out += llava_table(report)
        hooks = llava.get("decode_hooks", {})
        if hooks:
            out += ["", f"Decoding step unwrapped: {_ms(hooks.get('unwrapped_step_s'))} ms; wrapped, keeping every "
                    "token (the same cache; the difference is the hooks): " + ", ".join(
                        f"{k} {_ms(v['step_s'])} ms ({v['overhead']:+.1%})" for k, v in hooks.items()
                        if isinstance(v, dict))]  # fmt: skip
    video = sections.get("video", {}).get("rows", [])
    if video:
        out += ["", "## Video geometry (LLaVA-OneVision-7B: SigLIP-so400m, Qwen2-7B), 25 % kept", "",
                "| frames | tokens | method | decision ms | share of prefill | prefill ms | speed-up | FLOP ratio |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in video:
            if r.get("error"):
                out.append(f"| {r['frames']} | {r['tokens']} | {r['method']} | error: {r['error'][:80]} | | | | |")
                continue
            share = f"{r['decision_share']:.1%}" if "decision_share" in r else ""
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            ratio = f"{r['flop_ratio']:.3f}" if "flop_ratio" in r else ""
            out.append(f"| {r['frames']} | {r['tokens']} | {r['method'] or 'unpruned'} | {_ms(r.get('decision_s'))} "
                       f"| {share} | {_ms(r.get('prefill_s'))} | {speed} | {ratio} |")  # fmt: skip
    decode = sections.get("decode", {}).get("rows", [])
    if decode:
        n = sections["decode"].get("new_tokens")
        out += ["", f"## Time to first token and decoding ({n} new tokens; medians of 3 after a warm-up), and where "
                "a batch-1 prefill's time goes", "",
                "| setting | TTFT b1 ms | decode b1 tok/s | TTFT b8 ms | decode b8 tok/s | prefill wall ms | its "
                "kernels' device ms |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['method']} keep={r['keep']} | {_ms(r['ttft_b1_s'])} | {r['decode_b1_tok_s']:.1f} | "
                f"{_ms(r['ttft_b8_s'])} | {r['decode_b8_tok_s']:.1f} | {_ms(r['prefill_wall_s'])} | "
                f"{_ms(r['prefill_device_s'])} |" for r in decode]  # fmt: skip
    kernels = sections.get("kernels", {}).get("rows", [])
    if kernels:
        out += ["", "## Kernels (Triton against the PyTorch reference)", "",
                "| op | case | batch | Triton ms | reference ms | speed-up | GB/s | of copy |",
                "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['op']} | {r['case']} | {r['batch']} | {r['fused_ms']:.3f} | {r['reference_ms']:.3f} | "
                f"{r['speedup']:.2f}x | {r['gbs']:.0f} | {r['of_copy']:.0%} |" for r in kernels]  # fmt: skip
    selectors = sections.get("selectors", {}).get("rows", [])
    if selectors:
        out += ["", "## Selectors' own decision time (keep 1/9), share of the unpruned prefill", "",
                "| method | tokens | decision ms | share |", "|---|---|---|---|"]  # fmt: skip
        for r in selectors:
            if "error" in r:
                out.append(f"| {r['method']} | {r['tokens']} | error: {r['error'][:80]} | |")
            else:
                out.append(f"| {r['method']} | {r['tokens']} | {_ms(r['decision_s'])} | {r['share']:.1%} |")
    profile = sections.get("profile", {})
    for label, data in profile.items():
        if not isinstance(data, dict) or "top" not in data:
            continue
        out += [
            "",
            f"## Profile: {label} ({data['host_syncs']} host syncs)",
            "",
            "| op | ms | calls |",
            "|---|---|---|",
        ]
        out += [f"| `{e['name']}` | {e['ms']:.2f} | {e['count']} |" for e in data["top"]]
    return "\n".join(out) + "\n"


def readme_table(report: dict, source: str) -> str:
    m = report.get("machine", {})
    lines = [
        README_START,
        "",
        f"Measured on {m.get('device')} ({m.get('date')}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}), random bf16 weights at LLaVA-1.5-7B geometry; full report: `{source}`.",
        "",
    ]
    lines += llava_table(report)
    lines += ["", README_END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table between its markers")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    if not args.readme:
        print(render(report))
        return
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {README_START} ... {README_END} markers")
    source = args.report.as_posix()
    readme.write_text(pattern.sub(lambda _: readme_table(report, source), text))


if __name__ == "__main__":
    main()
