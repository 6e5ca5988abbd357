"""The demo-VLM training script's sampler contract for ``--self_target``.

Part 4 of the demo VLM's recipe trains plain and irrelevant-fact samples towards the
model's own answer to the bare question; the sampler must hand over that bare question for
exactly those samples, and every answer word must be one token of the bundled tokenizer
(the teacher reads its answer off one position).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "train_demo_vlm", ROOT / "scripts" / "train_demo_vlm.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sampler_names_the_bare_question_of_plain_and_irrelevant_samples(script):
    items = [
        (0, "what color is the shape?", "red", "red", "circle"),
        (1, "what shape is in the image?", "triangle", "blue", "triangle"),
        (2, "is there a green shape?", "no", "gray", "rectangle"),
    ]
    crops = [(3, "red", "circle", "full")]
    mix = dict(probe=0.1, plain=0.3, true=0.2, contra=0.2, distract=0.4, yn_fact=0.5)
    sampler = script.Sampler(items, None, crops, random.Random(0), mix, yn_gen=0.5, neg_p=0.5)
    attrs = {idx: (c, s) for idx, _, _, c, s in items}
    samples = [sampler.sample() for _ in range(2000)]
    bare = [x for x in samples if x[3] is not None]
    for idx, prompt, answer, question in bare:
        c, s = attrs[idx]  # never a probe: probes keep their gold targets
        assert prompt.endswith(question)
        assert answer == script.parse_question(question).answer(c, s)
    # plain + irrelevant-only = 0.3 + 0.2 of the mixture
    assert 0.44 < len(bare) / len(samples) < 0.56
    assert any(x[1] == x[3] for x in bare) and any(x[1] != x[3] for x in bare)


def test_answer_words_are_single_tokens_of_the_bundled_tokenizer(script):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "reasonedit_cli" / "models" / "demo_vlm")
    for w in script.ANSWER_WORDS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
