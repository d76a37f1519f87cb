"""The embedded model: a small ``LlavaForConditionalGeneration`` (CLIP tower with [CLS], Llama decoder, word-level
tokenizer, ``LlavaProcessor``) trained by vlprune on the synthetic shapes task (:mod:`vlprune.app.shapes`) and shipped
with the package, so that the CLI and the demo work offline on a laptop.

``load_default_model()`` returns ``(model, processor)``; ``build_model()`` / ``build_processor()`` give the untrained
architecture (the training script, ``python -m vlprune.app.train``, starts from them).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from . import shapes

IMAGE_TOKEN = "<image>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)  # ids 0..4
PAD, BOS, EOS, UNK, IMAGE = range(5)
NAME = "shapes-vlm"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def default_path() -> Path:
    """Directory of the shipped weights (inside the installed package)."""
    return Path(str(resources.files("vlprune.app").joinpath("assets", NAME)))


def build_tokenizer():
    """A word-level fast tokenizer over :func:`vlprune.app.shapes.vocabulary` (whitespace split, ``<s>`` prepended)."""
    vocab = {w: i for i, w in enumerate(SPECIALS)}
    for word in shapes.vocabulary():
        vocab.setdefault(word, len(vocab))
    return word_tokenizer(vocab, {"image_token": IMAGE_TOKEN})


def word_tokenizer(vocab: dict[str, int], extra_special_tokens: dict[str, str]):
    """A left-padding word-level fast tokenizer over ``vocab`` (which holds ``<pad> <s> </s> <unk>``): whitespace
    split, ``<s>`` prepended, words joined by spaces when decoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens=extra_special_tokens,
    )


# The prompt of :func:`prompt` as a chat template (one "<image>" per image entry, then the lower-cased text), so that
# code that formats prompts with ``apply_chat_template`` (vlprune's lmms-eval model) feeds the model what it learned.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    + IMAGE_TOKEN
    + " {% endif %}{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] | trim | lower }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} answer :"
    "{% endif %}"
)


def build_processor():
    """``LlavaProcessor``: CLIP image processing at ``shapes.SIZE`` pixels and the word-level tokenizer; expands
    ``<image>`` to the 144 visual tokens."""
    from transformers import LlavaProcessor

    try:  # the PIL backend: no torchvision needed, and the pixels the model was trained on
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:  # older transformers: one backend
        from transformers import CLIPImageProcessor
    images = CLIPImageProcessor(
        size={"shortest_edge": shapes.SIZE},
        crop_size={"height": shapes.SIZE, "width": shapes.SIZE},
        image_mean=list(MEAN),
        image_std=list(STD),
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=build_tokenizer(),
        patch_size=shapes.PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(seed: int = 0, vision_width: int = 96, text_width: int = 128, layers: int = 4):
    """The untrained architecture: CLIP tower (``shapes.SIZE`` px, ``shapes.PATCH`` px patches, so 144 patches plus
    [CLS]), features from its last layer without [CLS], a two-layer projector and a Llama decoder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(shapes.vocabulary())
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=shapes.SIZE,
        patch_size=shapes.PATCH,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=text_width,
        intermediate_size=3 * text_width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(shapes.SIZE // shapes.PATCH) ** 2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = EOS
    model.generation_config.bos_token_id = BOS
    return model.eval()


def prompt(question: str) -> str:
    """The text the embedded model was trained on for ``question``: the image, the question, then ``answer :``."""
    return f"{IMAGE_TOKEN} {question.strip().lower()} answer :"


def load_default_model(path: str | Path | None = None, attn: str = "sdpa"):
    """The shipped model and processor, loaded offline: ``(LlavaForConditionalGeneration, LlavaProcessor)``.

    Raises
    ------
    FileNotFoundError
        If the weights are missing (a source checkout without them: run ``python -m vlprune.app.train``).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else default_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded model at {path}; train one with `python -m vlprune.app.train --out {path}`"
        )
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def answer(model, processor, image, question: str, max_new_tokens: int = 4) -> str:
    """Greedy answer of ``model`` to ``question`` about a PIL ``image``."""
    inputs = processor(images=image, text=prompt(question), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
