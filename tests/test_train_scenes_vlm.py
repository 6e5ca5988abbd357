"""The scenes VLM's training objectives (scripts/train_scenes_vlm.py, issue #18).

The object-level contrast must prefer features that tell shapes apart within a colour
(the I-Gen confuser), and the crop verification samples must say `no` for a crop that
does not hold the object its sentence names.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def T():
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(
            "train_scenes_vlm", SCRIPTS / "train_scenes_vlm.py"
        )
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPTS))


def _labels(n: int, seed: int = 0):
    from reasonedit_cli import scenes as S

    g = torch.Generator().manual_seed(seed)
    lab = torch.stack(
        [
            torch.randint(0, len(S.COLORS), (n, 4), generator=g),
            torch.randint(0, len(S.SHAPES), (n, 4), generator=g),
            torch.randint(0, len(S.SIZES), (n, 4), generator=g),
        ],
        -1,
    )
    lab[: n // 4, 0, 0] = len(S.COLORS)  # some empty quadrants
    return lab


def test_object_loss_prefers_features_that_separate_shapes_within_a_colour(T):
    from reasonedit_cli import scenes as S

    torch.manual_seed(0)
    lab = _labels(48)
    d = 32
    col = torch.randn(len(S.COLORS) + 1, d) * 3
    shp = torch.randn(len(S.SHAPES), d) * 3
    noise = torch.randn(48, 4, d) * 0.3
    colour_only = col[lab[:, :, 0]] + noise
    both = col[lab[:, :, 0]] + shp[lab[:, :, 1]] + noise
    cap = T.CaptionEmbed(d)
    l_colour = T.object_loss(colour_only, lab, cap, 0.1, 1.0).item()
    l_both = T.object_loss(both, lab, cap, 0.1, 1.0).item()
    assert l_both < l_colour
    # and it trains the features: the gradient reaches them
    x = colour_only.clone().requires_grad_(True)
    T.object_loss(x, lab, cap, 0.1, 1.0).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_object_loss_ignores_empty_quadrants_and_is_scale_free(T):
    torch.manual_seed(1)
    lab = _labels(32, seed=1)
    x = torch.randn(32, 4, 16)
    cap = T.CaptionEmbed(16)
    a = T.object_loss(x, lab, cap, 0.1, 1.0)
    x2 = x.clone()
    empty = lab[:, :, 0] == 8
    x2[empty] = 1e3  # features of empty quadrants never enter the loss
    assert torch.allclose(a, T.object_loss(x2, lab, cap, 0.1, 1.0))


def test_crop_probes_say_no_for_a_crop_without_the_named_object(T):
    from reasonedit_cli import scenes as S

    rng = random.Random(0)
    seen = {"yes": 0, "no": 0}
    for k in range(40):
        sc = S.make_scene(random.Random(k), n_objects=2)
        boxes = T.crop_boxes(sc, rng)
        assert any(T._holds(boxes[0], o) for o in sc.objects)  # the first holds an object
        for b in boxes:
            for _ in range(5):
                q, a = T.crop_probe_sample(sc, b, rng)
                seen[a] += 1
                named = [o for o in sc.objects if f" {o.region}" in q or o.color in q]
                assert q.startswith("Does the image show")
                if a == "yes":  # only for an object the crop holds
                    assert any(T._holds(b, o) for o in named)
    assert seen["yes"] > 20 and seen["no"] > 20
