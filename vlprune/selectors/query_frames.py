"""Query-relevant frames (``query_frames``): the relevance of each frame and of each patch to the question, from a
CLIP text/image model (``open_clip``, extra ``vlprune[clip]``), decides where a video's budget goes.

1. **Relevance.** The question and each decoded frame go through CLIP: a frame's relevance is the cosine similarity
   of its image embedding and the question's text embedding; a patch's relevance, that of its output token projected
   into the joint space (CLIP's own projection), resized bilinearly from CLIP's patch grid to the model's token grid of
   the frame. Frames are resized to CLIP's square input whole (no crop), as the video processors resize them. A token
   slot of the model that covers several decoded frames (Qwen-VL's temporal patches of two) averages them.
2. **Budget across frames.** Frame ``f`` gets ``keep * softmax(relevance / temperature)_f`` tokens, rounded by largest
   remainder and capped at the frame's tokens (the excess goes to the next most relevant frames).
3. **Within a frame**, alone: the tokens of highest patch relevance. With ``then="<method>"`` (and its
   ``then_params``), that image method chooses each frame's tokens from its budget instead, on a view of the frame's
   tokens alone: any image method that decides before the LLM from token-wise signals (``divprune``, ``pool``,
   ``uniform``, ``random``, ``fastervlm``, ``vtc_cls``, ``zoo``), where the model provides its signals on videos
   (the [CLS] ones: InternVL). Methods inside the LLM (``fastv``, ``dart``, ...) go in a later stage of the schedule
   instead, after the frames' budgets are spent.

The question and the frames come from the caller: ``pruned.set_query(question, videos=[frames])`` before the forward
(the CLI, the demo and the lmms-eval model do it). A budget covering every token keeps the video untouched without
them. ``clip``/``pretrained`` name an ``open_clip`` model and its weights (``pretrained=None``: random weights, for
tests); the model is loaded once per selector, on first use.

Not a published method: vlprune's own, in the spirit of question-guided frame selection; ``temperature`` (0.1)
controls how strongly relevance concentrates the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..registry import create_selector, register_selector
from ..signals import SignalRequest, TokenView
from .base import Selection, Selector, check_params, top_k, whole_video
from .shared import largest_remainder


def load_clip(name: str, pretrained: str | None):
    """``(model, tokenizer, mean, std, size)`` of an ``open_clip`` model, with a clear error when it is missing."""
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("query_frames needs open_clip: pip install 'vlprune[clip]'") from err
    try:
        model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    except Exception as err:
        raise RuntimeError(
            f"query_frames could not load the CLIP model {name!r} with weights {pretrained!r} ({err}); give "
            "clip= and pretrained= of an open_clip model whose weights are on disk or can be downloaded"
        ) from err
    model.eval()
    config = model.visual.preprocess_cfg
    size = model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    return model, open_clip.get_tokenizer(name), config["mean"], config["std"], size


def clip_relevance(model, tokenizer, mean, std, size: int, question: str, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP relevance of ``frames`` ((F, H, W, 3) uint8) to ``question``: per frame ``(F,)`` and per patch ``(F, g,
    g)`` (CLIP's patch grid), cosine similarities in the joint space."""
    pixels = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    visual = model.visual
    with torch.no_grad():
        saved, visual.output_tokens = visual.output_tokens, True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = saved
        patches = tokens @ visual.proj if visual.proj is not None else tokens
        text = model.encode_text(tokenizer([question]))[0]
    text = torch.nn.functional.normalize(text.float(), dim=-1)
    frame = torch.nn.functional.normalize(pooled.float(), dim=-1) @ text
    patch = torch.nn.functional.normalize(patches.float(), dim=-1) @ text
    grid = int(round(patch.shape[1] ** 0.5))
    return frame, patch.reshape(-1, grid, grid)


def frame_budgets(relevance: torch.Tensor, keep: int, per_frame: int, temperature: float) -> list[int]:
    """Tokens per frame: ``keep * softmax(relevance / temperature)``, largest remainder, capped at ``per_frame``."""
    share = torch.softmax(relevance.double() / temperature, 0) * keep
    return largest_remainder(share.tolist(), [per_frame] * relevance.numel(), keep)


def then_methods() -> list[str]:
    """The image methods ``then`` may name: those deciding before the LLM (layer 0) on the LLM's side of the tower."""
    from ..registry import list_methods, selector_class

    return [
        m for m in list_methods("image") if selector_class(m).default_layer == 0 and selector_class(m).space == "llm"
    ]


@register_selector("query_frames")
@dataclass
class QueryFrames(Selector):
    """Query-relevant frames and patches by CLIP (see the module docstring): ``clip`` (an ``open_clip`` model name,
    ``ViT-B-32``), ``pretrained`` (its weights, ``openai``; ``None`` for random weights), ``temperature`` (0.1),
    ``then`` (an image method choosing within each frame, or ``None`` for patch relevance), ``then_params`` (its
    hyper-parameters)."""

    clip: str = "ViT-B-32"
    pretrained: str | None = "openai"
    temperature: float = 0.1
    then: str | None = None
    then_params: dict = field(default_factory=dict)
    _loaded: tuple | None = field(default=None, init=False, repr=False, compare=False)

    summary = "Query-relevant frames: CLIP question-frame and question-patch relevance split a video's budget (video)"
    paper = "vlprune's own (CLIP relevance, no paper)"
    merges = True
    video = True

    def __post_init__(self) -> None:
        check_params("query_frames", numbers={"temperature": self.temperature})
        if self.temperature <= 0:
            raise ValueError(f"query_frames temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.clip, str) or not self.clip:
            raise TypeError(f"query_frames clip must be an open_clip model name, got {self.clip!r}")
        if not isinstance(self.then_params, dict):
            raise TypeError(f"query_frames then_params must be a dict, got {self.then_params!r}")
        allowed = then_methods()
        if self.then is not None and self.then not in allowed:
            raise ValueError(f"query_frames then must be None or one of {allowed}, got {self.then!r}")
        if self.then_params and self.then is None:
            raise ValueError(f"query_frames then_params {self.then_params} need a then= method")
        self._inner = create_selector(self.then, **self.then_params) if self.then is not None else None

    def requests(self, layer: int, vision_depth: int) -> list[SignalRequest]:
        if layer != 0:
            raise ValueError(f"query_frames decides before the LLM: layer must be 0, got {layer}")
        own = [SignalRequest("features"), SignalRequest("frames"), SignalRequest("query")]
        inner = self._inner.requests(0, vision_depth) if self._inner is not None else []
        return own + [r for r in inner if r not in own]

    def relevance(self, view: TokenView) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token slot of ``view``'s video: frame relevance ``(T,)`` and token relevance ``(T, h, w)``."""
        frames, _ = whole_video("query_frames", view)
        if view.question is None or view.raw_frames is None:
            raise ValueError(
                "query_frames needs the question and the video's frames: call pruned.set_query(question, "
                "videos=[frames]) on the handle wrap() returned before the forward"
            )
        if self._loaded is None:
            self._loaded = load_clip(self.clip, self.pretrained)
        raw = np.asarray(view.raw_frames)
        if raw.ndim != 4 or raw.shape[-1] != 3 or raw.shape[0] < frames:
            raise ValueError(
                f"query_frames needs at least {frames} decoded frames of shape (H, W, 3) for input {view.image}, got "
                f"an array of shape {raw.shape}"
            )
        frame, patch = clip_relevance(*self._loaded, view.question, raw)
        h, w = view.grid
        patch = torch.nn.functional.interpolate(patch[:, None], size=(h, w), mode="bilinear", align_corners=False)
        group = torch.arange(raw.shape[0]) * frames // raw.shape[0]  # the token slot each decoded frame falls in
        count = torch.bincount(group, minlength=frames).float()
        slot_frame = torch.zeros(frames).index_add_(0, group, frame) / count
        slot_patch = torch.zeros(frames, h, w).index_add_(0, group, patch[:, 0]) / count[:, None, None]
        return slot_frame, slot_patch

    def select(self, view: TokenView, keep: int) -> torch.Tensor | Selection:
        frames, per_frame = whole_video("query_frames", view)
        if keep >= view.n:
            return torch.arange(view.n)
        frame, patch = self.relevance(view)
        budgets = frame_budgets(frame, keep, per_frame, self.temperature)
        if self._inner is None:
            chosen = [f * per_frame + top_k(patch[f].flatten(), b) for f, b in enumerate(budgets)]
            return torch.cat(chosen)
        return self._within_frames(view, budgets, per_frame)

    def _within_frames(self, view: TokenView, budgets: list[int], per_frame: int) -> Selection:
        """Each frame's budget chosen by the inner image method on that frame's tokens."""
        keep, into, weight = [], torch.full((view.n,), -1), torch.zeros(view.n)
        for f, budget in enumerate(budgets):
            if budget == 0:
                continue
            rows = torch.arange(f * per_frame, (f + 1) * per_frame)
            chosen = self._inner.select(view.subset(rows), budget)
            if not isinstance(chosen, Selection):
                chosen = Selection.pruned(chosen)
            offset = len(keep)
            keep += (rows[chosen.keep.cpu()]).tolist()
            if chosen.into is None:
                into[rows[chosen.keep.cpu()]] = offset + torch.arange(budget)
                weight[rows[chosen.keep.cpu()]] = 1.0
            else:
                source, target, w = chosen.pairs(per_frame)
                into[rows[source]] = offset + target
                weight[rows[source]] = w
        return Selection(torch.tensor(keep, dtype=torch.long), into, weight)
