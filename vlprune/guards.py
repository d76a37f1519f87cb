"""Guards of a wrapped model's calls (a mixin of :class:`vlprune.api.Pruned`): what vlprune cannot serve fails
before anything runs, with an error that says what to do instead. One call at a time per wrapped model; left padding
for in-LLM stages; no new images, and no ``generate`` that would mistake old tokens for new ones, after a pruned
prompt."""

from __future__ import annotations

import threading

import torch

from . import hf

VISUAL_INPUTS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")  # a call that brings images


class CallGuards:
    """Reads ``self._stages``, ``self._session`` and ``self._thread`` (set by :class:`vlprune.api.Pruned`)."""

    _stages: dict
    _session: object
    _thread: int | None

    def _guarded_generate(self, original):
        """``generate`` that refuses a cache whose prompt was pruned before the LLM: that cache is shorter than the
        conversation it stands for, so ``generate`` would take old tokens for new ones. (After in-LLM pruning layer
        0's cache is whole and a later turn continues it.)"""

        def generate(*args, **kwargs):
            session = self._session
            if hf.cache_length(hf.call_cache(kwargs)) and session is not None and 0 in session.layer_segment:
                raise ValueError(
                    "generate() was handed the KV cache of a prompt pruned before the LLM: that cache is shorter "
                    "than the conversation it stands for, so transformers cannot tell which tokens are new. Generate "
                    "a later turn from the whole conversation without past_key_values (vlprune prunes it again), or "
                    "feed only the new tokens to the model's forward with that cache"
                )
            return original(*args, **kwargs)

        return generate

    def _claim(self) -> None:
        """Per-call state lives on this handle: a second thread entering while a call runs would corrupt it."""
        me = threading.get_ident()
        if self._thread is not None and self._thread != me:
            raise RuntimeError(
                "this wrapped model is running a call in another thread; vlprune keeps each call's state on its "
                "handle, so one wrapped model serves one call at a time: give each thread its own model and wrap, "
                "or serialise the calls with a lock"
            )
        self._thread = me

    def _on_exit(self, module, args, kwargs, output):
        self._thread = None  # also after a failed call (registered with always_call)
        return None

    def _check_padding(self, mask) -> None:
        """In-LLM stages score from the prompt's last position (FastV's last token, the raters after the image), which
        a right-padded sample does not have there: refuse the batch before anything runs."""
        if mask is None or mask.dim() != 2 or max(self._stages) == 0:
            return
        padded = torch.nonzero(mask[:, -1] == 0).flatten().tolist()
        if padded:
            raise ValueError(
                f"sample(s) {padded} of this batch are right-padded (their attention_mask ends with 0); in-LLM "
                "pruning reads each prompt's last token there and needs left padding: set padding_side='left' on "
                "the tokenizer or processor (e.g. processor.tokenizer.padding_side = 'left')"
            )

    def _check_no_new_images(self, kwargs: dict) -> None:
        if any(_holds(kwargs.get(name)) for name in VISUAL_INPUTS):
            raise ValueError(
                "this call brings images or videos to a KV cache that already holds a prompt; vlprune prunes a "
                "prompt's visual tokens in the call that starts it, so a turn with new images must start from the "
                "whole conversation, without past_key_values"
            )


def _holds(value) -> bool:
    """Whether a call's visual input holds anything (``generate`` passes an empty ``mm_encoder_outputs`` dict)."""
    if isinstance(value, dict):
        return any(v is not None for v in value.values())
    return value is not None


def refuse_continuation(fed: int, stands_for: int, covered: int) -> None:
    """A decoding call after a pruned prefill that re-feeds earlier tokens: a clear error."""
    raise ValueError(
        f"this call feeds {fed} token(s) after a pruned cache that stands for {stands_for} tokens, but its "
        f"attention_mask covers {covered}: after a pruned prefill a call must feed only the new tokens. "
        "transformers' generate cannot tell them apart when handed a pruned past_key_values (the cache is "
        "shorter than the conversation): generate a later turn from the whole conversation without "
        "past_key_values, and vlprune prunes it again"
    )
