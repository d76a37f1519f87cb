"""The Gradio demo: an image (or one of the bundled shapes examples), or a video on a model that takes videos, a
question, some methods and a budget; per method, side by side with the unpruned model, the overlay of the tokens it
kept, its answer, the tokens kept, the prefill time and the FLOP ratios. On the embedded model it opens on the first
bundled example's result. ``vlprune demo`` starts it (needs
``pip install 'vlprune[demo]'``, and ``'vlprune[video]'`` for videos)."""

from __future__ import annotations

import json
import logging

from ..registry import list_methods
from ..support import support
from . import embedded

logger = logging.getLogger(__name__)
DEFAULT = ["fastv", "divprune"]
HEADERS = ["method", "answer", "tokens kept", "prefill ms", "speed-up", "FLOPs", "7B FLOPs"]


def examples() -> list[list[str]]:
    """``[image path, question]`` of each bundled example (held-out shapes test scenes)."""
    folder = embedded.default_path().parent / "examples"
    listing = json.loads((folder / "examples.json").read_text())
    return [[str(folder / e["image"]), e["question"]] for e in listing]


def results(loaded, image, video: str | None, question: str, chosen: list[str], keep: int, frames: int = 16):
    """What the demo shows for one run: ``(gallery, rows)``, the overlays with captions (the unpruned input first)
    and per method a row of :data:`HEADERS` (the speed-up and FLOP ratios as ``vlprune run`` prints them).
    ``video``: a file path; it takes precedence over ``image``. Raises ``ValueError`` for a missing input or question
    and what the run refuses."""
    from PIL import Image

    from .models import compare, flop_ratio, scale_ratio, speedup
    from .overlays import contact_sheet, overlay, video_overlay

    if (image is None and not video) or not question or not question.strip():
        raise ValueError("give an image or a video, and a question")
    clip = None
    if video:
        from ..video import load_video

        clip = load_video(video, num_frames=int(frames)).frames
        outcomes = compare(loaded, None, question, chosen or [], {"keep": int(keep)}, video=clip)
    else:
        image = image.convert("RGB")
        outcomes = compare(loaded, image, question, chosen or [], {"keep": int(keep)})
    base = outcomes[0]
    gallery, rows = [], []
    for o in outcomes:
        if o.plan is None:  # the unpruned input
            picture = image if clip is None else contact_sheet([Image.fromarray(frame) for frame in clip])
        else:
            picture = overlay(image, o.plan) if clip is None else video_overlay(clip, o.plan)
        caption = f"{o.method}: {o.answer} ({o.kept}/{o.total} tokens)"
        if picture is not None:
            gallery.append((picture, caption))
        ms = round(o.seconds * 1e3, 1)
        rows.append(
            [o.method, o.answer, f"{o.kept}/{o.total}", ms, speedup(base, o), flop_ratio(base, o), scale_ratio(o)]
        )
    return gallery, rows


def build(model: str | None = None, device: str | None = None, dtype: str = "auto"):
    """The ``gradio.Blocks`` app for ``model`` (default: the embedded one) on ``device`` in ``dtype``."""
    import gradio as gr

    from .models import load

    loaded = load(model, dtype, device=device)
    model_type = loaded.model.config.model_type
    methods = [m for m in list_methods("image") if support(m, model_type) != "no"]
    if loaded.takes_videos:
        methods += list_methods("video")

    def run(image, video, question, chosen, keep, frames):
        try:
            return results(loaded, image, video, question, chosen, keep, frames)
        except (ValueError, FileNotFoundError, ImportError) as error:
            raise gr.Error(str(error)) from error

    with gr.Blocks(title="vlprune") as app:
        gr.Markdown(
            f"# vlprune\nModel: **{loaded.name}**. Which visual tokens does each method keep, what does the model "
            "answer, and how long does the prefill take? Kept tokens are outlined, dropped ones dimmed, merged ones "
            "tinted by the token they went into."
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="image", elem_id="image")
                video = gr.Video(label="video (instead of the image)", elem_id="video", visible=loaded.takes_videos)
                frames = gr.Slider(
                    2, 64, value=16, step=1, label="video frames", elem_id="frames", visible=loaded.takes_videos
                )
                question = gr.Textbox(label="question", elem_id="question")
                chosen = gr.CheckboxGroup(
                    methods, value=[m for m in DEFAULT if m in methods], label="methods", elem_id="methods"
                )
                most = keep_limit(loaded.model.config)
                keep = gr.Slider(
                    1,
                    most,
                    value=min(36, most),
                    step=1,
                    label="visual tokens kept per image (or video)",
                    elem_id="keep",
                )
                button = gr.Button("Run", variant="primary", elem_id="run")
                if loaded.is_embedded:
                    gr.Examples(examples(), [image, question], elem_id="examples")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="kept tokens", columns=3, elem_id="gallery")
                table = gr.Dataframe(
                    headers=HEADERS,
                    label="results",
                    elem_id="results",
                )
        button.click(run, [image, video, question, chosen, keep, frames], [gallery, table])
        if loaded.is_embedded:  # a result on opening: the first example, with the default methods and budget
            path, asked = examples()[0]

            def first_example():
                picture = load_image(path)
                return (picture, asked, *run(picture, None, asked, chosen.value, keep.value, frames.value))

            app.load(first_example, None, [image, question, gallery, table])
    return app


def load_image(path: str):
    """The RGB image at ``path``."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


MAX_UPLOAD = "20mb"  # the default bound on an uploaded image or video (``vlprune demo --max-file-size``)
DYNAMIC_LIMIT = 4096  # the keep slider's end for families whose images have no fixed token count


def keep_limit(config) -> int:
    """The keep slider's end: the visual tokens of one image for a fixed-grid model (LLaVA: ``(side / patch)^2``,
    576 for LLaVA-1.5, 144 for the embedded model), else :data:`DYNAMIC_LIMIT` (any-resolution and video models)."""
    vision = getattr(config, "vision_config", None)
    side, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if config.model_type == "llava" and isinstance(side, int) and isinstance(patch, int) and patch > 0:
        return (side // patch) ** 2
    return DYNAMIC_LIMIT


def launch(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    max_file_size: str | int = MAX_UPLOAD,
    device: str | None = None,
    dtype: str = "auto",
):
    """Start the demo on ``host:port``, refusing uploads over ``max_file_size`` (bytes, or a size such as
    ``"20mb"``); with ``block=False`` return the running app (tests)."""
    app = build(model, device, dtype)
    # quiet: Gradio's own banner suggests share=True, which `vlprune demo` does not offer (the demo stays local)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=True,
        max_file_size=max_file_size,
        quiet=True,
    )
    logger.info("vlprune demo on %s", app.local_url)
    if block:
        app.block_thread()
    return app
