"""What the caller tells a wrapped model that its inputs do not say: the question and decoded frames of each sample
(``set_query``, for methods reading the ``query`` signal) and which images are video frames (``set_videos``, for
families whose processor writes each frame as an image). A mixin of :class:`vlprune.api.Pruned`, whose ``_query`` and
``_videos`` it sets; both hold for the forward calls that follow until the next call."""

from __future__ import annotations


class CallerHints:
    """The caller's hints of :class:`vlprune.api.Pruned` (see the module docstring)."""

    _query: tuple[list[str], list | None] | None  # set here, read by Pruned when it assembles a stage's inputs
    _videos: list | None

    def set_query(self, questions: str | list[str], videos: list | None = None) -> None:
        """Give the methods that read the ``query`` signal (``query_frames``) the question of each sample and, per
        sample, its videos' decoded frames (each ``(F, H, W, 3)`` uint8, as :func:`vlprune.video.load_video` returns
        them), for the forward calls that follow until the next ``set_query``. One question (and one list of videos)
        serves a batch of one; a list of questions, one per sample."""
        if isinstance(questions, str):
            questions = [questions]
            videos = None if videos is None else [videos]
        if not isinstance(questions, list) or not all(isinstance(q, str) for q in questions):
            raise TypeError(f"questions must be a string or a list of strings, got {questions!r}")
        if videos is not None:
            if not isinstance(videos, list) or len(videos) != len(questions):
                raise ValueError(
                    f"videos must list, per sample, its videos' frames: {len(questions)} samples, got {videos!r:.80}"
                )
            videos = [list(v) if isinstance(v, (list, tuple)) else [v] for v in videos]
        self._query = (questions, videos)

    def set_videos(self, frames: list | None) -> None:
        """Say which images of the prompt are video frames, for families whose processor writes each frame as an image
        of its own (InternVL); the others mark their videos in the prompt and ignore this. ``frames``: per sample, each
        image (``None``) or video (its frame count) in prompt order, for the forward calls that follow until the next
        ``set_videos``; a flat list serves a batch of one; ``None`` forgets it.

        Example: ``pruned.set_videos([[None, 16]])``, one sample with an image, then a video of 16 frames."""
        if frames is None:
            self._videos = None
            return
        if not isinstance(frames, list) or not frames:
            raise TypeError(f"frames must be a non-empty list (per sample, per image or video), got {frames!r:.80}")
        if not any(isinstance(f, list) for f in frames):
            frames = [frames]
        for sample in frames:
            ok = isinstance(sample, list) and all(
                f is None or (isinstance(f, int) and not isinstance(f, bool) and f > 0) for f in sample
            )
            if not ok:
                raise ValueError(
                    f"frames must list, per sample, None for each image and a positive frame count for each video, "
                    f"got {frames!r:.80}"
                )
        self._videos = [list(sample) for sample in frames]

    def _check_videos(self, batch: int) -> None:
        """At a prefill of ``batch`` samples: ``set_videos`` must have described as many."""
        if self._videos is not None and len(self._videos) != batch:
            raise ValueError(
                f"set_videos described {len(self._videos)} sample(s) but this call has {batch}; call set_videos "
                "with one entry per sample"
            )

    def _query_for(self, batch: int):
        if self._query is None:
            return None
        if len(self._query[0]) != batch:
            raise ValueError(
                f"set_query gave {len(self._query[0])} question(s) but this call has {batch} sample(s); call "
                "set_query with one question per sample"
            )
        return self._query
