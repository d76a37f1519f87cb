"""vlprune on a GPU at real size: the CUDA tests, LLaVA-1.5-7B prefill and decode, video geometry, kernels and the
selectors' share, written to a JSON file and a markdown report.

    python benchmarks/gpu.py --out DIR [--sections cuda_tests,llava,video,kernels,selectors,profile]
                             [--resume DIR/gpu.json] [--smoke]

Models are built from their configs with random bf16 weights: on the ``meta`` device, materialised on CUDA, then
initialised there (a 7B model never touches the CPU). ``--smoke`` runs every section at toy sizes on the CPU (fp32,
wall-clock timers) to check the script without a GPU. Each section's results are written as soon as it finishes;
``--resume`` keeps the sections an earlier run completed and runs the rest.

Timings are CUDA-event medians of ``--repeats`` runs after warm-ups, side by side in one process. "FLOP ratio" is
:class:`vlprune.eval.measure.FlopCount`'s analytic prefill FLOPs pruned over unpruned; "achieved" is the measured
speed-up over the speed-up that ratio allows. "Limit" (pre-LLM methods) is the unwrapped model's own parts run
directly on the already gathered tokens: the vision tower and projector on the whole image, then the language model
on the text and kept tokens; vlprune's machinery is the time over that limit.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kernel_speed  # noqa: E402

import vlprune  # noqa: E402
from vlprune import hf  # noqa: E402
from vlprune.eval.measure import FlopCount, kv_cache_bytes  # noqa: E402

LLAVA_METHODS = ["fastv", "sparsevlm", "pdrop", "visionzip", "divprune", "dart", "flowcut", "fastervlm", "uniform"]
BUDGETS = [192, 128, 64]
PRE_LLM = {"visionzip", "divprune", "dart", "flowcut", "fastervlm", "uniform"}
SECTIONS = ["llava", "cuda_tests", "kernels", "selectors", "video", "profile", "decode"]


# --- timing -------------------------------------------------------------------------------------------------------
def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (CUDA events on a GPU, wall clock on the CPU) after ``warmup`` discarded calls."""
    return kernel_speed.timed(fn, repeats, "cuda" if torch.cuda.is_available() else "cpu", warmup)


def peak_bytes(fn) -> int:
    """Peak CUDA allocation during ``fn()`` (0 on the CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


# --- models -------------------------------------------------------------------------------------------------------
def materialise(model_class, config, device: str, dtype):
    """``model_class(config)`` built on ``meta``, materialised on ``device`` and initialised there, in ``dtype``."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default)
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()  # parameters and the non-persistent buffers (rotary frequencies, position ids)
    return model.to(dtype).eval()


def llava_config(smoke: bool):
    """LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches, features from the second-to-last layer), a 32 x 4096
    Llama decoder. ``smoke``: the same layout at toy widths."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if smoke:
        text = LlamaConfig(vocab_size=32064, hidden_size=64, intermediate_size=176, num_hidden_layers=32,
                           num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                  image_size=336, patch_size=14)  # fmt: skip
    else:
        text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                           rms_norm_eps=1e-5)  # fmt: skip
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=0)  # fmt: skip


def llava_prompts(texts: list[int], device: str, dtype) -> dict:
    """A left-padded batch: prompt ``b`` has ``texts[b]`` text tokens around one 336 px image (576 placeholders)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in texts:
        before = n // 2
        words = torch.randint(3, 32000, (n,), generator=g).tolist()
        rows.append([1] + words[: before - 1] + [32000] * 576 + words[before - 1 :])
    length = max(map(len, rows))
    ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(len(texts), 3, 336, 336, generator=g)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels.to(device, dtype))


def prefill(model, inputs) -> None:
    with torch.no_grad():
        model(**inputs, logits_to_keep=1)


def flops_of(model, inputs) -> float:
    with torch.no_grad(), FlopCount(model) as count:
        model(**inputs, logits_to_keep=1)
    return count.total


def generate_seconds(model, inputs, tokens: int) -> float:
    def run():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    return timed(run, repeats=1, warmup=0)


# --- sections -----------------------------------------------------------------------------------------------------
def section_cuda_tests(args) -> dict:
    """``tests/test_cuda.py`` (the ``cuda`` marker) on this device; the log is saved beside the report. Run from
    ``tests/`` so that the repo root's ``vlprune/`` folder (without its mapped sub-packages) is not imported."""
    tests = HERE.parent / "tests"
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "cuda", "-rfE", "test_cuda.py"]
    if args.smoke:
        command += ["-k", "keep_all and llava"]  # a few tests of the file on the CPU
    env = dict(**__import__("os").environ, VLPRUNE_REQUIRE_TRITON="1")
    if args.smoke:
        env["VLPRUNE_CUDA_TESTS_ON"] = "cpu"
    done = subprocess.run(command, cwd=tests, capture_output=True, text=True, env=env, timeout=args.test_timeout)
    log = done.stdout + done.stderr
    (args.out / "cuda_tests.log").write_text(log)
    summary = next((line for line in reversed(log.splitlines()) if " in " in line and "=" not in line[:1]), "")
    return {"returncode": done.returncode, "summary": summary.strip(), "tail": log[-3000:]}


def section_llava(args) -> dict:
    from transformers import LlavaForConditionalGeneration

    device, dtype = args.device, args.dtype
    model = materialise(LlavaForConditionalGeneration, llava_config(args.smoke), device, dtype)
    one = llava_prompts([60], device, dtype)
    eight = llava_prompts([60, 41, 77, 52, 98, 35, 66, 110], device, dtype)
    new = 8 if args.smoke else 64
    rows = []

    def measure(label, method, keep):
        row = {"setting": label, "method": method, "keep": keep}
        row["prefill_s"] = timed(lambda: prefill(model, one), args.repeats, warmup=2)
        row["flops"] = flops_of(model, one)
        with torch.no_grad():
            out = model(**one, use_cache=True, logits_to_keep=1)
        row["kv_bytes"] = kv_cache_bytes(hf.output_cache(out))
        del out
        row["peak_bytes"] = peak_bytes(lambda: prefill(model, one))
        row["prefill8_s"] = timed(lambda: prefill(model, eight), max(2, args.repeats // 2), warmup=1)
        first = generate_seconds(model, one, 1)
        full = generate_seconds(model, one, new)
        row["ttft_s"], row["decode_tok_s"] = first, (new - 1) / max(full - first, 1e-9)
        rows.append(row)
        print(f"  {label:22s} prefill {row['prefill_s'] * 1e3:8.2f} ms  b8 {row['prefill8_s'] * 1e3:8.2f} ms  "
              f"decode {row['decode_tok_s']:7.1f} tok/s", flush=True)  # fmt: skip

    measure("unpruned", None, 576)
    errors = {}
    for method in LLAVA_METHODS:
        for keep in BUDGETS:
            try:
                with vlprune.wrap(model, method, keep=keep):
                    measure(f"{method} keep={keep}", method, keep)
            except Exception as error:  # noqa: BLE001  (a method failing on the GPU is a finding, not a stop)
                errors[f"{method} keep={keep}"] = f"{type(error).__name__}: {error}"[:300]
                print(f"  {method} keep={keep}: {errors[f'{method} keep={keep}']}", flush=True)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["prefill_s"] / row["prefill_s"]
        row["flop_ratio"] = row["flops"] / base["flops"]
        row["achieved"] = row["speedup"] * row["flop_ratio"]
        row["throughput_8_over_1"] = 8 * row["prefill_s"] / row["prefill8_s"]
    limits = {keep: limit_seconds(model, one, keep, args.repeats) for keep in BUDGETS}
    for row in rows:
        if row["method"] in PRE_LLM:
            row["limit_s"] = limits[row["keep"]]
            row["over_limit"] = row["prefill_s"] / row["limit_s"] - 1
    hooks = decode_hook_overhead(model, one, new)
    return {"rows": rows, "limits": limits, "decode_hooks": hooks, "errors": errors}


def limit_seconds(model, inputs, keep: int, repeats: int) -> float:
    """The unwrapped model's parts run directly on ``keep`` image tokens: tower and projector on the whole image,
    then the decoder on the prompt's text plus ``keep`` of the image features (the first ones; cost does not depend
    on which), logits of the last position."""
    base = model.model
    ids = inputs["input_ids"]
    image = ids[0] == 32000
    text_ids = ids[:, ~image]
    before = int(torch.nonzero(image)[0])

    def run():
        with torch.no_grad():
            features = base.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
            features = torch.cat(list(features), 0)[:keep][None]
            words = base.get_input_embeddings()(text_ids)
            embeds = torch.cat([words[:, :before], features.to(words.dtype), words[:, before:]], 1)
            hidden = base.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
            model.lm_head(hidden[:, -1:])

    return timed(run, repeats, warmup=2)


def decode_hook_overhead(model, inputs, new: int) -> dict:
    """Per decoding step: the unwrapped model against wrapped ones that keep every token (the same cache length, so
    the difference is vlprune's hook work)."""
    out = {}
    first = generate_seconds(model, inputs, 1)
    base = (generate_seconds(model, inputs, new) - first) / (new - 1)
    out["unwrapped_step_s"] = base
    for method, params in (("uniform", {}), ("fastv", {}), ("pdrop", {})):
        with vlprune.wrap(model, method, keep=576, **params):
            generate_seconds(model, inputs, 2)  # warm-up
            first = generate_seconds(model, inputs, 1)
            step = (generate_seconds(model, inputs, new) - first) / (new - 1)
        out[method] = {"step_s": step, "overhead": step / base - 1}
    return out


def onevision_7b(args):
    """LLaVA-OneVision-7B geometry: SigLIP so400m at 384 px (729 patches pooled to 14 x 14 per frame), Qwen2-7B."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if args.smoke:
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=384, patch_size=14)  # fmt: skip
        text = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    else:
        vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                    num_attention_heads=16, image_size=384, patch_size=14)  # fmt: skip
        text = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)  # fmt: skip
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=1000, video_token_id=1001,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")  # fmt: skip
    return materialise(LlavaOnevisionForConditionalGeneration, config, args.device, args.dtype)


def section_video(args) -> dict:
    import video as video_bench

    frames_list = [2, 4] if args.smoke else [32, 128]
    model = onevision_7b(args)
    methods = [m for m in vlprune.list_methods("video") if m != "query_frames"] + ["divprune"]  # no open_clip there
    width = model.config.text_config.hidden_size
    rows = []
    for frames in frames_list:
        inputs = video_bench.video_prompt(frames, 64)
        inputs = {k: v.to(args.device, args.dtype) if v.is_floating_point() else v.to(args.device)
                  for k, v in inputs.items()}  # fmt: skip
        repeats = max(2, args.repeats // 2)
        base = timed(lambda inputs=inputs: prefill(model, inputs), repeats, warmup=1)
        base_flops = flops_of(model, inputs)
        rows.append({"frames": frames, "tokens": frames * 196, "method": None, "prefill_s": base})
        print(f"  video {frames} frames: unpruned prefill {base * 1e3:.1f} ms", flush=True)
        for method in methods:
            row = {"frames": frames, "tokens": frames * 196, "method": method}
            decision = argparse.Namespace(width=width, ratio=0.25, repeats=3, device=args.device)
            try:
                row["decision_s"], row["decision_bytes"] = video_bench.decision_cost(method, frames, decision)
                row["decision_share"] = row["decision_s"] / base
                with vlprune.wrap(model, method, ratio=0.25):
                    row["prefill_s"] = timed(lambda inputs=inputs: prefill(model, inputs), repeats, warmup=1)
                    row["flop_ratio"] = flops_of(model, inputs) / base_flops
                row["speedup"] = base / row["prefill_s"]
            except Exception as error:  # noqa: BLE001  (a method failing here is a finding, not a stop)
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(f"  {method:10s} {frames} frames: {row}", flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def section_kernels(args) -> dict:
    argv = ["--smoke"] if args.smoke else ["--repeats", "30"]
    return {"rows": kernel_speed.main(argv)}


def section_selectors(args, done: dict) -> dict:
    """Each image method's decision at 576 / 6,272 / 25,088 tokens (LLaVA-1.5-7B widths) against the unpruned
    prefill of that many visual tokens plus 60 text tokens (the 576 case: the whole model, from the llava section;
    larger: the decoder alone on that many embeddings)."""
    import selector_time

    from vlprune.registry import create_selector

    config = llava_config(args.smoke)
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    projector = LlavaMultiModalProjector(config).to(args.device, args.dtype).eval()
    sizes = [576, 1024] if args.smoke else [576, 6272, 25088]
    model = materialise(LlavaForConditionalGeneration, config, args.device, args.dtype)
    lm = model.model.language_model
    width = config.text_config.hidden_size
    prefills = {}
    for n in sizes:
        embeds = torch.randn(1, n + 60, width, device=args.device, dtype=args.dtype)

        def decoder(embeds=embeds):
            with torch.no_grad():
                model.lm_head(lm(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1:])

        prefills[n] = timed(decoder, max(2, args.repeats // 2), warmup=1)
    model = lm = None  # free the decoder before the selectors run
    whole = next((r["prefill_s"] for r in done.get("llava", {}).get("rows", []) if r["method"] is None), None)
    rows = []
    for method in vlprune.list_methods("image"):
        selector = create_selector(method, **selector_time.PARAMS.get(method, {}))
        for n in sizes:
            keep = max(1, round(n / 9))
            row = {"method": method, "tokens": n, "keep": keep}
            try:
                with torch.no_grad():
                    if selector.tower:  # the first pass warms up (kernels compile, caches fill)
                        selector_time.tower_decisions(config, selector, n, keep, device=args.device)
                        seconds = selector_time.tower_decisions(config, selector, n, keep, device=args.device)
                    else:
                        view = selector_time.make_view(config, projector, selector, n, 60, device=args.device)
                        seconds = timed(lambda s=selector, v=view, k=keep: s.select(v, k), 3, warmup=1)
                row["decision_s"] = seconds
                reference = whole if (n == 576 and whole) else prefills[n]
                row["prefill_s"], row["share"] = reference, seconds / reference
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(f"  {method:10s} {n:6d}: {row}", flush=True)
    return {"rows": rows, "decoder_prefill_s": prefills}


def section_profile(args) -> dict:
    """torch.profiler's top CUDA-time entries of a pruned prefill and of wrapped decoding steps, and the host syncs
    counted in each."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlavaForConditionalGeneration

    model = materialise(LlavaForConditionalGeneration, llava_config(args.smoke), args.device, args.dtype)
    one = llava_prompts([60], args.device, args.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    out = {}
    for label, method, keep, steps in (("fastv keep=64 prefill", "fastv", 64, 1),
                                       ("divprune keep=64 prefill", "divprune", 64, 1),
                                       ("fastv keep=64 decode 16", "fastv", 64, 16)):  # fmt: skip
        with vlprune.wrap(model, method, keep=keep):
            generate_seconds(model, one, steps)  # warm-up
            with profile(activities=activities) as prof:
                generate_seconds(model, one, steps)
        events = prof.key_averages()
        key = "device_time_total" if args.device == "cuda" else "cpu_time_total"
        top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:12]
        syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                          "aten::_local_scalar_dense", "cudaMemcpy"))  # fmt: skip
        out[label] = {
            "top": [{"name": e.key[:80], "ms": getattr(e, key, 0) / 1e3, "count": e.count} for e in top],
            "host_syncs": syncs,
        }
        print(f"  profiled {label}: {syncs} host syncs", flush=True)
    return out


def section_decode(args) -> dict:
    """Time to first token and decode speed, each the median of 3 ``generate`` calls after a warm-up, at batch 1
    and 8, unpruned and at keep=64; and where a prefill's time goes: the summed device time of its kernels against
    its wall time (a prefill whose wall time is far above its device time is bound by the host launching kernels)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlavaForConditionalGeneration

    model = materialise(LlavaForConditionalGeneration, llava_config(args.smoke), args.device, args.dtype)
    batches = {1: llava_prompts([60], args.device, args.dtype),
               8: llava_prompts([60, 41, 77, 52, 98, 35, 66, 110], args.device, args.dtype)}  # fmt: skip
    new = 8 if args.smoke else 33

    def gen(inputs, tokens):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    rows = []
    for method in (None, "uniform", "divprune", "fastv", "pdrop"):
        context = vlprune.wrap(model, method, keep=64) if method else None
        try:
            row = {"method": method or "unpruned", "keep": 64 if method else 576}
            for b, inputs in batches.items():
                first = timed(lambda inputs=inputs: gen(inputs, 1), 3, warmup=1)
                full = timed(lambda inputs=inputs: gen(inputs, new), 3, warmup=1)
                row[f"ttft_b{b}_s"], row[f"decode_b{b}_tok_s"] = first, b * (new - 1) / (full - first)
            one = batches[1]
            prefill(model, one)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                prefill(model, one)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                row["prefill_wall_s"] = time.perf_counter() - start
            events = prof.key_averages()
            row["prefill_device_s"] = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
            rows.append(row)
            print(f"  {row}", flush=True)
        finally:
            if context is not None:
                context.unwrap()
    return {"rows": rows, "new_tokens": new}


# --- report -------------------------------------------------------------------------------------------------------
def machine() -> dict:
    import transformers

    info = {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vlprune": vlprune.__version__}  # fmt: skip
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), smoke sizes"
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--resume", type=Path, default=None, help="a gpu.json whose finished sections are kept")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--test-timeout", type=int, default=240)
    parser.add_argument("--deadline", type=float, default=None, help="seconds after which no new section starts")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --smoke for toy sizes on the CPU)")
    args.device = "cpu" if args.smoke else "cuda"
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    if args.smoke:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.repeats = 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = json.loads(args.resume.read_text()) if args.resume and args.resume.exists() else {}
    report["machine"] = machine()
    report.setdefault("sections", {})
    began = time.perf_counter()
    for name in args.sections.split(","):
        if args.deadline and time.perf_counter() - began > args.deadline:
            print(f"[{name}] skipped: past the --deadline of {args.deadline:.0f} s", flush=True)
            continue
        if name in report["sections"] and "error" not in report["sections"][name]:
            print(f"[{name}] kept from {args.resume}", flush=True)
            continue
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            fn = globals()[f"section_{name}"]
            result = fn(args, report["sections"]) if name == "selectors" else fn(args)
        except Exception as error:  # noqa: BLE001  (keep the other sections' results)
            import traceback

            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"[:500]}
        result["seconds"] = time.perf_counter() - start
        report["sections"][name] = result
        (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=float))
        (args.out / "gpu.md").write_text(markdown(report))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return report


def markdown(report: dict) -> str:
    import gpu_report

    return gpu_report.render(report)


if __name__ == "__main__":
    main()
