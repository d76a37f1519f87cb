"""The ``vlprune`` model of lmms-eval: any supported Hugging Face VLM, wrapped with a vlprune method.

    lmms-eval --model vlprune --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=divprune,keep=64 --tasks ...

Why one wrapper of our own rather than lmms-eval's per-family HF wrappers: those import ``decord`` at module level,
assert batch size 1, accept only the stock attention implementations, and log and swallow generation errors (a
pruning bug would read as accuracy 0). The prompt formatting is theirs all the same: the processor's own chat
template around lmms-eval's context, with one image entry per visual, which is what ``llava_hf``, ``qwen2_5_vl`` and
the chat ``huggingface`` wrapper build; a video visual (a file path, as video tasks give them) is read with
:func:`vlprune.video.load_video` (``max_frames_num`` frames) and gets a video entry. The embedded shapes model ships a
chat template of its own for this.

It is a *simple* model (``is_simple``): lmms-eval gives it the formatted context string and a ``doc_to_visual``
callable, so generation and loglikelihood / multiple-choice tasks both work. Under ``accelerate launch`` each
process loads the model on its own device and lmms-eval shards the requests by rank.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from .. import hf
from ..api import wrap
from ..app.models import fitted, load
from ..registry import list_methods
from ..video import DEFAULT_FRAMES

MODEL_ARGS = (
    "pretrained",
    "method",
    "keep",
    "ratio",
    "layer",
    "per",
    "positions",
    "fit",
    "dtype",
    "attn_implementation",
    "max_new_tokens",
    "max_frames_num",
)


class Recorder:
    """What the bench reads back from a run: per generation request, keyed by ``(task, doc_id)``, the answer and
    the log-probabilities of the first generated token; per task, the first ``keep_prompts`` prompts as
    ``(context, images)`` (to time them afterwards)."""

    def __init__(self, keep_prompts: int = 4) -> None:
        self.answers: dict[tuple[str, int], str] = {}
        self.first: dict[tuple[str, int], torch.Tensor] = {}
        self.prompts: dict[str, list[tuple[str, list]]] = {}
        self.keep_prompts = keep_prompts


class VLPrune(lmms):
    """lmms-eval model: a supported VLM, optionally wrapped with a vlprune method.

    Parameters (``--model_args``)
    -----------------------------
    pretrained : str, optional
        A hub id or a local path of a supported family; default: vlprune's embedded shapes model.
    method : str, optional
        A method (``vlprune methods``) or a shipped preset name (``divprune-64``); none: the unpruned model.
    keep, ratio, layer, per, positions
        As in :func:`vlprune.wrap`.
    fit : bool
        Move a method's default decoder layer that lies beyond a small model to its middle (as ``vlprune run``
        does); default ``True`` for the embedded model, else ``False``.
    dtype : str
        ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
    attn_implementation : str
        ``sdpa`` (default), ``eager`` or ``flash_attention_2``.
    max_new_tokens : int
        Default generation length when a task does not set one (32).
    max_frames_num : int
        Frames read from a video visual (a file path, as lmms-eval's video tasks give them), evenly spaced, with
        :func:`vlprune.video.load_video` (default 32, LLaVA-OneVision's setting; needs ``vlprune[video]`` and a model
        that takes videos).
    Any other key is a hyper-parameter of ``method`` and is checked by :func:`vlprune.wrap`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        keep: int | None = None,
        ratio: float | None = None,
        layer: int | None = None,
        per: str | None = None,
        positions: str = "original",
        fit: bool | None = None,
        dtype: str = "auto",
        attn_implementation: str = "sdpa",
        max_new_tokens: int = 32,
        max_frames_num: int = DEFAULT_FRAMES,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        if method is None and (params or keep is not None or ratio is not None or layer is not None):
            given = sorted([*params, *(k for k, v in (("keep", keep), ("ratio", ratio), ("layer", layer)) if v)])
            raise ValueError(f"model_args {given} need a method=...; the known model_args are {list(MODEL_ARGS)}")
        dtypes = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(dtypes)}")
        if attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"attn_implementation={attn_implementation!r}; use sdpa, eager or flash_attention_2")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            message = f"batch_size={batch_size!r} must be an integer (lmms-eval's 'auto' is not supported)"
            raise ValueError(message) from None
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if not isinstance(max_frames_num, int) or max_frames_num < 1:
            raise ValueError(f"max_frames_num={max_frames_num!r} must be a positive integer")
        from accelerate import PartialState

        state = PartialState()
        self._rank, self._world_size = state.process_index, state.num_processes
        if device is None or (state.num_processes > 1 and str(device).startswith("cuda")):
            device = str(state.device)
        self._device = torch.device(device)
        loaded = load(
            pretrained, dtype=dtypes[dtype], attn_implementation=attn_implementation, device=str(self._device)
        )
        self.loaded, self.max_frames_num = loaded, max_frames_num
        self.model, self.processor, self.is_embedded = (
            loaded.model.to(self._device),
            loaded.processor,
            loaded.is_embedded,
        )
        self.max_new_tokens = max_new_tokens
        self.pruned = None
        if method is not None:
            budget = {
                k: v for k, v in (("keep", keep), ("ratio", ratio), ("layer", layer), ("per", per)) if v is not None
            }
            if (fit if fit is not None else self.is_embedded) and method in list_methods():
                params = {**fitted(method, self.model), **params}
            try:
                self.pruned = wrap(self.model, method, positions=positions, **budget, **params)
            except TypeError as error:  # an unknown method parameter: to lmms-eval's user, an unknown model_arg
                if not params:
                    raise
                raise ValueError(f"bad model_args {sorted(params)}: {error}; model_args: {list(MODEL_ARGS)}") from error
        self.recorder: Recorder | None = None
        self.keep_loaded = False  # the bench sets it to run several evaluations on one loaded model

    # --- lmms-eval's interface -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def prompt(self, context: str, visuals: list) -> str:
        """``context`` in the processor's chat template, after one image (or video: an array of frames) entry per
        visual."""
        content = [{"type": "video" if _is_video(v) else "image"} for v in visuals]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": context}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def inputs(self, contexts: list[str], visuals: list[list]) -> dict:
        """Processor outputs of a left-padded batch, on the model's device."""
        tokenizer = self.processor.tokenizer
        flat = [v for per_doc in visuals for v in per_doc]
        videos = [v for v in flat if _is_video(v)] or None
        if videos and not self.loaded.takes_videos:
            self.loaded.inputs(None, "", video=videos[0])  # raises the CLI's error naming the families that do
        media = {"images": [v for v in flat if not _is_video(v)] or None}
        if videos:
            media["videos"] = videos
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            text = [self.prompt(c, v) for c, v in zip(contexts, visuals, strict=True)]
            batch = self.processor(text=text, return_tensors="pt", padding=True, **media)
        finally:
            tokenizer.padding_side = side
        return {k: (v.to(self._device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlprune generating")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = [requests[i] for i in indices[start : start + self.batch_size]]
                for i, text in zip(indices[start : start + self.batch_size], self._generate(chunk), strict=True):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, chunk: list[Instance]) -> list[str]:
        contexts, visuals = [], []
        for request in chunk:
            context, _, doc_to_visual, doc_id, task, split = request.args
            contexts.append(context)
            visuals.append(self._visuals(doc_to_visual, task, split, doc_id))
        kwargs = dict(chunk[0].args[1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0) or 0)
        sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        extra = {k: kwargs[k] for k in ("top_p", "num_beams") if kwargs.get(k) is not None}
        if sample:
            extra["temperature"] = temperature
        inputs = self.inputs(contexts, visuals)
        self._tell(contexts, visuals)
        tokenizer = self.processor.tokenizer
        with torch.no_grad():
            result = self.model.generate(
                **inputs,
                max_new_tokens=max_new,
                do_sample=sample,
                pad_token_id=tokenizer.pad_token_id,
                output_scores=self.recorder is not None,
                return_dict_in_generate=True,
                **extra,
            )
        new = result.sequences[:, inputs["input_ids"].shape[1] :]
        texts = []
        for b, request in enumerate(chunk):
            text = tokenizer.decode(new[b], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            texts.append(text.strip() if self.is_embedded else text)
            if self.recorder is not None:
                key = (request.args[4], request.args[3])
                self.recorder.answers[key] = texts[-1]
                self.recorder.first[key] = torch.log_softmax(result.scores[0][b].float(), -1).cpu()
                kept = self.recorder.prompts.setdefault(key[0], [])
                if len(kept) < self.recorder.keep_prompts:
                    kept.append((contexts[b], visuals[b]))
        return texts

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(loss, is_greedy)``: the mean negative log-probability of the continuation's tokens after
        the context, and whether greedy decoding would produce it. lmms-eval 0.7 picks the multiple-choice answer by
        *argmin* of this value because its own HF wrappers return the loss; this model returns the same quantity,
        so its numbers compare with theirs. The plan is decided on the context alone, then the continuation is scored
        after the pruned context (:func:`continuation_logprob`)."""
        out = []
        tokenizer = self.processor.tokenizer
        for request in tqdm(requests, disable=self.rank != 0, desc="vlprune loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            if callable(continuation):  # a task whose target is a function of the document
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = [self._visuals(doc_to_visual, task, split, doc_id)]
            inputs = self.inputs([context], visuals)
            self._tell([context], visuals)
            target = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            target = target.to(self._device)
            if target.shape[1] == 0:
                raise ValueError(f"continuation {continuation!r} of {task} doc {doc_id} is empty after tokenising")
            logprob, greedy = continuation_logprob(self.model, inputs, target)
            out.append(_passed_through((-logprob / target.shape[1], greedy)))
        return out

    def clean(self) -> None:
        """lmms-eval calls this after an evaluation to free the model; kept when ``keep_loaded`` (the bench)."""
        if self.keep_loaded:
            return
        if self.pruned is not None:
            self.pruned.unwrap()
            self.pruned = None
        super().clean()

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlprune's lmms-eval model does not run multi-round generation tasks yet")

    def _tell(self, contexts: list[str], visuals: list[list]) -> None:
        """Give the wrapped model each request's prompt and its videos' frames (``query_frames`` reads them), and
        which of its visuals are videos of how many frames (InternVL's prompts do not say)."""
        if self.pruned is not None:
            videos = [[v for v in request if _is_video(v)] for request in visuals]
            self.pruned.set_query(list(contexts), videos=videos)
            self.pruned.set_videos([[len(v) if _is_video(v) else None for v in request] for request in visuals])

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """The doc's visuals: PIL images as RGB, and video file paths read as (T, H, W, 3) frames."""
        out = []
        for v in doc_to_visual(self.task_dict[task][split][doc_id]) or []:
            if isinstance(v, (str, os.PathLike)):
                from ..video import load_video

                out.append(load_video(v, num_frames=self.max_frames_num).frames)
            elif hasattr(v, "convert") and hasattr(v, "size"):
                out.append(v.convert("RGB"))
            else:
                raise TypeError(
                    f"{task} doc {doc_id}: vlprune's lmms-eval model takes PIL images and video file paths, got "
                    f"{type(v).__name__}"
                )
        return out


def _is_video(visual) -> bool:
    return isinstance(visual, np.ndarray) and visual.ndim == 4


def _passed_through(pair: tuple[float, bool]):
    """``pair`` in a form lmms-eval hands to the task unchanged. lmms-eval 0.7.3's ``unwrap_generation_output``
    turns any response that is not text into ``str(response)``, which breaks every loglikelihood and multiple-choice
    task; a ``GenerationResult`` passes its ``text`` through as it is. Versions that keep tuples get the tuple."""
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output

    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)


def continuation_logprob(model, inputs: dict, target: torch.Tensor) -> tuple[float, bool]:
    """``(sum of log p(target | prompt), whether every target token is the argmax)`` for one prompt (batch of one)
    followed by ``target`` (1, T).

    The prompt is run alone first, with a cache, as a generation would see it: a wrapped model decides its plan on
    the context only. The continuation is then fed after that (pruned) cache in one step, so every candidate of a
    multiple-choice question is scored against the same pruned context; scored as one sequence, a text-guided
    in-LLM method (FastV's last token, SparseVLM's raters, ...) would let each candidate choose the visual tokens."""
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(target)], 1)
    with torch.no_grad():
        context = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = {hf.cache_keyword(model): hf.output_cache(context)}
        rest = model(input_ids=target, attention_mask=mask, use_cache=True, **cache)
    logits = torch.cat([context.logits[:, -1:], rest.logits[:, :-1]], 1)  # (1, T, V): row t predicts target[t]
    logprobs = torch.log_softmax(logits[0].float(), -1)
    picked = logprobs.gather(-1, target[0, :, None])[:, 0]
    return float(picked.sum()), bool((logprobs.argmax(-1) == target[0]).all())
