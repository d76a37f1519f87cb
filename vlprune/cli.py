"""The ``vlprune`` command: ``run`` (answer a question about an image or a video with several methods side by side),
``methods`` and ``models`` (the registries), ``bench`` (the shapes quality table, or a grid through lmms-eval),
``tasks`` (the offline lmms-eval tasks) and ``demo`` (the Gradio app).

Every command runs on the embedded model (:mod:`vlprune.embedded`) unless ``--model`` names another checkpoint.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__, embedded
from .api import wrap
from .registry import adapter_class, list_methods, list_models, selector_class, video_models

DEFAULT_METHODS = ("fastv", "divprune", "fastervlm", "visionzip")


# --- models and prompts ----------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A model, its processor and how to build its inputs."""

    model: torch.nn.Module
    processor: object
    name: str
    is_embedded: bool

    @property
    def takes_videos(self) -> bool:
        """Whether vlprune prunes this model's video inputs."""
        return self.model.config.model_type in video_models()

    def inputs(self, image, question: str, video=None) -> dict:
        """Processor outputs for ``question`` about a PIL ``image``, or about ``video`` (a (T, H, W, 3) uint8 array
        of frames) when it is given."""
        if video is not None:
            if not self.takes_videos:
                raise ValueError(
                    f"{self.name} ({self.model.config.model_type}) takes images only; for a video, pass --model with "
                    f"a checkpoint of {video_models()}"
                )
            media, kind = {"videos": [video]}, "video"
        else:
            media, kind = {"images": image}, "image"
        if self.is_embedded:
            return dict(self.processor(text=embedded.prompt(question), return_tensors="pt", **media))
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(self.processor(text=text, return_tensors="pt", **media))

    def decode(self, ids: torch.Tensor) -> str:
        return self.processor.decode(ids, skip_special_tokens=True).strip()


def load(model: str | None, dtype="auto", attn_implementation: str = "sdpa") -> Loaded:
    """The embedded model (``None``) or a local / hub checkpoint of a supported family (in ``dtype``, default the
    checkpoint's own; the embedded model is float32)."""
    if model is None:
        net, processor = embedded.load_default_model(attn=attn_implementation)
        return Loaded(net.to(torch.float32 if dtype == "auto" else dtype), processor, "embedded shapes-vlm", True)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as error:  # not a folder, not in the cache (offline), no config.json
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {model!r}: {first}") from None
    if config.model_type not in list_models():
        raise ValueError(f"model {model!r} is a {config.model_type!r} model; supported: {list_models()}")
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation)
    net = net.eval()
    return Loaded(net, AutoProcessor.from_pretrained(model), model, False)


def fitted(method: str, model) -> dict:
    """Keyword arguments that fit ``method``'s defaults to a model smaller than the papers' (the embedded model has
    4 decoder and 4 vision layers): a default decoder layer beyond the model moves to its middle, VTC-CLS starts at
    vision layer 0."""
    selector = selector_class(method)
    out = {}
    layers = model.config.text_config.num_hidden_layers
    if selector.default_layer >= layers:
        out["layer"] = max(1, layers // 2)
    if method == "vtc_cls" and model.config.vision_config.num_hidden_layers <= 16:
        out["start_layer"] = 0
    return out


def budget_of(args) -> dict:
    """``--ratio`` when given, else ``--keep`` (default 64 tokens per image)."""
    return {"ratio": args.ratio} if args.ratio is not None else {"keep": args.keep if args.keep is not None else 64}


# --- measuring ---------------------------------------------------------------------------------------------------
def prefill_seconds(model, inputs: dict, repeats: int = 3) -> float:
    """Median time of a forward over the prompt, after one warm-up run."""
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            model(**inputs)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def generate(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


@dataclass
class Outcome:
    method: str
    answer: str
    kept: int
    total: int
    seconds: float
    plan: object | None


def compare(loaded: Loaded, image, question: str, methods, budget: dict, max_new_tokens: int = 8, video=None):
    """The unpruned model and each method on one image (or ``video``, a (T, H, W, 3) uint8 array) and question:
    answers, tokens kept, prefill time. A temporal method on an image raises ``ValueError``."""
    model = loaded.model
    if video is None:
        temporal = [m for m in methods if m in list_methods("video")]
        if temporal:
            raise ValueError(f"{temporal} prune videos, not images; image methods: {list_methods('image')}")
    inputs = loaded.inputs(image, question, video=video)
    outcomes = []
    seconds = prefill_seconds(model, inputs)
    placeholder = model.config.image_token_id  # InternVL writes video frames as images
    if video is not None:
        placeholder = getattr(model.config, "video_token_id", None) or placeholder
    total = int((inputs["input_ids"] == placeholder).sum())
    outcomes.append(
        Outcome("unpruned", loaded.decode(generate(model, inputs, max_new_tokens)), total, total, seconds, None)
    )
    for method in methods:
        with wrap(model, method, **budget, **fitted(method, model)) as pruned:
            pruned.set_query(question, videos=[] if video is None else [video])  # for query_frames
            pruned.set_videos([None] if video is None else [len(video)])  # for InternVL
            answer = loaded.decode(generate(model, inputs, max_new_tokens))
            plan = pruned.plans[-1]
            seconds = prefill_seconds(model, inputs)
        outcomes.append(Outcome(method, answer, sum(plan.kept_per_sample), plan.num_visual[0], seconds, plan))
    return outcomes


# --- overlays ----------------------------------------------------------------------------------------------------
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _shade(image, grid: tuple[int, int], first: int, plan, rank: dict[int, int], size: int = 384):
    """``image`` scaled up (to about ``size`` px) with the ``h x w`` tokens of ``grid``, visual indices ``first``
    onwards of sample 0, marked: kept ones outlined, merged ones tinted by the kept token they went into (``rank``:
    each kept token's place in the palette), dropped ones dimmed."""
    from PIL import Image, ImageDraw

    h, w = grid
    scale = max(1, size // max(image.size))
    base = image.convert("RGB").resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    cell_w, cell_h = base.size[0] / w, base.size[1] / h
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    into = plan.merged_into[0]
    for local in range(h * w):
        token = first + local
        r, c = divmod(local, w)
        box = (c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1)
        target = int(into[token])
        if token in rank and target == token:
            draw.rectangle(box, outline=(255, 255, 0, 255), width=2)
        elif target >= 0:  # merged into a kept token
            color = PALETTE[rank[target] % len(PALETTE)] if target in rank else (128, 128, 128)
            draw.rectangle(box, fill=(*color, 110))
        else:
            draw.rectangle(box, fill=(0, 0, 0, 150))
    return Image.alpha_composite(base.convert("RGBA"), shade).convert("RGB")


def _ranks(plan) -> dict[int, int]:
    return {token: i for i, token in enumerate(sorted(plan.keep_visual[0].tolist()))}


def overlay(image, plan, grid: tuple[int, int] | None = None):
    """The image with the dropped tokens' patches dimmed and, for merging methods, each kept token's group tinted
    in its own colour. ``None`` when the tokens do not form one square grid per image (anyres, Qwen-VL sizes)."""
    n = plan.num_visual[0]
    side = round(n**0.5)
    h, w = grid or (side, side)
    if h * w != n:
        return None
    return _shade(image, (h, w), 0, plan, _ranks(plan))


def video_overlay(frames, plan, columns: int = 8):
    """The video's token frames side by side (``columns`` per row), each with its kept tokens marked as in
    :func:`overlay`. ``frames``: the (T, H, W, 3) uint8 frames the model was given; a model that groups frames
    (Qwen-VL's temporal patches of two) shows the first frame of each group. ``None`` when sample 0 is not one
    whole video."""
    from PIL import Image

    grids = plan.grids[0] if plan.grids else []
    if len(grids) != 1 or grids[0] is None or grids[0][0] * grids[0][1] * grids[0][2] != plan.num_visual[0]:
        return None
    t, h, w = grids[0]
    rank = _ranks(plan)
    tiles = []
    for f in range(t):
        picture = Image.fromarray(frames[f * len(frames) // t]).convert("RGB")
        tiles.append(_shade(picture, (h, w), f * h * w, plan, rank, size=160))
    return contact_sheet(tiles, columns)


def contact_sheet(pictures: list, columns: int = 8, gap: int = 4):
    """Equal-sized PIL ``pictures`` in rows of ``columns``, ``gap`` white pixels apart."""
    from PIL import Image

    cols = min(columns, len(pictures))
    width, height = pictures[0].size
    rows = -(-len(pictures) // cols)
    sheet = Image.new("RGB", (cols * (width + gap) - gap, rows * (height + gap) - gap), (255, 255, 255))
    for i, picture in enumerate(pictures):
        sheet.paste(picture, ((i % cols) * (width + gap), (i // cols) * (height + gap)))
    return sheet


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
    loaded = load(args.model)
    outcomes = compare(loaded, image, args.question, methods, budget_of(args), args.max_new_tokens, video=frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = outcomes[0].seconds
    print(f"model: {loaded.name}    question: {args.question}")
    print(f"{'method':<12} {'answer':<20} {'tokens kept':>12} {'prefill ms':>11} {'speed-up':>9}  overlay")
    for o in outcomes:
        path = ""
        if o.plan is not None:
            picture = overlay(image, o.plan) if frames is None else video_overlay(frames, o.plan)
            if picture is not None:
                path = str(out / f"{o.method}.png")
                picture.save(path)
        kept = f"{o.kept}/{o.total}"
        print(f"{o.method:<12} {o.answer:<20} {kept:>12} {o.seconds * 1e3:>11.1f} {base / o.seconds:>8.2f}x  {path}")
    return 0


def cmd_methods(args) -> int:
    for name in list_methods():
        print(f"{name:<12} {selector_class(name).summary}")
    return 0


def cmd_models(args) -> int:
    for name in list_models():
        print(f"{name:<16} {adapter_class(name).summary}")
    return 0


def cmd_bench(args) -> int:
    if args.tasks is None:
        from .bench import shapes_table

        shapes_table(args)
        return 0
    from .eval.grid import lmms_grid

    lmms_grid(args)
    return 0


def cmd_tasks(args) -> int:
    from .eval.tasks import include_path

    print(include_path(args.n, args.root))
    return 0


def cmd_demo(args) -> int:
    from .demo import launch

    launch(model=args.model, host=args.host, port=args.port, max_file_size=args.max_file_size)
    return 0


def parser() -> argparse.ArgumentParser:
    from .demo import MAX_UPLOAD  # the demo imports gradio only when it builds its app

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
