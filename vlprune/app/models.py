"""Models for the application: loading the embedded model or a checkpoint (:class:`Loaded`, :func:`load`), fitting
methods' defaults to a small model (:func:`fitted`), and running methods side by side on one input with their
answers, kept tokens and prefill times (:func:`compare`)."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..api import wrap
from ..registry import list_methods, list_models, selector_class, video_models
from . import embedded
from .flops import FlopCount, scaled_flops


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
            return self._placed(self.processor(text=embedded.prompt(question), return_tensors="pt", **media))
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self._placed(self.processor(text=text, return_tensors="pt", **media))

    def _placed(self, batch) -> dict:
        """Processor outputs on the model's device, pixel values in its dtype."""
        parameter = next(self.model.parameters())
        return {
            key: value.to(parameter.device, parameter.dtype if value.is_floating_point() else value.dtype)
            if torch.is_tensor(value)
            else value
            for key, value in dict(batch).items()
        }

    def decode(self, ids: torch.Tensor) -> str:
        return self.processor.decode(ids, skip_special_tokens=True).strip()


DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def device_of(name: str | None) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1``, ...) as a device that exists here; ``None``: a CUDA GPU when there
    is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name!r}: no such CUDA GPU here ({torch.cuda.device_count()} visible)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: vlprune runs on cpu or cuda")
    return device


def dtype_of(name: str):
    """``auto`` (the checkpoint's own; float32 for the embedded model) or a floating dtype's name."""
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def load(model: str | None, dtype="auto", attn_implementation: str = "sdpa", device: str | None = None) -> Loaded:
    """The embedded model (``None``) or a local / hub checkpoint of a supported family, in ``dtype`` (default the
    checkpoint's own; the embedded model is float32) on ``device`` (:func:`device_of`)."""
    dtype, device = dtype_of(dtype) if isinstance(dtype, str) else dtype, device_of(device)
    if model is None:
        net, processor = embedded.load_default_model(attn=attn_implementation)
        net = net.to(device, torch.float32 if dtype == "auto" else dtype)
        return Loaded(net, processor, "embedded shapes-vlm", True)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model)
    except OSError as error:  # not a folder, not in the cache (offline), no config.json
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {model!r}: {first}") from None
    if config.model_type not in list_models():
        raise ValueError(f"model {model!r} is a {config.model_type!r} model; supported: {list_models()}")
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation)
    net = net.to(device).eval()
    return Loaded(net, AutoProcessor.from_pretrained(model), model, False)


def fitted(method: str, model) -> dict:
    """Keyword arguments that fit ``method``'s defaults to a model smaller than the papers' (the embedded model has
    4 decoder and 4 vision layers): a default decoder layer beyond the model moves to its middle, and each method's own
    :meth:`~vlprune.selectors.base.Selector.small_model_params` apply (VTC-CLS starts at vision layer 0)."""
    selector = selector_class(method)
    out = {}
    layers = model.config.text_config.num_hidden_layers
    if selector.default_layer >= layers:
        out["layer"] = max(1, layers // 2)
    out.update(selector.small_model_params(model.config.vision_config.num_hidden_layers))
    return out


# --- measuring ---------------------------------------------------------------------------------------------------
REPEATS = 7  # timed prefills per configuration, after a discarded warm-up


def timed_forward(model, inputs: dict) -> float:
    """Seconds of one forward over the prompt (the device's queued work included)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def prefill_times(model, inputs: dict, repeats: int = REPEATS) -> list[float]:
    """Seconds of ``repeats`` forwards over the prompt, after one warm-up run (discarded)."""
    times = [timed_forward(model, inputs) for _ in range(repeats + 1)]
    return times[1:]


def paired_times(model, inputs: dict, wrapped, repeats: int = REPEATS) -> tuple[list[float], list[float]]:
    """``(unpruned, pruned)`` seconds of ``repeats`` forwards each, alternated (one unpruned, then one inside
    ``wrapped()``, a context manager that wraps the model), after a discarded warm-up pair: whatever slows a shared
    machine down touches both alike."""
    base, pruned = [], []
    for i in range(repeats + 1):
        unpruned = timed_forward(model, inputs)
        with wrapped():
            seconds = timed_forward(model, inputs)
        if i:
            base.append(unpruned)
            pruned.append(seconds)
    return base, pruned


def prefill_flops(model, inputs: dict) -> float:
    """Analytic FLOPs of one forward over the prompt, as the model runs now (wrapped or not)."""
    with torch.no_grad(), FlopCount(model) as count:
        model(**inputs)
    return count.total


def generate(model, inputs: dict, max_new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :]


@dataclass
class Outcome:
    """One configuration of :func:`compare`: its answer, visual tokens kept of ``total``, prefill ``times``
    (seconds), analytic prefill ``flops``, the same plans' ``(unpruned, pruned)`` FLOPs on LLaVA-1.5-7B's geometry
    (``at_scale``; ``None`` for the unpruned run and for videos), its last stage's ``plan`` and its stages'
    ``plans``, and ``paired``: the unpruned model's times measured alternately with ``times``."""

    method: str
    answer: str
    kept: int
    total: int
    times: list[float]
    flops: float
    at_scale: tuple[float, float] | None
    plan: object | None
    plans: list = field(default_factory=list)
    paired: list[float] | None = None

    @property
    def seconds(self) -> float:
        """The median prefill time."""
        return statistics.median(self.times)

    @property
    def keeps_all(self) -> bool:
        """Whether every visual token reached every layer untouched (nothing pruned, nothing merged)."""
        return self.plan is None or all(len(p.keep_visual[0]) == p.num_visual[0] and not p.merges for p in self.plans)


def speedup(base: Outcome, o: Outcome) -> str:
    """The measured prefill speed-up of ``o``: the median of its paired ratios (unpruned / pruned seconds, measured
    alternately), marked ``(noise)`` when their interquartile range holds 1; never a speed-up for a run that keeps
    every token."""
    if o.plan is None:
        return "1.00x"
    if o.keeps_all:
        return "none (all kept)"
    ratios = [b / p for b, p in zip(o.paired, o.times, strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return f"{median:.2f}x (noise)" if q1 <= 1 <= q3 else f"{median:.2f}x"


def flop_ratio(base: Outcome, o: Outcome) -> str:
    """Analytic prefill FLOPs unpruned / this run, on this model."""
    return "1.00x" if o.keeps_all else f"{base.flops / o.flops:.2f}x"


def scale_ratio(o: Outcome) -> str:
    """The same ratio for the same plans on LLaVA-1.5-7B's geometry (``-`` for videos)."""
    if o.keeps_all:
        return "1.00x"
    return "-" if o.at_scale is None else f"{o.at_scale[0] / o.at_scale[1]:.2f}x"


def compare(loaded: Loaded, image, question: str, methods, budget: dict, max_new_tokens: int = 8, video=None):
    """The unpruned model and each method on one image (or ``video``, a (T, H, W, 3) uint8 array) and question:
    answers, tokens kept, prefill times (:data:`REPEATS` after a warm-up) and analytic FLOPs. A temporal method on an
    image raises ``ValueError``."""
    model = loaded.model
    if video is None:
        temporal = [m for m in methods if m in list_methods("video")]
        if temporal:
            raise ValueError(f"{temporal} prune videos, not images; image methods: {list_methods('image')}")
    inputs = loaded.inputs(image, question, video=video)
    placeholder = model.config.image_token_id  # InternVL writes video frames as images
    if video is not None:
        placeholder = getattr(model.config, "video_token_id", None) or placeholder
    total = int((inputs["input_ids"] == placeholder).sum())
    text = int(inputs["input_ids"].shape[1]) - total
    answer = loaded.decode(generate(model, inputs, max_new_tokens))
    outcomes = [
        Outcome(
            "unpruned", answer, total, total, prefill_times(model, inputs), prefill_flops(model, inputs), None, None
        )
    ]
    for method in methods:

        @contextlib.contextmanager
        def wrapped(method=method):
            with wrap(model, method, **budget, **fitted(method, model)) as pruned:
                pruned.set_query(question, videos=[] if video is None else [video])  # for query_frames
                pruned.set_videos([None] if video is None else [len(video)])  # for InternVL
                yield pruned

        with wrapped() as pruned:
            answer = loaded.decode(generate(model, inputs, max_new_tokens))
            plans, flops = list(pruned.plans), prefill_flops(model, inputs)
        paired, times = paired_times(model, inputs, wrapped)
        images = len(plans[0].grids[0]) if plans else 1
        at_scale = None if video is not None else scaled_flops(plans, text, images)
        kept, total = sum(plans[-1].kept_per_sample), plans[-1].num_visual[0]
        outcomes.append(Outcome(method, answer, kept, total, times, flops, at_scale, plans[-1], plans, paired))
    return outcomes
