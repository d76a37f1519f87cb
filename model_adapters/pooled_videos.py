"""The video geometry shared by the LLaVA families that pool each frame's tokens (LLaVA-OneVision, LLaVA-NeXT-Video)."""

from __future__ import annotations


class PooledVideos:
    """Video geometry of the LLaVA families that pool each frame's tokens (a mixin before the adapter class): the
    wrapped ``get_video_features`` records ``store["videos"]`` (frames per video) and ``store["frame_tokens"]``;
    ``video_newline`` placeholders follow each video. Without ``"videos"`` in the store (an image call), the
    adapter's own rules apply."""

    video_newline = 0

    def image_sizes(self, store: dict) -> list[int] | None:
        if "videos" in store:
            return [frames * store["frame_tokens"] + self.video_newline for frames in store["videos"]]
        return super().image_sizes(store)

    def grid_of(self, store: dict, image: int, count: int) -> tuple[int, int] | None:
        if "videos" in store:
            return self.image_grid(store["frame_tokens"])
        return super().grid_of(store, image, count)

    def frames_of(self, store: dict, image: int) -> int:
        return store["videos"][image] if "videos" in store else 1
