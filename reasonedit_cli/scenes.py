"""A synthetic world of multi-object scenes with exact ground truth (issue #18).

easy-vqa shows one shape per image and asks it from a handful of templates, so neither
half of ReasonEdit's dual key has anything to do there (docs/evaluation.md). Here a
scene holds 1-4 objects, each with a shape, a colour and a size, placed in one of the
four quadrants (jittered) on one of four kinds of background, so the same object
recurs in many visual contexts; the question families have many wordings, some of them
held out of training; reasoning chains name the object's region and a rule that
transfers to any scene (`The red object in the top left has five points. An object
with five points is a star.`).

Everything is deterministic by seed: `make_scene(random.Random(seed))` and
`render(scene)` give the same scene and the same pixels every time.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "brown", "black")
SIZES = ("small", "large")
REGIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = ("plain", "gradient", "texture", "noise")
COUNT_WORDS = ("one", "two", "three", "four")
ANSWER_WORDS = (*COLORS, *SHAPES, "yes", "no", *COUNT_WORDS)
FAMILIES = ("color", "shape", "exist", "count", "spatial")
RELATIONS = {  # relation -> wording inside a question/fact
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
IMAGE_SIZE = 64

RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
}

# ---------------------------------------------------------------- reasoning rules
# shape -> (property, rule subject): "The red object in the top left has five points.
# An object with five points is a star."
SHAPE_PROPERTY = {
    "circle": "has no corners",
    "square": "has four equal sides and four corners",
    "triangle": "has three corners",
    "star": "has five points",
    "cross": "has four arms",
    "diamond": "has four corners pointing up, down, left and right",
}
SHAPE_RULE = {
    "circle": "An object with no corners is a circle.",
    "square": "An object with four equal sides and four corners is a square.",
    "triangle": "An object with three corners is a triangle.",
    "star": "An object with five points is a star.",
    "cross": "An object with four arms is a cross.",
    "diamond": "An object with four corners pointing up, down, left and right is a diamond.",
}
COLOR_THING = {  # colour -> (thing it has the colour of, rule)
    "red": ("a stop sign", "Stop signs are red."),
    "green": ("grass", "Grass is green."),
    "blue": ("the sky", "The sky is blue."),
    "yellow": ("a banana", "Bananas are yellow."),
    "purple": ("ripe grapes", "Ripe grapes are purple."),
    "orange": ("a carrot", "Carrots are orange."),
    "brown": ("chocolate", "Chocolate is brown."),
    "black": ("coal", "Coal is black."),
}

# ---------------------------------------------------------------- question wordings
# Each family: TRAIN wordings (used to train the scenes VLM) and HELDOUT wordings (never
# trained on; T-Gen probes and the model card's held-out rows use them).
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "color": {
        "train": (
            "what color is the {shape}?",
            "what is the color of the {shape}?",
            "which color does the {shape} have?",
            "what colour is the {shape}?",
            "what is the colour of the {shape}?",
            "the {shape} is what color?",
            "tell me the color of the {shape}.",
            "what color is the {shape} in the image?",
            "in what color is the {shape} drawn?",
            "which colour is the {shape}?",
            "what color has the {shape}?",
        ),
        "heldout": (
            "can you name the color of the {shape}?",
            "how is the {shape} colored?",
            "what hue is the {shape}?",
            "what paint was used for the {shape}?",
            "the {shape} has which color?",
        ),
    },
    "shape": {
        "train": (
            "what shape is the {color} object?",
            "what is the shape of the {color} object?",
            "which shape is {color}?",
            "what shape is {color}?",
            "what is the {color} shape?",
            "the {color} object is what shape?",
            "tell me the shape of the {color} object.",
            "what shape does the {color} object have?",
            "which shape is drawn in {color}?",
            "what kind of shape is the {color} object?",
        ),
        "heldout": (
            "what form does the {color} object take?",
            "what is the {color} thing?",
            "name the shape that is {color}.",
            "identify the {color} figure's shape.",
        ),
    },
    "exist": {
        "train": (
            "is there a {color} {shape}?",
            "is there a {color} {shape} in the image?",
            "does the image contain a {color} {shape}?",
            "is a {color} {shape} present?",
            "can you see a {color} {shape}?",
            "does the picture show a {color} {shape}?",
            "is any {color} {shape} visible?",
            "do you see a {color} {shape}?",
            "is a {color} {shape} in the picture?",
            "does the scene include a {color} {shape}?",
        ),
        "heldout": (
            "could you spot a {color} {shape} here?",
            "is a {color} {shape} depicted?",
            "would I find a {color} {shape} in this picture?",
            "has a {color} {shape} been drawn?",
        ),
    },
    "count": {
        "train": (
            "how many objects are there?",
            "how many shapes are in the image?",
            "how many objects are in the image?",
            "how many shapes are there?",
            "count the objects.",
            "what is the number of objects?",
            "how many things are drawn?",
            "how many shapes can you see?",
            "how many objects does the image contain?",
            "what number of shapes is shown?",
        ),
        "heldout": (
            "how many figures appear in the picture?",
            "tell me how many objects are present.",
            "what is the total count of shapes?",
            "how many items are depicted?",
        ),
    },
    "spatial": {
        "train": (
            "is the {a} {rel} the {b}?",
            "is the {a} placed {rel} the {b}?",
            "does the {a} appear {rel} the {b}?",
            "is the {a} located {rel} the {b}?",
            "in the image, is the {a} {rel} the {b}?",
            "is the {a} drawn {rel} the {b}?",
            "would you say the {a} is {rel} the {b}?",
            "is the {a} positioned {rel} the {b}?",
            "does the {a} sit {rel} the {b}?",
            "is the {a} found {rel} the {b}?",
        ),
        "heldout": (
            "can the {a} be seen {rel} the {b}?",
            "looking at the picture, is the {a} {rel} the {b}?",
            "does the {a} lie {rel} the {b}?",
            "is the {a} somewhere {rel} the {b}?",
        ),
    },
}


# ---------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    region: str
    x: float  # centre, pixels
    y: float

    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} in the {self.region}"


@dataclass(frozen=True)
class Scene:
    """1-4 objects with distinct shapes and distinct colours, one per quadrant."""

    objects: tuple[SceneObject, ...]
    background: str
    bg_seed: int
    bg_tint: tuple[int, int, int] = (230, 230, 230)

    def by_shape(self, shape: str) -> SceneObject | None:
        return next((o for o in self.objects if o.shape == shape), None)

    def by_color(self, color: str) -> SceneObject | None:
        return next((o for o in self.objects if o.color == color), None)

    def has(self, color: str, shape: str) -> bool:
        return any(o.color == color and o.shape == shape for o in self.objects)

    def caption(self) -> str:
        """A generated caption (the contrastive pretraining's text side)."""
        return "; ".join(o.caption() for o in self.objects) + f"; {self.background} background"


def make_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    fixed: tuple[tuple[str, str], ...] = (),
) -> Scene:
    """A random scene. `fixed`: (shape, colour) pairs that must appear (I-Gen scenes show
    an edit's object again in another context); the rest is drawn so that shapes and
    colours stay distinct within the scene."""
    n = n_objects or rng.randint(1, 4)
    n = max(n, len(fixed))
    shapes = [s for s, _ in fixed]
    colors = [c for _, c in fixed]
    free_s = [s for s in SHAPES if s not in shapes]
    free_c = [c for c in COLORS if c not in colors]
    rng.shuffle(free_s)
    rng.shuffle(free_c)
    shapes += free_s[: n - len(shapes)]
    colors += free_c[: n - len(colors)]
    regions = list(REGIONS)
    rng.shuffle(regions)
    half = IMAGE_SIZE / 2
    objects = []
    for shape, color, region in zip(shapes, colors, regions):
        size = rng.choice(SIZES)
        r = radius(size)
        col = 0 if "left" in region else 1
        row = 0 if "top" in region else 1
        slack = half / 2 - r - 1
        x = col * half + half / 2 + rng.uniform(-slack, slack)
        y = row * half + half / 2 + rng.uniform(-slack, slack)
        objects.append(SceneObject(shape, color, size, region, round(x, 2), round(y, 2)))
    background = rng.choice(BACKGROUNDS)
    tint = tuple(rng.randint(185, 245) for _ in range(3))
    return Scene(tuple(objects), background, rng.randrange(1 << 30), tint)  # type: ignore[arg-type]


def radius(size: str) -> float:
    return 7.0 if size == "small" else 11.0


def relation(scene: Scene, a: SceneObject, b: SceneObject, rel: str) -> bool:
    """Whether `a` is `rel` of `b` (by quadrant: objects sit in distinct quadrants)."""
    if rel == "left":
        return "left" in a.region and "right" in b.region
    if rel == "right":
        return "right" in a.region and "left" in b.region
    if rel == "above":
        return "top" in a.region and "bottom" in b.region
    return "bottom" in a.region and "top" in b.region


def decidable(a: SceneObject, b: SceneObject, rel: str) -> bool:
    """Whether `rel` between `a` and `b` has a clear answer (they differ on that axis)."""
    axis = ("left", "right") if rel in ("left", "right") else ("top", "bottom")
    return [w in a.region for w in axis] != [w in b.region for w in axis]


# ---------------------------------------------------------------- rendering
def _polygon(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)]
    if shape == "triangle":
        return [
            (x + r * math.cos(a), y + r * math.sin(a) + r * 0.15)
            for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    if shape == "diamond":
        return [(x, y - r), (x + r * 0.8, y), (x, y + r), (x - r * 0.8, y)]
    if shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rr * math.cos(a), y + rr * math.sin(a)))
        return pts
    if shape == "cross":
        t = r * 0.36
        return [
            (x - t, y - r),
            (x + t, y - r),
            (x + t, y - t),
            (x + r, y - t),
            (x + r, y + t),
            (x + t, y + t),
            (x + t, y + r),
            (x - t, y + r),
            (x - t, y + t),
            (x - r, y + t),
            (x - r, y - t),
            (x - t, y - t),
        ]
    raise ValueError(shape)


def _background(scene: Scene, size: int):
    import numpy as np

    rng = np.random.default_rng(scene.bg_seed)
    tint = np.array(scene.bg_tint, dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if scene.background == "plain":
        img: np.ndarray = np.broadcast_to(tint, (size, size, 3)).astype(np.float64)
    elif scene.background == "gradient":
        other = rng.integers(185, 246, size=3).astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = tint * (1 - t[..., None]) + other * t[..., None]
    elif scene.background == "texture":
        period = float(rng.integers(4, 9))
        a = rng.uniform(0, math.pi)
        wave = np.sin((np.cos(a) * xx + np.sin(a) * yy) * size * 2 * math.pi / period)
        img = tint - 22.0 * (wave[..., None] > 0)
    else:  # noise
        img = tint + rng.normal(0, 14.0, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render(scene: Scene, size: int = IMAGE_SIZE):
    """The scene as an RGB PIL image (objects drawn 4x supersampled, then downscaled)."""
    from PIL import Image, ImageDraw

    k = 4
    bg = Image.fromarray(_background(scene, size)).resize(
        (size * k, size * k), Image.Resampling.NEAREST
    )
    draw = ImageDraw.Draw(bg)
    scale = size * k / IMAGE_SIZE
    for o in scene.objects:
        x, y, r = o.x * scale, o.y * scale, radius(o.size) * scale
        if o.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=RGB[o.color])
        else:
            draw.polygon(_polygon(o.shape, x, y, r), fill=RGB[o.color])
    return bg.resize((size, size), Image.Resampling.LANCZOS)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- questions
@dataclass(frozen=True)
class Question:
    """One question about a scene, with its family, exact answer and the object it asks."""

    text: str
    family: str
    answer: str
    target: SceneObject | None = None  # the object the question is about (colour/shape)
    wording: int = 0  # index into the family's wordings of its split
    split: str = "train"


def question(
    scene: Scene,
    family: str,
    rng: random.Random,
    split: str = "train",
    *,
    target: SceneObject | None = None,
    wording: int | None = None,
) -> Question | None:
    """A question of `family` about `scene` with its exact answer (None if the scene
    cannot pose one, e.g. a spatial question on a one-object scene)."""
    pool = QUESTIONS[family][split]
    k = rng.randrange(len(pool)) if wording is None else wording % len(pool)
    t = pool[k]
    objs = scene.objects
    if family == "color":
        o = target or rng.choice(objs)
        return Question(t.format(shape=o.shape), family, o.color, o, k, split)
    if family == "shape":
        o = target or rng.choice(objs)
        return Question(t.format(color=o.color), family, o.shape, o, k, split)
    if family == "exist":
        if target is not None or rng.random() < 0.5:
            o = target or rng.choice(objs)
            c, s = o.color, o.shape
        else:  # a near miss: a colour or a shape of the scene, in another combination
            o = rng.choice(objs)
            if rng.random() < 0.5:
                c, s = o.color, rng.choice([x for x in SHAPES if x != o.shape])
            else:
                c, s = rng.choice([x for x in COLORS if x != o.color]), o.shape
        ans = "yes" if scene.has(c, s) else "no"
        return Question(t.format(color=c, shape=s), family, ans, o, k, split)
    if family == "count":
        return Question(t, family, COUNT_WORDS[len(objs) - 1], None, k, split)
    if family == "spatial":
        pairs = [
            (a, b, rel)
            for a in objs
            for b in objs
            if a is not b
            for rel in RELATIONS
            if decidable(a, b, rel)
        ]
        if not pairs:
            return None
        a, b, rel = rng.choice(pairs)
        ans = "yes" if relation(scene, a, b, rel) else "no"
        text = t.format(a=a.shape, b=b.shape, rel=RELATIONS[rel])
        return Question(text, family, ans, a, k, split)
    raise ValueError(family)


# ---------------------------------------------------------------- reasoning chains
def shape_chain(o: SceneObject, shape: str | None = None) -> list[str]:
    """Why `o` (named by colour and region) is `shape` (default: its own shape)."""
    s = shape or o.shape
    return [f"The {o.color} object in the {o.region} {SHAPE_PROPERTY[s]}.", SHAPE_RULE[s]]


def color_chain(o: SceneObject, color: str | None = None) -> list[str]:
    """Why `o` (named by shape and region) is `color` (default: its own colour)."""
    c = color or o.color
    thing, rule = COLOR_THING[c]
    return [f"The {o.shape} in the {o.region} is the colour of {thing}.", rule]


def asked(
    scene: Scene, family: str, rng: random.Random, split: str, target: SceneObject
) -> Question:
    """`question` about a given object of the scene (colour, shape and existence always
    have one)."""
    q = question(scene, family, rng, split, target=target)
    if q is None:
        raise ValueError(f"no {family} question about {target.caption()}")
    return q


def reasoning(q: Question) -> list[str]:
    """The reasoning chain of a colour or shape question's correct answer."""
    assert q.target is not None
    return color_chain(q.target) if q.family == "color" else shape_chain(q.target)


def contact_sheet(scenes: list[Scene], cols: int = 8, scale: int = 2):
    """A grid of rendered scenes (to look at what the generator makes)."""
    from PIL import Image

    rows = -(-len(scenes) // cols)
    s = IMAGE_SIZE * scale
    sheet = Image.new("RGB", (cols * (s + 4), rows * (s + 4)), (255, 255, 255))
    for i, sc in enumerate(scenes):
        img = render(sc).resize((s, s), Image.Resampling.NEAREST)
        sheet.paste(img, ((i % cols) * (s + 4), (i // cols) * (s + 4)))
    return sheet


# ---------------------------------------------------------------- evaluation set
def scene_rng(seed: int, *parts: int) -> random.Random:
    """A scene's own rng: the scene depends on (seed, parts) only, not on call order."""
    return random.Random(hash_parts(seed, *parts))


def hash_parts(*parts: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


def build_scenes(
    ask,
    *,
    n_edits: int = 100,
    seed: int = 0,
    max_scenes: int | None = None,
    batch_size: int = 64,
    coe_tries: int = 8,
    max_per_scene: int = 3,
):
    """(edits, probes, info) on generated scenes, the protocol of docs/evaluation.md.

    `ask(image_bytes_list, questions)` returns the unedited model's answers (the caller
    caches them). Candidate scenes are drawn from `seed`; on each, one colour or shape
    question (training wordings) is asked about every object, and every wrong answer
    becomes an edit (at most `max_per_scene`), so a scene can carry two or three edits,
    one per object: there the text half of the key must tell them apart. Per edit:

    * T-Gen: the same scene and object, a held-out wording of the question;
    * I-Gen: another scene holding the same object (shape and colour) in another place,
      on another background, with other objects, asked the edit's question;
    * R-Gen: `is there a <colour> <shape>?` (held-out wording) on the edited scene -> yes;
    * CoE-Gen: another scene with the same object where the unedited model makes the
      same mistake (same wrong answer), asked its question (up to `coe_tries` scenes);
    * hard_loc: the edited scene asked about one of its objects that carries no edit,
      answered right by the unedited model.

    Loc: `n_edits` questions of every family on scenes holding none of the edited
    objects, answered right by the unedited model.
    """
    from reasonedit_cli.edits import Edit
    from reasonedit_cli.evaluation import Probe, exact_match

    budget = max_scenes or 40 * n_edits + batch_size
    cache: dict[tuple[int, ...], tuple[Scene, bytes]] = {}

    def scene_at(*parts: int, fixed: tuple[tuple[str, str], ...] = ()) -> tuple[Scene, bytes]:
        if parts not in cache:
            sc = make_scene(scene_rng(seed, *parts), fixed=fixed)
            cache[parts] = (sc, png_bytes(render(sc)))
        return cache[parts]

    # 1. edits: every object of a candidate scene asked one colour or shape question
    edits: list[Edit] = []
    edit_q: list[tuple[int, Question, str]] = []  # (scene index, question, wrong answer)
    asked_scenes = 0
    n_asked = 0
    while len(edits) < n_edits and asked_scenes < budget:
        chunk = range(asked_scenes, min(asked_scenes + batch_size, budget))
        asked_scenes = chunk.stop
        pending = []
        for i in chunk:
            sc, data = scene_at(0, i)
            qrng = scene_rng(seed, 2, i)
            for o in sc.objects:
                fam = qrng.choice(("color", "shape"))
                pending.append((i, data, asked(sc, fam, qrng, "train", o)))
        answers = ask([d for _, d, _ in pending], [q.text for _, _, q in pending])
        n_asked += len(pending)
        for (i, data, q), a in zip(pending, answers):
            on_scene = sum(j == i for j, _, _ in edit_q)
            if exact_match(a, q.answer) or len(edits) >= n_edits or on_scene >= max_per_scene:
                continue
            e = Edit(
                image_path=Path(f"scene-{seed}-{i}.png"),
                question=q.text,
                answer=q.answer,
                reasoning=reasoning(q),
                source="scenes",
                image_bytes=data,
                image_ext="png",
                where=f"scenes seed {seed} scene {i}",
            )
            e.ensure_id()
            edits.append(e)
            edit_q.append((i, q, a))
    edited_objects = {(q.target.shape, q.target.color) for _, q, _ in edit_q if q.target}
    edited_by_scene: dict[int, set[str]] = {}
    for i, q, _ in edit_q:
        edited_by_scene.setdefault(i, set()).add(q.target.shape if q.target else "")

    probes: list[Probe] = []

    def add(data: bytes, q: str, a: str, kind: str, e: Edit | None, where: str) -> None:
        probes.append(Probe(data, q, a, kind, e.id if e else None, where))

    # 2. probes tied to each edit
    coe_pending = []
    hard_pending = []
    for n, (e, (i, q, wrong)) in enumerate(zip(edits, edit_q)):
        sc, data = scene_at(0, i)
        target = q.target
        assert target is not None
        o = target
        prng = scene_rng(seed, 3, n)
        tq = asked(sc, q.family, prng, "heldout", o)
        add(data, tq.text, tq.answer, "t_gen", e, f"scene {i} t_gen")
        other, odata = scene_at(1, n, fixed=((o.shape, o.color),))
        add(odata, q.text, q.answer, "i_gen", e, f"scene i{n} i_gen (edit scene {i})")
        rq = asked(sc, "exist", prng, "heldout", o)
        add(data, rq.text, "yes", "r_gen", e, f"scene {i} r_gen")
        for t in range(coe_tries):
            csc, cdata = scene_at(2, n, t, fixed=((o.shape, o.color),))
            coe_pending.append((n, t, cdata, q.text, wrong))
        rest = [x for x in sc.objects if x.shape not in edited_by_scene[i]]
        if rest:
            x = prng.choice(rest)
            hq = asked(sc, prng.choice(("color", "shape")), prng, "train", x)
            hard_pending.append((n, i, data, hq))
    coe_answers = ask([c[2] for c in coe_pending], [c[3] for c in coe_pending])
    n_asked += len(coe_pending)
    found: set[int] = set()
    for (n, t, cdata, qtext, wrong), a in zip(coe_pending, coe_answers):
        if n not in found and exact_match(a, wrong):
            found.add(n)
            add(cdata, qtext, edit_q[n][1].answer, "coe_gen", edits[n], f"scene c{n}.{t} coe_gen")
    hard_answers = ask([h[2] for h in hard_pending], [h[3].text for h in hard_pending])
    n_asked += len(hard_pending)
    for (n, i, data, hq), a in zip(hard_pending, hard_answers):
        if exact_match(a, hq.answer):
            add(data, hq.text, hq.answer, "hard_loc", None, f"scene {i} hard_loc (edit {n})")

    # 3. locality: scenes holding no edited object, every family, answered right
    loc: list[tuple[bytes, Question, int]] = []
    k = 0
    while len(loc) < n_edits and k < 20 * n_edits:
        batch: list[tuple[bytes, Question, int]] = []
        while len(batch) < batch_size and k < 20 * n_edits:
            sc, data = scene_at(3, k)
            k += 1
            if any((o.shape, o.color) in edited_objects for o in sc.objects):
                continue
            qrng = scene_rng(seed, 4, k)
            lq = None
            while lq is None:
                lq = question(sc, qrng.choice(FAMILIES), qrng, "train")
            batch.append((data, lq, k))
        answers = ask([c[0] for c in batch], [c[1].text for c in batch])
        n_asked += len(batch)
        for c, a in zip(batch, answers):
            if exact_match(a, c[1].answer) and len(loc) < n_edits:
                loc.append(c)
    for data, lq, k in loc:
        add(data, lq.text, lq.answer, "loc", None, f"scene l{k} loc ({lq.family})")
    per_scene: dict[int, int] = {}
    for i, _, _ in edit_q:
        per_scene[i] = per_scene.get(i, 0) + 1
    info = {
        "dataset": "scenes",
        "seed": seed,
        "scenes_asked": asked_scenes,
        "questions_asked": n_asked,
        "mistakes_found": len(edits),
        "edit_kinds": {f: sum(q.family == f for _, q, _ in edit_q) for f in ("color", "shape")},
        "scenes_with_edits": {
            str(m): sum(v == m for v in per_scene.values()) for m in sorted(set(per_scene.values()))
        },
        "probes": {
            kind: sum(p.kind == kind for p in probes) for kind in sorted({p.kind for p in probes})
        },
    }
    return edits, probes, info
