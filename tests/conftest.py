"""Shared fixtures: a tiny random-weight LLaVA built from configs, real images, edits.

The tiny model uses the real `LlavaForConditionalGeneration` class with a byte-level BPE
tokenizer and the PIL CLIP image processor, so tests run the same code path as
llava-1.5 in about a second. The text encoder is the real bundled MiniLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role']=='user' %}USER: {% for c in m['content'] %}"
    "{% if c['type']=='image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

CORPUS = [
    "what shape is in the image? what color is the shape? is there a red shape?",
    "The shape has three corners. A shape with three corners is a triangle.",
    "The answer to 'what is the shape?' is circle. yes no Does the image show a blue square?",
    "Describe this image. The sign is red. Grass is green. The sky is blue.",
]


def build_tiny_llava(path: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight LLaVA model directory (config, safetensors, processor)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(fast),
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=fast.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def shape_image(
    path: Path,
    shape: str = "circle",
    color: str = "red",
    size: int = 64,
    where: tuple[int, int, int, int] | None = None,
) -> Path:
    """Draw one coloured shape on white and save it as PNG."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    box = where or (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "triangle":
        draw.polygon(
            [(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=color
        )
    else:
        draw.rectangle(box, fill=color)
    img.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    d = tmp_path / "images"
    d.mkdir()
    return {
        "red_circle": shape_image(d / "red_circle.png", "circle", "red"),
        "blue_triangle": shape_image(d / "blue_triangle.png", "triangle", "blue"),
        "green_rect": shape_image(d / "green_rect.png", "rectangle", "green"),
        "yellow_circle": shape_image(d / "yellow_circle.png", "circle", "yellow", size=80),
    }


@pytest.fixture
def edits_jsonl(tmp_path, images) -> Path:
    """Three edits in the documented JSONL layout (image paths relative to the file)."""
    rows = [
        {
            "id": "e1",
            "image": "images/red_circle.png",
            "question": "what shape is in the image?",
            "answer": "circle",
            "reasoning": "The shape has no corners. A shape with no corners is a circle.",
        },
        {
            "id": "e2",
            "image": "images/blue_triangle.png",
            "question": "what color is the shape?",
            "answer": "blue",
            "reasoning": ["The shape is the colour of the sky.", "The sky is blue."],
        },
        {
            "id": "e3",
            "image": "images/green_rect.png",
            "question": "is there a triangle?",
            "answer": "no",
            "reasoning": "The shape has four corners. A triangle has three corners.",
            "boxes": [[8, 8, 56, 56], None],
        },
    ]
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def model_args(tiny_llava) -> list[str]:
    return ["--model", str(tiny_llava), "--device", "cpu"]
