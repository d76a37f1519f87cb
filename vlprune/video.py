"""Reading videos: frames sampled uniformly by count or by rate, optionally within a time range, decoded with
``decord`` (``pip install 'vlprune[video]'``).

The frames come back as one (T, H, W, 3) uint8 array, the form every supported family's processor takes as a
video (``processor(videos=[video.frames], ...)``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = 32  # LLaVA-OneVision's usual evaluation setting


@dataclass
class Video:
    """Frames read from a file.

    Attributes
    ----------
    frames : uint8 array (T, H, W, 3)
        RGB frames in time order.
    indices : int array (T,)
        Their frame numbers in the file.
    timestamps : float array (T,)
        Their times in seconds (frame number over the file's average rate).
    fps : float
        The file's average frame rate.
    path : str
    """

    frames: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    path: str

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def frame_indices(
    total: int,
    native_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """Which frames to read from a video of ``total`` frames at ``native_fps``.

    Within ``[start, end)`` seconds (default: the whole video), either ``num_frames`` frames evenly spaced from the
    first frame of the range to its last (rounded to the nearest frame; fewer when the range has fewer frames, never
    a repeat), or one frame every ``1 / fps`` seconds from ``start``. Neither given: :data:`DEFAULT_FRAMES` by count.

    Raises ``ValueError`` for a video without frames, both or non-positive ``num_frames`` / ``fps``, and a range
    that is empty or outside the video.
    """
    if total <= 0:
        raise ValueError("the video has no frames")
    if native_fps is None or not native_fps > 0:
        raise ValueError(f"the video reports no frame rate ({native_fps}); cannot place frames in time")
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    duration = total / native_fps
    start = 0.0 if start is None else float(start)
    end = duration if end is None else float(end)
    if not 0 <= start < end or start >= duration:
        raise ValueError(f"the time range [{start}, {end}) s is empty or outside the video (0 to {duration:.3f} s)")
    first = int(np.ceil(start * native_fps - 1e-9))
    last = min(total, int(np.ceil(end * native_fps - 1e-9))) - 1  # frames whose time is before `end`
    if last < first:
        raise ValueError(f"no frame falls within [{start}, {end}) s")
    if fps is not None:
        times = np.arange(start, min(end, duration), 1.0 / fps)
        picked = np.clip(np.round(times * native_fps).astype(np.int64), first, last)
        return np.unique(picked)
    count = DEFAULT_FRAMES if num_frames is None else num_frames
    available = last - first + 1
    if count >= available:
        if count > available:
            logger.info("asked for %d frames, the range has %d: taking all of them", count, available)
        return np.arange(first, last + 1, dtype=np.int64)
    return np.round(np.linspace(first, last, count)).astype(np.int64)


def load_video(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
) -> Video:
    """Read frames of the video at ``path`` (see :func:`frame_indices` for the sampling).

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a file that cannot be read as a video
    (unsupported format, corrupt data), a video without frames, or bad sampling arguments; ``ImportError`` when
    ``decord`` is not installed.
    """
    try:
        import decord
    except ImportError as error:
        raise ImportError("reading videos needs decord: pip install 'vlprune[video]'") from error
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {str(path)!r}")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total, native_fps = len(reader), float(reader.get_avg_fps())
    except Exception as error:  # decord raises its own DECORDError / RuntimeError for every unreadable input
        raise ValueError(f"cannot read {str(path)!r} as a video: {str(error).splitlines()[0]}") from error
    indices = frame_indices(total, native_fps, num_frames=num_frames, fps=fps, start=start, end=end)
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as error:
        raise ValueError(f"cannot decode frames of {str(path)!r}: {str(error).splitlines()[0]}") from error
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise ValueError(f"{str(path)!r} decoded to frames of shape {frames.shape}, expected (T, H, W, 3)")
    return Video(frames, indices, indices / native_fps, native_fps, str(path))
