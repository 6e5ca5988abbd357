"""Shared fixtures: a tiny random-weight LLaVA built from configs, real images, edits.

The tiny model (`tiny_models.build_tiny_llava`) uses the real
`LlavaForConditionalGeneration` class with a byte-level BPE tokenizer and the PIL CLIP
image processor, so tests run the same code path as llava-1.5 in about a second. The text
encoder is the real bundled MiniLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_models import build_tiny_llava

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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


from fake_backend import fake_models  # noqa: E402, F401  (a fixture for plumbing tests)
