"""Tiny random models of the real transformers classes, and inputs built by hand (no downloads)."""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

VOCAB, IMAGE, PAD = 128, 100, 0
SIDE = 56  # 56 px / 14 px patches -> 4 x 4 = 16 visual tokens per image
# the tiny decoder of every family (layers set per model)
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llava(
    attn: str = "sdpa", vision: str = "clip", layers: int = 4, seed: int = 0, side: int = SIDE, vision_layers: int = 3
):
    """A random LLaVA (CLIP or SigLIP tower, Llama decoder) with ``(side / 14) ** 2`` visual tokens per image (16 by
    default; ``side=336, vision_layers=24, layers=32`` has LLaVA-1.5's token count and depths at tiny widths)."""
    torch.manual_seed(seed)
    text = LlamaConfig(**TEXT, num_hidden_layers=layers)
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=side,
        patch_size=14,
    )
    vision_config = CLIPVisionConfig(**sizes, projection_dim=32) if vision == "clip" else SiglipVisionConfig(**sizes)
    strategy = "default" if vision == "clip" else "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def tokens_per_image(model) -> int:
    v = model.config.vision_config
    return (
        (v.image_size // v.patch_size) ** 2
        - (model.config.vision_feature_select_strategy == "default")
        + (v.model_type == "clip_vision_model")
    )


def prompt(model, before: int, after: int, images: int = 1, seed: int = 0) -> list[int]:
    """Token ids: ``before`` text tokens, then per image its placeholders followed by ``after`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    n = tokens_per_image(model)
    ids = [1] + torch.randint(3, 90, (before,), generator=g).tolist()
    for _ in range(images):
        ids += [IMAGE] * n + torch.randint(3, 90, (after,), generator=g).tolist()
    return ids


def pixels(images: int, seed: int = 0, side: int = SIDE) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(images, 3, side, side, generator=g)


def batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return ids, mask


VIDEO_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'video' %}<video> "
    "{% elif part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


def word_tokenizer(words: list[str], image: int = IMAGE, video: int = 101, special=None, names=None):
    """A word-level tokenizer over ``words`` with ``<image>`` / ``<video>`` at the tiny configs' ids (or the
    ``special`` tokens and ids, named for the processor by ``names``), every other id of the tiny vocabulary a filler
    word (so whatever a random model emits decodes)."""
    from vlprune.app.embedded import word_tokenizer

    vocab = {"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3, **(special or {"<image>": image, "<video>": video})}
    free = (i for i in range(VOCAB) if i not in vocab.values())
    for word in words:
        vocab[word] = next(free)
    for i in free:
        vocab[f"w{i}"] = i
    return word_tokenizer(vocab, names or {"image_token": "<image>", "video_token": "<video>"})


def save_tiny_onevision(folder) -> str:
    """Save a tiny random LLaVA-OneVision (2 decoder layers) with a real ``LlavaOnevisionProcessor`` (frames resized
    to 56 px: 4 x 4 patches pooled to 2 x 2 = 4 tokens per frame, then one newline per video) in ``folder``."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from families import LlavaOnevisionVideo

    model = LlavaOnevisionVideo().build(layers=2)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, 2
    model.save_pretrained(folder)
    side = {"height": 56, "width": 56}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=[[56, 56]]),
        video_processor=LlavaOnevisionVideoProcessor(size=side),
        tokenizer=word_tokenizer("what moves in the video ? answer :".split()),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        chat_template=VIDEO_TEMPLATE,
    ).save_pretrained(folder)
    return str(folder)


def save_tiny_internvl(folder) -> str:
    """Save a tiny random InternVL (2 decoder layers) with a real ``InternVLProcessor`` (112 px single-tile images and
    frames: 16 tokens each, a video written as one ``<img>`` run per frame) in ``folder``."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    from families import VEND, VSTART, InternVLVideo

    model = InternVLVideo().build(layers=2)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, 2
    model.save_pretrained(folder)
    special = {"<IMG_CONTEXT>": IMAGE, "<img>": VSTART, "</img>": VEND, "<video>": 101, "<image>": 104}
    names = {"image_token": "<image>", "video_token": "<video>", "start_image_token": "<img>"}
    names.update(end_image_token="</img>", context_image_token="<IMG_CONTEXT>")
    side = {"height": 112, "width": 112}
    InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=side, crop_to_patches=False),
        video_processor=InternVLVideoProcessor(size=side),
        tokenizer=word_tokenizer("what moves in the video ? answer :".split(), special=special, names=names),
        image_seq_length=16,
        chat_template=VIDEO_TEMPLATE,
    ).save_pretrained(folder)
    return str(folder)


# query_frames' CLIP, as a tiny random open_clip model registered by name (see register_tiny_clip)
TINY_CLIP = {"clip": "vlprune-tiny-clip", "pretrained": None}


def register_tiny_clip(folder) -> None:
    """Register a 32 px CLIP of 2 + 2 layers (8 px patches: a 4 x 4 grid) with open_clip as ``vlprune-tiny-clip``."""
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (folder / "vlprune-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def random_frames(count: int, seed: int = 0, side: int = 48) -> np.ndarray:
    """``count`` decoded frames of random pixels, (count, side, side, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, side, side, 3), dtype=np.uint8)
