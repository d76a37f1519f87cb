"""The ``vlprune`` command: ``run`` (answer a question about an image or a video with several methods side by side),
``methods`` and ``models`` (the registries), ``bench`` (the shapes quality table, or a grid through lmms-eval),
``tasks`` (the offline lmms-eval tasks) and ``demo`` (the Gradio app).

Every command runs on the embedded model (:mod:`vlprune.app.embedded`) unless ``--model`` names another checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .app.models import REPEATS, compare, device_of, dtype_of, flop_ratio, load, scale_ratio, speedup
from .app.overlays import overlay, video_overlay
from .registry import adapter_class, list_methods, list_models, selector_class

DEFAULT_METHODS = ("fastv", "divprune", "fastervlm", "visionzip")


def budget_of(args) -> dict:
    """``--ratio`` when given, else ``--keep`` (default 64 tokens per image)."""
    return {"ratio": args.ratio} if args.ratio is not None else {"keep": args.keep if args.keep is not None else 64}


def read_image(path: str):
    """The RGB image at ``path``; a clear ``ValueError`` for a missing path, a folder or a file that is no image."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path)
    if not file.exists():
        raise ValueError(f"--image {path!r} does not exist")
    if not file.is_file():
        raise ValueError(f"--image {path!r} is not a file")
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--image {path!r} is not a readable image ({type(error).__name__})") from None


def check_run_arguments(args) -> None:
    """The arguments of ``vlprune run`` that need no model, checked before one loads (a bad budget or an empty
    question must not wait for a model and an unpruned run)."""
    from .config import Stage

    Stage("uniform", **budget_of(args))  # keep >= 1, ratio in (0, 1]
    device_of(args.device), dtype_of(args.dtype)
    if not args.question.strip():
        raise ValueError("--question is empty")
    for name in ("frames", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# --- commands ----------------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    check_run_arguments(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(list_methods())}")
    if args.video is None:
        temporal = [m for m in methods if m in list_methods("video")]
        if temporal:
            raise ValueError(f"{temporal} prune videos (give --video); image methods: {list_methods('image')}")
        if args.frames is not None:
            raise ValueError("--frames applies to --video")
        image, frames = read_image(args.image), None
    else:
        from .video import DEFAULT_FRAMES, load_video

        image, frames = None, load_video(args.video, num_frames=args.frames or DEFAULT_FRAMES).frames
    loaded = load(args.model, args.dtype, device=args.device)
    outcomes = compare(loaded, image, args.question, methods, budget_of(args), args.max_new_tokens, video=frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = outcomes[0]
    print(f"model: {loaded.name}    question: {args.question}")
    keep = budget_of(args).get("keep")
    if keep is not None and keep >= base.total:
        print(f"--keep {keep} is not below the {base.total} visual tokens of this input: every method keeps them all")
    print(
        f"{'method':<12} {'answer':<20} {'tokens kept':>12} {'prefill ms':>11} {'speed-up':>16} {'FLOPs':>7} "
        f"{'7B FLOPs':>9}  overlay"
    )
    for o in outcomes:
        path = ""
        if o.plan is not None:
            picture = overlay(image, o.plan) if frames is None else video_overlay(frames, o.plan)
            if picture is not None:
                path = str(out / f"{o.method}.png")
                picture.save(path)
        kept = f"{o.kept}/{o.total}"
        print(
            f"{o.method:<12} {o.answer:<20} {kept:>12} {o.seconds * 1e3:>11.1f} {speedup(base, o):>16} "
            f"{flop_ratio(base, o):>7} {scale_ratio(o):>9}  {path}"
        )
    print(f"prefill: median of {REPEATS} runs after a warm-up, each method's alternating with the unpruned model's;")
    print("speed-up: the median of those paired ratios, (noise) when their interquartile range holds 1")
    print(
        "FLOPs: analytic prefill FLOPs unpruned / pruned, on this model; 7B: the same fraction kept from the same layer"
    )
    print(
        "on LLaVA-1.5-7B (576 tokens per image, 32 layers), a scale where per-call overheads no longer hide the saving"
    )
    return 0


def cmd_methods(args) -> int:
    for name in list_methods():
        print(f"{name:<12} {selector_class(name).summary}")
    return 0


def cmd_models(args) -> int:
    for name in list_models():
        print(f"{name:<16} {adapter_class(name).summary}")
    return 0


def _names(text: str | None) -> list[str] | None:
    """A comma-separated list (``None`` or empty: ``None``)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


def wrote(folder: str) -> str:
    """The line saying which files a bench wrote, and where."""
    names = sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".csv", ".md", ".png"))
    return f"wrote {', '.join(names)} to {Path(folder).resolve()}"


def cmd_bench(args) -> int:
    if args.tasks is None:
        from .app.bench import shapes_table

        fractions = tuple(float(f) for f in args.fractions.split(","))
        shapes_table(args.out, _names(args.methods), fractions, args.samples, args.model)
        print((Path(args.out) / "table.md").read_text())
        print(wrote(args.out))
        return 0
    from .eval.grid import lmms_grid

    lmms_grid(
        _names(args.tasks) or [],
        args.budgets,
        args.out,
        _names(args.methods),
        args.model,
        args.device,
        args.dtype,
        args.include_path,
        args.limit,
        args.timing_docs,
        args.repeats,
    )
    print((Path(args.out) / "table.md").read_text())
    print(wrote(args.out))
    return 0


def cmd_tasks(args) -> int:
    from .eval.tasks import include_path

    print(include_path(args.n, args.root))
    return 0


def cmd_demo(args) -> int:
    from .app.demo import launch

    device_of(args.device), dtype_of(args.dtype)  # before the model loads
    app = launch(
        model=args.model,
        host=args.host,
        port=args.port,
        max_file_size=args.max_file_size,
        block=False,
        device=args.device,
        dtype=args.dtype,
    )
    print(f"vlprune demo: {app.local_url} (Ctrl+C stops it)", flush=True)
    app.block_thread()
    return 0


def add_device_arguments(command) -> None:
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a CUDA GPU if there is one)")
    command.add_argument("--dtype", default="auto", help="auto (the checkpoint's own), float32, float16 or bfloat16")


def parser() -> argparse.ArgumentParser:
    from .app.demo import MAX_UPLOAD  # the demo imports gradio only when it builds its app

    root = argparse.ArgumentParser(prog="vlprune", description="Visual-token pruning for vision-language models")
    root.add_argument("--version", action="version", version=f"vlprune {__version__}")
    sub = root.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a question with several methods side by side")
    media = run.add_mutually_exclusive_group(required=True)
    media.add_argument("--image", help="path of an image")
    media.add_argument("--video", help="path of a video (needs vlprune[video] and a model that takes videos)")
    run.add_argument("--frames", type=int, default=None, help="--video: frames sampled evenly (default 32)")
    run.add_argument("--question", required=True)
    run.add_argument("--model", default=None, help="hub id or path (default: the embedded shapes model)")
    run.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated method names")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, default=None, help="visual tokens kept per image or video (default 64)")
    budget.add_argument("--ratio", type=float, default=None, help="fraction of the visual tokens kept per image/video")
    run.add_argument("--out", default="vlprune-run", help="folder for the overlay PNGs")
    run.add_argument("--max-new-tokens", type=int, default=8)
    add_device_arguments(run)
    run.set_defaults(func=cmd_run)
    sub.add_parser("methods", help="list the methods").set_defaults(func=cmd_methods)
    sub.add_parser("models", help="list the supported model families").set_defaults(func=cmd_models)
    bench = sub.add_parser(
        "bench",
        help="quality table on the shapes test split, or (--tasks) a methods x budgets x lmms-eval tasks grid",
    )
    bench.add_argument("--suite", default="shapes", choices=["shapes"], help="without --tasks: the built-in suite")
    bench.add_argument("--model", default=None, help="hub id or path (default: the embedded shapes model)")
    bench.add_argument("--samples", type=int, default=600, help="shapes suite: test questions (100 per type)")
    bench.add_argument("--fractions", default="0.5,0.25,0.11", help="shapes suite: kept fractions")
    bench.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    bench.add_argument("--out", default="vlprune-bench")
    grid = bench.add_argument_group("lmms-eval grid (needs vlprune[eval])")
    grid.add_argument("--tasks", default=None, help="comma-separated lmms-eval tasks, e.g. vlprune_shapes,gqa")
    grid.add_argument("--budgets", default="64,32,16", help="tokens per image (64) or kept fractions (0.25)")
    grid.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    grid.add_argument("--include-path", default=None, help="extra task folder (the shapes tasks are always added)")
    grid.add_argument("--timing-docs", type=int, default=2, help="documents timed per cell")
    grid.add_argument("--repeats", type=int, default=3, help="timed runs per document (after one warm-up)")
    grid.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: accelerate's choice)")
    grid.add_argument("--dtype", default="auto")
    bench.set_defaults(func=cmd_bench)
    tasks = sub.add_parser("tasks", help="write the offline shapes tasks for lmms-eval and print their folder")
    tasks.add_argument("--n", type=int, default=600, help="test questions")
    tasks.add_argument("--root", default=None, help="where to write them (default: ~/.cache/vlprune/lmms_tasks)")
    tasks.set_defaults(func=cmd_tasks)
    demo = sub.add_parser("demo", help="the Gradio demo")
    demo.add_argument("--model", default=None)
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--max-file-size", default=MAX_UPLOAD, help=f"largest upload accepted (default: {MAX_UPLOAD})")
    add_device_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as error:
        print(f"vlprune: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
