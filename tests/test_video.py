"""Videos written in the test with PyAV: the loader (frame sampling by count, by rate and within a time range,
decoded content, clear errors for missing, unreadable, corrupt and empty inputs) and temporal segmentation (planted
scene cuts found, static regions static, moving ones not)."""

import av
import numpy as np
import pytest
import torch

from vlprune.temporal import dyseg_cuts, holitom_windows, static_positions, transition_similarity
from vlprune.video import DEFAULT_FRAMES, frame_indices, load_video

WIDTH, HEIGHT, FPS = 64, 48, 10


def write_video(path, frames: np.ndarray, fps: int = FPS, codec: str = "mpeg4") -> str:
    """(T, H, W, 3) uint8 frames -> a video file (MPEG-4 part 2; ``codec="libvpx-vp9"`` and a ``.webm`` path for
    what a browser plays)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def moving_square(count: int) -> np.ndarray:
    """Frame ``i``: a flat grey level ``8 * i`` with a white square moving right by 2 px per frame."""
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(count):
        frames[i] = 8 * i
        frames[i, 16:32, 2 * i : 2 * i + 16] = 255
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", moving_square(25))  # 2.5 s


def test_sampling_by_count_by_rate_and_range():
    assert frame_indices(100, 25.0, num_frames=5).tolist() == [0, 25, 50, 74, 99]  # round(linspace(0, 99, 5))
    assert frame_indices(100, 25.0, fps=5).tolist() == list(range(0, 100, 5))
    assert frame_indices(100, 25.0, fps=5, start=1, end=2).tolist() == [25, 30, 35, 40, 45]
    assert frame_indices(100, 25.0, num_frames=3, start=1, end=2).tolist() == [25, 37, 49]
    assert frame_indices(100, 25.0).tolist() == np.round(np.linspace(0, 99, DEFAULT_FRAMES)).astype(int).tolist()
    assert frame_indices(6, 25.0, num_frames=10).tolist() == [0, 1, 2, 3, 4, 5]  # never a repeated frame
    assert frame_indices(100, 25.0, fps=100).tolist() == list(range(100))  # faster than the video: each frame once


@pytest.mark.parametrize(
    "total, kwargs, message",
    [
        (0, {}, "the video has no frames"),
        (100, {"num_frames": 4, "fps": 2}, "num_frames or fps, not both"),
        (100, {"num_frames": 0}, "num_frames must be a positive integer, got 0"),
        (100, {"num_frames": 2.5}, "num_frames must be a positive integer, got 2.5"),
        (100, {"fps": -1}, "fps must be positive, got -1"),
        (100, {"start": 5}, r"the time range \[5.0, 4.0\) s is empty or outside the video"),
        (100, {"start": 2, "end": 1}, "is empty or outside the video"),
    ],
)
def test_bad_sampling_arguments(total, kwargs, message):
    with pytest.raises(ValueError, match=message):
        frame_indices(total, 25.0, **kwargs)


def test_loaded_frames_are_the_sampled_ones(clip):
    video = load_video(clip, num_frames=5)
    assert video.frames.shape == (5, HEIGHT, WIDTH, 3) and video.frames.dtype == np.uint8
    assert video.indices.tolist() == [0, 6, 12, 18, 24] and video.fps == FPS
    assert np.allclose(video.timestamps, video.indices / FPS)
    for frame, i in zip(video.frames, video.indices, strict=True):
        background = frame[HEIGHT - 8 :, :, :].astype(float).mean()
        assert abs(background - 8 * i) < 4, (i, background)  # lossy codec: close to the planted level
        square = frame[18:30, 2 * i + 2 : 2 * i + 14].astype(float).mean()
        assert square > 230, (i, square)
    by_rate = load_video(clip, fps=2, start=0.5, end=2.0)
    assert by_rate.indices.tolist() == [5, 10, 15]


def test_loader_errors(clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="no video file at"):
        load_video(tmp_path / "missing.mp4")
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    with pytest.raises(ValueError, match="notes.txt"):
        load_video(text)
    data = open(clip, "rb").read()
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(data[: len(data) // 2])  # the index (moov atom) is at the end: unreadable
    with pytest.raises(ValueError, match="cannot read .*corrupt.mp4.* as a video"):
        load_video(corrupt)
    with pytest.raises(ValueError, match="outside the video"):
        load_video(clip, start=10)


CUTS = (9, 20)  # first frames of scenes 2 and 3
SCENES = ((220, 30, 30), (30, 220, 30), (30, 30, 220))


def scenes_with_cuts(count: int = 30) -> np.ndarray:
    """Three scenes (a striped background of one colour each) cut at :data:`CUTS`; a white 8 px square jumps one
    patch right per frame along rows 8-15 (wrapping around), throughout."""
    frames = np.zeros((count, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(count):
        scene = sum(i >= c for c in CUTS)
        frames[i] = SCENES[scene]
        frames[i, :, ::8] //= 2  # stripes: texture that stays put
        x = (8 * i) % WIDTH
        frames[i, 8:16, x : x + 8] = 255
    return frames


def patch_tokens(frames: np.ndarray, side: int = 8) -> torch.Tensor:
    """(T, N, D) tokens: each ``side x side`` patch's pixels, raster order."""
    t, h, w, c = frames.shape
    x = torch.from_numpy(frames).float().reshape(t, h // side, side, w // side, side, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(t, (h // side) * (w // side), side * side * c)


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory):
    path = write_video(tmp_path_factory.mktemp("video") / "cuts.mp4", scenes_with_cuts())
    return load_video(path, num_frames=30)


def test_holitom_segmentation_finds_the_planted_cuts(cut_video):
    tokens = patch_tokens(cut_video.frames)
    windows, saved = holitom_windows(tokens, threshold=0.8)
    starts = [s for s, _ in windows]
    assert [w for w in windows if any(s < c <= e for c in CUTS for s, e in [w])] == []  # no window spans a cut
    assert set(CUTS) <= set(starts) and windows[0][0] == 0 and windows[-1][1] == 29
    assert all(e + 1 == s for (_, e), (s, _) in zip(windows, windows[1:], strict=False))  # a partition
    # the DP's saving is what its windows save
    similarity = transition_similarity(tokens)
    assert saved == sum(int(static_positions(similarity, s, e, 0.8).sum()) * (e - s) for s, e in windows)
    # and no other split of the scenes into whole-scene windows saves more
    scenes = [(0, 8), (9, 19), (20, 29)]
    assert saved >= sum(int(static_positions(similarity, s, e, 0.8).sum()) * (e - s) for s, e in scenes)


def test_static_regions_are_static_and_moving_ones_are_not(cut_video):
    similarity = transition_similarity(patch_tokens(cut_video.frames))
    static = static_positions(similarity, 0, 8, threshold=0.8).reshape(6, 8)  # scene 1: frames 0..8
    assert static[2:].all()  # rows the square never enters
    assert not static[1].any()  # the square's row: it visits every patch of it during frames 0..8
    assert static[0].all()
    assert not static_positions(similarity, 8, 9, threshold=0.8).any()  # across the cut nothing is static


def test_dyseg_cuts_at_the_scene_changes(cut_video):
    frame_features = patch_tokens(cut_video.frames).mean(1)  # (T, D) global features
    assert dyseg_cuts(frame_features, segments=3) == list(CUTS)
    assert dyseg_cuts(frame_features, segments=1) == list(CUTS)  # the threshold alone finds them too
    with pytest.raises(ValueError, match="frame_features must be"):
        dyseg_cuts(frame_features[None])


def test_holitom_windows_on_a_hand_example():
    """Two positions, four frames: position 0 constant, position 1 changes between frames 1 and 2."""
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    features = torch.stack([torch.stack([a, a]), torch.stack([a, a]), torch.stack([a, b]), torch.stack([a, b])])
    windows, saved = holitom_windows(features)
    # one window saves 1 * 3 = 3; [0,1] + [2,3] saves 2 * 1 + 2 * 1 = 4
    assert (windows, saved) == ([(0, 1), (2, 3)], 4)
    assert holitom_windows(features, max_window=1) == ([(0, 0), (1, 1), (2, 2), (3, 3)], 0)


def planted_video() -> torch.Tensor:
    """(6 frames x 4 positions, 3) features: each frame equals its DyCoke reference frame except at one planted
    position (frame 1 vs 0 at 2, frame 2 vs 0 at 1, frame 3 vs 2 at 3, frame 5 vs 4 at 0; frame 4 is new)."""
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(4, 3, generator=g) + 0.5]
    for ref, changed in [(0, 2), (0, 1), (2, 3), (None, None), (4, 0)]:  # frames 1..5
        frame = torch.rand(4, 3, generator=g) + 0.5 if ref is None else frames[ref].clone()
        if changed is not None:
            frame[changed] = torch.tensor([1.0, -1.0, 0.0])  # far from any positive vector
        frames.append(frame)
    return torch.cat(frames)


def test_dycoke_keeps_first_frames_whole_and_what_changed_elsewhere():
    from vlprune import create_selector
    from vlprune.signals import TokenView

    view = TokenView(index=torch.arange(24), grid=(2, 2), image=0, frames=6, features=planted_video())
    dycoke = create_selector("dycoke")
    kept = sorted(dycoke.select(view, 12).tolist())  # frames 0 and 4 whole (8) + one token each of 1, 2, 3, 5
    assert kept == sorted([0, 1, 2, 3, 16, 17, 18, 19] + [4 + 2, 8 + 1, 12 + 3, 20 + 0])
    more = sorted(dycoke.select(view, 14).tolist())  # two spare tokens more go to the earliest frames (1 and 2)
    assert len(more) == 14 and set(kept) < set(more) and {4 + 2, 8 + 1} <= set(more)
    assert len([i for i in more if 4 <= i < 8]) == 2 and len([i for i in more if 8 <= i < 12]) == 2
    paper = create_selector("dycoke", prune_ratio=0.5)  # the paper's own count: int(0.5 * 4) = 2 per other frame
    assert paper.count(view, 1) == 8 + 4 * 2 and len(paper.select(view, 1)) == 16
    with pytest.raises(ValueError, match=r"needs keep >= 8 \(ratio >= 0.333\), got 7"):
        dycoke.select(view, 7)
    image = TokenView(index=torch.arange(4), grid=(2, 2), image=1, features=planted_video()[:4])
    with pytest.raises(ValueError, match="at least two frames .* input 1 has one: use an image method"):
        dycoke.select(image, 2)
    with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\], got 1.5"):
        create_selector("dycoke", prune_ratio=1.5)
