"""The video geometry shared by the LLaVA families that pool each frame's tokens (LLaVA-OneVision, LLaVA-NeXT-Video)."""

from __future__ import annotations

from ..captures import VisionCaptures


class PooledVideos:
    """Video geometry of the LLaVA families that pool each frame's tokens (a mixin before the adapter class): the
    wrapped ``get_video_features`` records ``store.family["videos"]`` (frames per video) and
    ``store.family["frame_tokens"]``; ``video_newline`` placeholders follow each video. Without ``"videos"`` there (an
    image call), the adapter's own rules apply."""

    video_newline = 0

    def image_sizes(self, store: VisionCaptures) -> list[int] | None:
        if "videos" in store.family:
            return [frames * store.family["frame_tokens"] + self.video_newline for frames in store.family["videos"]]
        return super().image_sizes(store)

    def grid_of(self, store: VisionCaptures, image: int, count: int) -> tuple[int, int] | None:
        if "videos" in store.family:
            return self.image_grid(store.family["frame_tokens"])
        return super().grid_of(store, image, count)

    def frames_of(self, store: VisionCaptures, image: int) -> int:
        return store.family["videos"][image] if "videos" in store.family else 1
