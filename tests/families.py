"""Tiny random models of every supported family, and their inputs built by hand (no processor, no download).

``Family.build(layers)`` returns a model; ``Family.inputs(model, shapes, seed)`` the keyword arguments of a
left-padded batch, where ``shapes`` lists per sample ``(text before, text after each image, image sizes)``;
``Family.positions(model, inputs)`` the unpruned sequence's positions as the model computes them (1-D, or M-RoPE's
(3, B, L)); ``Family.split(inputs, b)`` the inputs of sample ``b`` alone.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from reference import original_positions
from tiny import IMAGE, TEXT, batch, tiny_llava

VSTART, VEND = 102, 103
VIDEO = 101  # Qwen-VL's video placeholder in the tiny configs


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 90, (n,), generator=g).tolist()


class Llava:
    name = "llava"
    sizes = (16,)  # 56 px CLIP images: 16 tokens each

    def build(self, layers: int, seed: int = 0, attn: str = "sdpa"):
        return tiny_llava(attn, layers=layers, seed=seed)

    def inputs(self, model, shapes, seed=0) -> dict:
        prompts, images = [], 0
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for size in sizes:
                ids += [IMAGE] * size + _text(g, after)
            prompts.append(ids)
            images += len(sizes)
        ids, mask = batch(prompts)
        g = torch.Generator().manual_seed(1000 + seed)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(images, 3, 56, 56, generator=g))

    def positions(self, model, inputs) -> torch.Tensor:
        return original_positions(inputs["attention_mask"])

    def image_kwargs(self, inputs) -> dict:
        return {}

    def pixels(self, inputs) -> torch.Tensor:
        """What the vision tower encodes (images; videos for video inputs)."""
        return inputs["pixel_values"]

    def visual_tokens(self, model, inputs, shapes):
        """``(visual mask (B, L), visual tokens of each image per sample)``: the placeholders that are candidates."""
        return inputs["input_ids"] == IMAGE, [[self.tokens(s) for s in shape[2]] for shape in shapes]

    def tokens(self, size) -> int:
        return 16

    def split(self, inputs, shapes, b: int) -> dict:
        first = sum(len(s[2]) for s in shapes[:b])
        n = len(shapes[b][2])
        one = self._one(inputs, b)
        one["pixel_values"] = inputs["pixel_values"][first : first + n]
        return one

    @staticmethod
    def _one(inputs, b):
        mask = inputs["attention_mask"][b]
        start = int((mask == 0).sum())
        return {k: inputs[k][b : b + 1, start:] for k in ("input_ids", "attention_mask") if k in inputs}


class Qwen2VL(Llava):
    """Images are (h, w) patch grids (14 px patches, 2 x 2 merge): a (4, 8) grid gives 2 x 4 = 8 tokens."""

    name = "qwen2_vl"
    sizes = ((8, 8), (4, 8))  # 16 and 8 tokens
    patch = 14

    def config(self, layers: int):
        text = dict(TEXT, num_hidden_layers=layers)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2)
        vision["temporal_patch_size"] = 2
        return Qwen2VLConfig, Qwen2VLForConditionalGeneration, text, vision

    def build(self, layers: int, seed: int = 0, attn: str = "sdpa"):
        config_class, model_class, text, vision = self.config(layers)
        torch.manual_seed(seed)
        config = config_class(
            text_config=text,
            vision_config=vision,
            image_token_id=IMAGE,
            video_token_id=101,
            vision_start_token_id=VSTART,
            vision_end_token_id=VEND,
        )
        model = model_class(config).eval()
        model.set_attn_implementation(attn)
        return model

    token, type_id = IMAGE, 1  # placeholder and mm_token_type_ids value (images; videos in QwenVideo)
    pixel_key, grid_key = "pixel_values", "image_grid_thw"

    @staticmethod
    def thw(size) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of an input of ``size``."""
        return (1, *size)

    def inputs(self, model, shapes, seed=0) -> dict:
        prompts, grids = [], []
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for size in sizes:
                ids += self.placeholders(g, size) + _text(g, after)
                grids.append(list(self.thw(size)))
            prompts.append(ids)
        ids, mask = batch(prompts)
        grid = torch.tensor(grids, dtype=torch.long)
        g = torch.Generator().manual_seed(1000 + seed)
        pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * self.patch**2, generator=g)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            self.pixel_key: pixels,
            self.grid_key: grid,
            "mm_token_type_ids": self.type_id * (ids == self.token).int(),
        }

    def placeholders(self, g: torch.Generator, size) -> list[int]:
        """The ids an input of ``size`` occupies in the prompt."""
        return [VSTART] + [self.token] * self.tokens(size) + [VEND]

    def positions(self, model, inputs) -> torch.Tensor:
        """Positions of the prompt (and of tokens generated after it: text, whatever their ids)."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        types = inputs["mm_token_type_ids"]
        types = torch.cat([types, types.new_zeros(types.shape[0], ids.shape[1] - types.shape[1])], 1)
        return model.model.get_rope_index(ids, types, attention_mask=mask, **self.image_kwargs(inputs))[0]

    def pixels(self, inputs) -> torch.Tensor:
        return inputs[self.pixel_key]

    def image_kwargs(self, inputs) -> dict:
        return {self.grid_key: inputs[self.grid_key]}

    def visual_tokens(self, model, inputs, shapes):
        return inputs["input_ids"] == self.token, [[self.tokens(s) for s in shape[2]] for shape in shapes]

    def tokens(self, size) -> int:
        t, h, w = self.thw(size)
        return t * h * w // 4

    def split(self, inputs, shapes, b: int) -> dict:
        grid = inputs[self.grid_key]
        first = sum(len(s[2]) for s in shapes[:b])
        n = len(shapes[b][2])
        patches = grid.prod(-1)
        start = int(patches[:first].sum())
        end = start + int(patches[first : first + n].sum())
        one = self._one(inputs, b)
        one["mm_token_type_ids"] = self.type_id * (one["input_ids"] == self.token).int()
        one[self.grid_key] = grid[first : first + n]
        one[self.pixel_key] = inputs[self.pixel_key][start:end]
        return one


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"

    def config(self, layers: int):
        _, _, text, _ = super().config(layers)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=4, patch_size=14)
        vision.update(spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, text, vision


class QwenVideo:
    """Qwen2-VL / Qwen2.5-VL video inputs: each ``size`` is a ``(t, h, w)`` patch grid (``t`` temporal patches of two
    frames), ``t * h * w / 4`` video tokens."""

    sizes = ((2, 4, 8), (3, 8, 8))
    token, type_id = VIDEO, 2
    pixel_key, grid_key = "pixel_values_videos", "video_grid_thw"

    @staticmethod
    def thw(size) -> tuple[int, int, int]:
        return tuple(size)

    def frames(self, size) -> tuple[int, int]:
        """(frames, tokens per frame) of a video of ``size``."""
        return size[0], size[1] * size[2] // 4


class Qwen2VLVideo(QwenVideo, Qwen2VL):
    pass


class Qwen25VLVideo(QwenVideo, Qwen25VL):
    pass


class Qwen3VL(Qwen2VL):
    """16 px patches; DeepStack features of vision layers 0 and 1 are added after decoder layers 0 and 1."""

    name = "qwen3_vl"
    patch = 16

    def config(self, layers: int):
        _, _, text, _ = super().config(layers)
        text["head_dim"] = 8
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=4, patch_size=16)
        vision.update(spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        vision["deepstack_visual_indexes"] = [0, 1]
        return Qwen3VLConfig, Qwen3VLForConditionalGeneration, text, vision


class InternVL(Llava):
    """112 px tiles: 8 x 8 patches, pixel-shuffled to 4 x 4 = 16 tokens per tile; an image is 1 or 2 tiles."""

    name = "internvl"

    def build(self, layers: int, seed: int = 0, attn: str = "sdpa"):
        torch.manual_seed(seed)
        vision = InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=(112, 112),
            patch_size=(14, 14),
        )
        text = Qwen2Config(**dict(TEXT, num_hidden_layers=layers))
        config = InternVLConfig(
            vision_config=vision, text_config=text, image_token_id=IMAGE, downsample_ratio=0.5, image_seq_length=16
        )
        model = InternVLForConditionalGeneration(config).eval()
        model.set_attn_implementation(attn)
        return model

    def inputs(self, model, shapes, seed=0) -> dict:
        prompts, tiles = [], 0
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for n in sizes:
                ids += [VSTART] + [IMAGE] * (16 * n) + [VEND] + _text(g, after)
                tiles += n
            prompts.append(ids)
        ids, mask = batch(prompts)
        g = torch.Generator().manual_seed(1000 + seed)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(tiles, 3, 112, 112, generator=g))

    def tokens(self, size) -> int:
        return 16 * size

    def split(self, inputs, shapes, b: int) -> dict:
        first = sum(sum(s[2]) for s in shapes[:b])
        n = sum(shapes[b][2])
        one = self._one(inputs, b)
        one["pixel_values"] = inputs["pixel_values"][first : first + n]
        return one


class LlavaNext(Llava):
    """56 px tiles of 4 x 4 tokens; an image of (H, W) pixels is a base tile plus a grid of tiles (pinpoints up to
    112 x 112), packed with a newline token after each row of the unpadded grid: (56, 56) -> 16 + 4 x 5 placeholders,
    (56, 112) -> 16 + 4 x 9, (30, 112) -> 16 + 2 x 9 (rows cropped by the unpadding)."""

    name = "llava_next"
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]

    TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56)

    def config(self, layers: int):
        vision = CLIPVisionConfig(**self.TOWER, patch_size=14, projection_dim=32)
        text = LlamaConfig(**TEXT, num_hidden_layers=layers)
        settings = dict(vision_feature_layer=-2, vision_feature_select_strategy="default")
        return LlavaNextConfig, LlavaNextForConditionalGeneration, vision, text, settings

    def build(self, layers: int, seed: int = 0, attn: str = "sdpa"):
        torch.manual_seed(seed)
        config_class, model_class, vision, text, settings = self.config(layers)
        config = config_class(
            vision_config=vision,
            text_config=text,
            image_token_id=IMAGE,
            image_grid_pinpoints=self.pinpoints,
            **settings,
        )
        model = model_class(config).eval()
        model.set_attn_implementation(attn)
        return model

    def packed(self, model, pixel_values, **image_kwargs) -> list[torch.Tensor]:
        """Per image, which of its placeholders hold the newline: the unhooked model's packed features compared
        with its newline parameter."""
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **image_kwargs)
        newline = model.model.image_newline.to(out.pooler_output[0].dtype)
        return [(f == newline).all(-1) for f in out.pooler_output]

    def image_inputs(self, shapes) -> tuple[dict, int]:
        sizes = [size for shape in shapes for size in shape[2]]
        tiles = [image_size_to_num_patches(size, self.pinpoints, 56) for size in sizes]
        return {"image_sizes": torch.tensor(sizes, dtype=torch.long)}, max(tiles)

    def inputs(self, model, shapes, seed=0) -> dict:
        image_kwargs, tiles = self.image_inputs(shapes)
        g = torch.Generator().manual_seed(1000 + seed)
        pixels = torch.randn(len(image_kwargs["image_sizes"]), tiles, 3, 56, 56, generator=g)
        counts = iter([len(n) for n in self.packed(model, pixels, **image_kwargs)])
        prompts = []
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for _ in sizes:
                ids += [IMAGE] * next(counts) + _text(g, after)
            prompts.append(ids)
        ids, mask = batch(prompts)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, **image_kwargs)

    def image_kwargs(self, inputs) -> dict:
        return {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}

    def visual_tokens(self, model, inputs, shapes):
        newline = self.packed(model, inputs["pixel_values"], **self.image_kwargs(inputs))
        visual = inputs["input_ids"] == IMAGE
        visual[visual.clone()] = ~torch.cat(newline)
        counts = iter(int((~n).sum()) for n in newline)
        return visual, [[next(counts) for _ in shape[2]] for shape in shapes]

    def split(self, inputs, shapes, b: int) -> dict:
        one = super().split(inputs, shapes, b)
        first = sum(len(s[2]) for s in shapes[:b])
        one["image_sizes"] = inputs["image_sizes"][first : first + len(shapes[b][2])]
        return one


class LlavaNextVideo(LlavaNext):
    """LLaVA-NeXT-Video on images: LLaVA-NeXT's tiles (video frames: :class:`LlavaNextVideoVideo`)."""

    name = "llava_next_video"

    def config(self, layers: int):
        config_class, model_class, vision, text, settings = super().config(layers)
        settings.update(video_token_id=VIDEO, spatial_pool_stride=2, spatial_pool_mode="average")
        return LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, vision, text, settings


class LlavaOnevision(LlavaNext):
    """SigLIP (no [CLS]) 56 px tiles; pinpoints up to 224 x 224, so a (224, 224) image's 16 x 16 crop grid is
    interpolated down to 12 x 12 (anyres_max_9); a sample with several images gives each one tile
    (``batch_num_images``)."""

    name = "llava_onevision"
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112], [224, 224]]

    def config(self, layers: int):
        vision = SiglipVisionConfig(**self.TOWER, patch_size=14)
        text = Qwen2Config(**dict(TEXT, num_hidden_layers=layers))
        settings = dict(video_token_id=101, vision_feature_layer=-1, vision_feature_select_strategy="full")
        return LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, vision, text, settings

    def image_inputs(self, shapes) -> tuple[dict, int]:
        image_kwargs, tiles = super().image_inputs(shapes)
        image_kwargs["batch_num_images"] = torch.tensor([len(shape[2]) for shape in shapes])
        return image_kwargs, tiles

    def split(self, inputs, shapes, b: int) -> dict:
        one = super().split(inputs, shapes, b)
        one["batch_num_images"] = inputs["batch_num_images"][b : b + 1]
        return one


class PooledFrames:
    """Videos of the LLaVA families: each ``size`` is a frame count (equal within a batch: one (videos, frames, 3, 56,
    56) tensor); 56 px frames give 4 x 4 patches, pooled to 2 x 2 = 4 tokens per frame, then ``newline`` (0 or 1)
    placeholders per video that are not visual tokens."""

    per_frame, newline = 4, 0

    def inputs(self, model, shapes, seed=0) -> dict:
        prompts, frames = [], [size for shape in shapes for size in shape[2]]
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for size in sizes:
                ids += [VIDEO] * (size * self.per_frame + self.newline) + _text(g, after)
            prompts.append(ids)
        ids, mask = batch(prompts)
        g = torch.Generator().manual_seed(1000 + seed)
        pixels = torch.randn(len(frames), max(frames), 3, 56, 56, generator=g)
        return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels)

    def pixels(self, inputs) -> torch.Tensor:
        return inputs["pixel_values_videos"]

    def image_kwargs(self, inputs) -> dict:
        return {"videos": True}

    def visual_tokens(self, model, inputs, shapes):
        visual = inputs["input_ids"] == VIDEO
        if self.newline:  # each video's last placeholder
            visual &= torch.cat([visual[:, 1:], torch.zeros_like(visual[:, :1])], 1)
        return visual, [[self.tokens(s) for s in shape[2]] for shape in shapes]

    def tokens(self, size) -> int:
        return size * self.per_frame

    def frames(self, size) -> tuple[int, int]:
        return size, self.per_frame

    def split(self, inputs, shapes, b: int) -> dict:
        first = sum(len(s[2]) for s in shapes[:b])
        one = self._one(inputs, b)
        one["pixel_values_videos"] = inputs["pixel_values_videos"][first : first + len(shapes[b][2])]
        return one


class LlavaOnevisionVideo(PooledFrames, LlavaOnevision):
    """LLaVA-OneVision videos: one newline after each video."""

    newline = 1


class LlavaNextVideoVideo(PooledFrames, LlavaNextVideo):
    """LLaVA-NeXT-Video videos: no newline."""


class Qwen3VLVideo(QwenVideo, Qwen3VL):
    """Qwen3-VL videos as its processor writes them: each temporal patch is its own run, ``<timestamp text>
    <vision_start> h * w / 4 tokens <vision_end>``, and the model's M-RoPE gives each run its own time position."""

    def placeholders(self, g: torch.Generator, size) -> list[int]:
        t, h, w = self.thw(size)
        return [i for _ in range(t) for i in _text(g, 2) + [VSTART] + [self.token] * (h * w // 4) + [VEND]]


class InternVLVideo(InternVL):
    """InternVL videos as its processor writes them: each frame a one-tile image run after its own text (``Frame1:
    <img> 16 tokens </img>``). A ``size`` is a frame count, or ``(n,)`` for an image of ``n`` tiles in between; the
    caller says which runs are frames with :meth:`hint`."""

    def inputs(self, model, shapes, seed=0) -> dict:
        prompts, tiles = [], 0
        for i, (before, after, sizes) in enumerate(shapes):
            g = torch.Generator().manual_seed(seed + i)
            ids = [1] + _text(g, before)
            for size in sizes:
                runs = 1 if isinstance(size, tuple) else size
                for _ in range(runs):
                    ids += _text(g, 0 if isinstance(size, tuple) else 2)
                    ids += [VSTART] + [IMAGE] * (16 * (size[0] if isinstance(size, tuple) else 1)) + [VEND]
                ids += _text(g, after)
                tiles += size[0] if isinstance(size, tuple) else size
            prompts.append(ids)
        ids, mask = batch(prompts)
        g = torch.Generator().manual_seed(1000 + seed)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(tiles, 3, 112, 112, generator=g))

    @staticmethod
    def hint(shapes):
        """``prepare(pruned, samples)`` for :func:`test_families.check_method`: set_videos for those samples."""

        def prepare(pruned, samples):
            pruned.set_videos([[None if isinstance(s, tuple) else s for s in shapes[b][2]] for b in samples])

        return prepare

    def tokens(self, size) -> int:
        return 16 * (size[0] if isinstance(size, tuple) else size)

    def frames(self, size) -> tuple[int, int]:
        return (1, 16 * size[0]) if isinstance(size, tuple) else (size, 16)

    def split(self, inputs, shapes, b: int) -> dict:
        tiles = [sum(s[0] if isinstance(s, tuple) else s for s in shape[2]) for shape in shapes]
        one = self._one(inputs, b)
        one["pixel_values"] = inputs["pixel_values"][sum(tiles[:b]) : sum(tiles[: b + 1])]
        return one


FAMILIES = {
    f.name: f
    for f in (Llava(), Qwen2VL(), Qwen25VL(), Qwen3VL(), InternVL(), LlavaNext(), LlavaNextVideo(), LlavaOnevision())
}
VIDEO_FAMILIES = {  # video inputs
    f.name: f for f in (Qwen2VLVideo(), Qwen25VLVideo(), Qwen3VLVideo(), LlavaNextVideoVideo(), LlavaOnevisionVideo())
}
