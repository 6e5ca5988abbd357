"""The object index: the codebook's second index, for the same object in other scenes (I-Gen).

Whole-image dual keys pool the VLM's vision features over the whole scene, so another
scene holding the edited object lands as far from the edit's keys as an unrelated one:
I-Gen retrieval is 0.00 at the defaults on the scenes VLM (docs/evaluation.md, "On the
committed weights"). The object index holds one key per edit whose reasoning *names* a
region ("the object in the top left ..."): its image half is the token window of that
region (`regions.RegionEmbedder`), its text half the edit's question at a heavy
w = `OBJECT_W_FACTOR` x the plain auto w of the codebook's first `OBJECT_W_EDITS` edits,
and its gate is `OBJECT_TAU_X` x its own `images` tau (p 25). A query is embedded over
every window of its image; a question gets the union of both indexes' retrievals
(`regions.union_retrieval`: the facts only the object index found go first). Measured
through `evaluate --methods reasonedit-objects`, which runs exactly this code: I-Gen
retrieval 0.55 / 0.73 on unseen scenes seeds 3 / 5, Loc 1.000 / 0.975.

Why a second index and not more keys in the first: an I-Gen probe asks the edit's own
question, so a heavy w leaves its distance alone and pushes every other question away;
the whole-image keys need a light w or they lose rephrasings. One index cannot have both.

On disk (docs/codebook-format.md, "The object index") it is a codebook of the same
format in `<codebook>/objects/`, with its own manifest, versions, segments, derived
index and images. The main manifest's config links the version that goes with it
(`config.objects`: version and manifest checksum); readers open that version, never the
object index's head. A writer commits the object index first and the main manifest
(whose link names it) second, so the main commit stays the single commit point: a crash
between the two leaves the object index ahead of its link, readers keep using the
linked version, and the next writer restores the object index to it before changing it.

Edits whose reasoning names no region get no key here, so a codebook whose reasoning
names none (easy-vqa, the bundled sample edits) has no object index and answers exactly
as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from reasonedit_cli.errors import CodebookError, ReasonEditError
from reasonedit_cli.regions import (
    OBJECT_TAU_X,
    OBJECT_W_FACTOR,
    RegionEmbedder,
    ScaledTau,
    best_retrieval,
    named_box,
    pixel_box,
    region_seed,
    window_for,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from reasonedit_cli.retrieval import Retrieval
    from reasonedit_cli.store import Codebook, CodebookWriter, EditRecord, KeyRecord

#: the object index's folder inside the codebook
OBJECTS_DIR = "objects"
#: the plain auto w that `OBJECT_W_FACTOR` multiplies comes from this many first edits
OBJECT_W_EDITS = 32
#: the object index's own tau rule and percentile (the constants were chosen with these)
OBJECT_TAU_RULE = "images"
OBJECT_PERCENTILE = 25.0


def object_box(reasoning: Sequence[str], size: tuple[int, int]) -> list[int] | None:
    """The pixel box of the region the first reasoning sentence naming one names
    (`regions.named_box`: halves and quarters), None when no sentence names one."""
    for sentence in reasoning:
        b = named_box(sentence)
        if b is not None:
            return pixel_box(b, size)
    return None


def names_a_region(reasoning: Sequence[str]) -> bool:
    return any(named_box(s) is not None for s in reasoning)


def object_layer_ok(vlm: Any, layer: str) -> bool:
    """Only vision-side layers have the token grid the windows are cut from."""
    try:
        return vlm.resolve_layer(layer).role in ("vision", "projector")
    except (ReasonEditError, ValueError, KeyError, AttributeError):
        return False


def plain_auto_w(vectors: np.ndarray, text_half: np.ndarray) -> float:
    """`embedding.auto_w` of dual keys `concat(h, w * s)` from their vectors and text
    halves: the image half is the vectors' first `dim - text dim` columns."""
    from reasonedit_cli.embedding import auto_w

    v = np.asarray(vectors, dtype=np.float32)
    s = np.asarray(text_half, dtype=np.float32)
    return float(auto_w(v[:, : v.shape[1] - s.shape[1]], s))


def object_keys(
    rk: RegionEmbedder, edits: Sequence[Any], images: Sequence[Image.Image]
) -> list[KeyRecord]:
    """One object key per edit whose reasoning names a region: the window that best
    overlaps it, the edit's question, its answer as the fact; radius = distance to the
    key of a seeded augmentation of the image (as every key's, docs/method.md#radii).

    `edits` carry `id`, `question`, `answer`, `reasoning`, `image_sha256` (Edit or
    a look-alike); `images` are their decoded images."""
    from reasonedit_cli.augment import augment_image
    from reasonedit_cli.editor import answer_value
    from reasonedit_cli.store import KeyRecord

    rows = []
    for e, img in zip(edits, images):
        box = object_box(e.reasoning, img.size)
        if box is None:
            continue
        wins = rk.grid_windows([img])
        win = wins[window_for(box, img.size, wins)]
        rows.append((e, _edit_id(e), img, pixel_box(win.box, img.size)))
    if not rows:
        return []
    imgs = [img for _, _, img, _ in rows]
    texts = [e.question for e, _, _, _ in rows]
    boxes = [b for _, _, _, b in rows]
    vecs, _ = rk.key_vectors(imgs, texts, boxes)
    aug = [
        augment_image(img, np.random.default_rng(region_seed(eid, b))) for _, eid, img, b in rows
    ]
    avecs, _ = rk.key_vectors(aug, texts, boxes)
    radii = np.linalg.norm(vecs - avecs, axis=1)
    return [
        KeyRecord(
            edit_id=eid,
            kind="answer",
            value=answer_value(e.question, e.answer),
            key_text=e.question,
            image_sha256=e.image_sha256,
            box=(b[0], b[1], b[2], b[3]),
            vector=v,
            radius=float(r),
        )
        for (e, eid, _, b), v, r in zip(rows, vecs, radii)
    ]


def _edit_id(e: Any) -> str:
    """An `Edit`'s `id` or an `EditRecord`'s `edit_id`."""
    return str(getattr(e, "id", None) or getattr(e, "edit_id", "") or "")


# ------------------------------------------------------------------ reading
@dataclass
class ObjectIndex:
    """The object index version a main codebook version links: a snapshot and its link."""

    codebook: Codebook
    link: dict[str, Any]

    @property
    def w(self) -> float:
        return float(self.link["w"])

    @property
    def tau_x(self) -> float:
        return float(self.link.get("tau_x", OBJECT_TAU_X))

    @property
    def layer(self) -> str:
        return str(self.link["layer"])

    def gate(self) -> ScaledTau:
        return ScaledTau(self.codebook, self.tau_x)


def link_of(main: Codebook) -> dict[str, Any] | None:
    link = main.config.get("objects")
    return link if isinstance(link, dict) else None


def read_version(path: Path, version: int) -> dict:
    """`versions/v<version>.json` of the codebook at `path`, validated (self-checksum)."""
    from reasonedit_cli.store import MAX_MANIFEST_BYTES, read_codebook_file
    from reasonedit_cli.store.manifest import validate_manifest

    name = f"v{int(version):06d}.json"
    try:
        raw = read_codebook_file(path / "versions" / name, path, MAX_MANIFEST_BYTES)
    except OSError as e:
        raise CodebookError(f"object index {path}: versions/{name}: {e.strerror or e}") from None
    return validate_manifest(raw, path, f"object index {path}: versions/{name}")


def open_index(main: Codebook) -> tuple[ObjectIndex | None, str | None]:
    """The object index the main version links, and a problem when it cannot be used.

    (None, None): the codebook has none. (None, problem): it has one that is damaged,
    missing or marked for a rebuild; callers answer from the main index alone and say
    so (`doctor --repair` rebuilds it). Reads one manifest; segments load on first use,
    so a damaged segment surfaces as a CodebookError at the first search."""
    from reasonedit_cli.store import Codebook

    link = link_of(main)
    if link is None:
        return None, None
    if "version" not in link:
        return None, str(link.get("problem") or "the object index needs a rebuild")
    path = main.path / str(link.get("path", OBJECTS_DIR))
    try:
        if link.get("path") != OBJECTS_DIR:
            raise CodebookError(f"object index path {link.get('path')!r} is not {OBJECTS_DIR!r}")
        if path.is_symlink():  # never followed out of the codebook (hostile codebooks)
            raise CodebookError(f"object index {path} is a symlink; refused")
        m = read_version(path, int(link["version"]))
        if m.get("checksum") != link.get("checksum"):
            raise CodebookError(
                f"object index {path}: version {link['version']} is not the one "
                f"{main.path}/manifest.json links (checksum differs)"
            )
    except (CodebookError, KeyError, TypeError, ValueError) as e:
        return None, str(e)
    return ObjectIndex(Codebook(path, m), link), None


def lookup(
    index: ObjectIndex,
    rk: RegionEmbedder,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    k: int,
) -> list[Retrieval]:
    """The object index's retrieval per (image, question): every window of the image
    queried, the window whose nearest key is nearest among those under the gate wins."""
    if not questions:
        return []
    qv = rk.query_vectors(list(images), list(questions))[:, 1:]  # the windows only
    gate = index.gate()
    return [best_retrieval(gate, q, k=k) for q in qv]


def region_embedder(
    vlm: Any, text_encode: Callable[[Sequence[str]], np.ndarray], layer: str, w: float
) -> RegionEmbedder:
    return RegionEmbedder(vlm, layer, lambda t: np.asarray(text_encode(list(t))), w)


def combine(main: Retrieval, extra: Retrieval) -> Retrieval:
    """`regions.union_retrieval` of a query's two retrievals, with the object index's own
    retrieval kept in `objects` and the facts only it found in `object_facts`."""
    from dataclasses import replace

    from reasonedit_cli.regions import union_retrieval

    new = [] if extra.rejected else [f for f in extra.facts if f not in main.facts]
    return replace(union_retrieval(main, extra), objects=extra, object_facts=new)


# ------------------------------------------------------------------ writing
class ObjectIndexUnusable(CodebookError):
    """The object index cannot be brought to its linked version (damaged); what to do is
    the caller's: mark it for a rebuild, or rebuild it (`doctor --repair`)."""


def _open_nested(main: Codebook, lock_timeout: float) -> Codebook:
    """The object index's codebook at the version the main manifest links, for a writer
    holding the main lock: an object index ahead of its link (a writer died between the
    two commits) or never linked is first restored to the linked version (0: empty)."""
    from reasonedit_cli.store import Codebook

    link = link_of(main)
    if link is not None and "version" not in link:
        raise ObjectIndexUnusable(str(link.get("problem") or "the object index needs a rebuild"))
    path = main.path / OBJECTS_DIR
    try:
        if path.is_symlink():
            raise CodebookError("a symlink; refused")
        nested = Codebook.open(path, create=True)
        target = int(link["version"]) if link else 0
        want = link.get("checksum") if link else None
        if nested.version != target or (want and nested.manifest.get("checksum") != want):
            if link:
                read_version(path, target)  # verifies before it is restored
            with nested.writer(lock_timeout=lock_timeout) as w:
                w.restore(target)
        return nested
    except ObjectIndexUnusable:
        raise
    except (CodebookError, OSError, KeyError, TypeError, ValueError) as e:
        raise ObjectIndexUnusable(f"object index {path}: {e}") from None


def nested_config(
    editor_config: dict[str, Any],
    *,
    w: float,
    layer: str,
    main_version: int,
    tau_x: float = OBJECT_TAU_X,
) -> dict[str, Any]:
    """The object index's own config: the main codebook's model facts, its own w, layer,
    gate and tau rule, and the main version it was written for (for the record: the
    main manifest's link is what binds them)."""
    from reasonedit_cli.presets import DEFAULT

    keep = ("model", "model_revision", "model_family", "text_model", "top_k")
    return {
        **{k: editor_config[k] for k in keep if k in editor_config},
        **DEFAULT.to_config(),
        "tau_rule": OBJECT_TAU_RULE,
        "percentile": OBJECT_PERCENTILE,
        "layer": layer,
        "w": float(w),
        "tau_x": float(tau_x),
        "w_factor": OBJECT_W_FACTOR,
        "role": "objects",
        "main_version": int(main_version),
    }


def make_link(nested: Codebook) -> dict[str, Any]:
    cfg = nested.config
    return {
        "path": OBJECTS_DIR,
        "version": nested.version,
        "checksum": nested.manifest["checksum"],
        "w": cfg["w"],
        "tau_x": cfg.get("tau_x", OBJECT_TAU_X),
        "layer": cfg["layer"],
        "keys": nested.n_keys,
        "edits": len(nested.edit_ids()),
    }


def change(
    main: Codebook,
    main_writer: CodebookWriter,
    step: Callable[[CodebookWriter, Codebook], None],
    *,
    lock_timeout: float = 10.0,
    create: bool = False,
) -> dict[str, Any] | None:
    """Run `step(writer, nested)` on the object index (at its linked version) and stage
    the main manifest's new link on `main_writer`; the caller's next main commit is the
    commit point of both. Returns the new link (None: no object index and `create`
    false, nothing done). Raises ObjectIndexUnusable when the object index is damaged."""
    if link_of(main) is None and not create:
        return None
    nested = _open_nested(main, lock_timeout)
    try:
        with nested.writer(lock_timeout=lock_timeout) as w:
            step(w, nested)
    except CodebookError as e:
        raise ObjectIndexUnusable(f"object index {nested.path}: {e}") from None
    new = make_link(nested)
    main_writer.set_config(objects=new)
    return new


def mark_unusable(main_writer: CodebookWriter, problem: str) -> dict[str, Any]:
    """Stage a link that says the object index needs a rebuild: readers skip it, `doctor`
    reports it and `doctor --repair` rebuilds it."""
    link = {"path": OBJECTS_DIR, "problem": problem}
    main_writer.set_config(objects=link)
    return link


def edit_record_copy(rec: EditRecord) -> EditRecord:
    from dataclasses import replace

    return replace(rec, added=None)


def add_step(
    edit_records: Sequence[EditRecord],
    key_records: Sequence[KeyRecord],
    images: dict[str, tuple[bytes, str]],
    config: dict[str, Any],
    replaced: Sequence[str] = (),
) -> Callable[[CodebookWriter, Codebook], None]:
    """The object index's part of an add: drop replaced edits, store the images, set the
    config, add the edits that got an object key (and only those)."""

    def step(w: CodebookWriter, nested: Codebook) -> None:
        gone = set(replaced) & nested.edit_ids()
        if gone:
            w.remove_edits(sorted(gone))
        keyed = {k.edit_id for k in key_records}
        recs = [edit_record_copy(r) for r in edit_records if r.edit_id in keyed]
        for r in recs:
            data, ext = images[r.image_sha256]
            w.store_image(data, ext)
        w.set_config(**config)
        if key_records:
            w.set_config(dim=int(key_records[0].vector.shape[0]))
        if recs:
            w.add(recs, list(key_records))
        else:
            w.commit()

    return step


def remove_step(edit_ids: Sequence[str]) -> Callable[[CodebookWriter, Codebook], None]:
    def step(w: CodebookWriter, nested: Codebook) -> None:
        gone = set(edit_ids) & nested.edit_ids()
        if gone:
            w.remove_edits(sorted(gone))

    return step


# ------------------------------------------------------------------ checking
def check(main: Codebook) -> tuple[list[str], list[str]]:
    """(problems, notes) of the object index the main version links: the linked version
    verifies (manifest checksum, every segment, derived files), its edits are live main
    edits, and its head is where the link says (ahead: a writer died between the two
    commits; a note, the next writer restores it)."""
    from reasonedit_cli.store import Codebook

    problems: list[str] = []
    notes: list[str] = []
    link = link_of(main)
    path = main.path / OBJECTS_DIR
    if link is None:
        if (path / "manifest.json").exists():
            notes.append(
                f"{OBJECTS_DIR}/ is linked by no version of this manifest (an interrupted "
                "first write, or a restore to before it); ignored, the next add-edit resets it"
            )
        return problems, notes
    index, problem = open_index(main)
    if index is None:
        return [f"object index: {problem}"], notes
    try:
        report = index.codebook.check(repair=False)
        problems += [f"object index: {p}" for p in report.problems]
        extra = index.codebook.edit_ids() - main.edit_ids()
        if extra:
            problems.append(
                f"object index: holds {len(extra)} edit(s) the codebook does not: "
                + ", ".join(sorted(extra)[:3])
            )
    except CodebookError as e:
        problems.append(f"object index: {e}")
    with contextlib.suppress(CodebookError, OSError):
        head = Codebook.open(path)
        if head.version != int(link["version"]):
            notes.append(
                f"object index head is version {head.version}, the codebook links "
                f"{link['version']} (an interrupted write); the next writer restores it"
            )
    return problems, notes


def rebuild(path: Path, *, lock_timeout: float = 10.0, editor: Any = None) -> list[str]:
    """`doctor --repair`'s object-index step: a new object index from the codebook's live
    edits (those whose reasoning names a region) and stored images, embedded with the
    codebook's model at the old link's w and layer (else as on creation), committed and
    linked as a new main version. The old folder is moved to `damaged/`, not deleted.
    Returns the repaired lines."""
    import os

    from reasonedit_cli.editor import Editor
    from reasonedit_cli.edits import decode_image
    from reasonedit_cli.store import Codebook

    ed = editor or Editor(path, lock_timeout=lock_timeout)
    main = ed.require_codebook()
    link = link_of(main) or {}
    records = [r for r in main.edits() if names_a_region(r.reasoning)]
    layer = link.get("layer") or ed.object_layer()
    if layer is None:
        return ["object index: the key layer has no token grid; nothing rebuilt"]
    w = float(link["w"]) if link.get("w") else ed.object_w()
    rk = region_embedder(ed.vlm, ed.text.encode, layer, w)
    # sha -> (bytes, extension): what the object index stores beside its keys (`add_step`)
    images = {
        r.image_sha256: (
            main.read_image_bytes(r.image_sha256),
            main.image_path(r.image_sha256).suffix,
        )
        for r in records
    }
    imgs = [decode_image(images[r.image_sha256][0], "image") for r in records]
    keys = object_keys(rk, records, imgs)
    steps: list[str] = []
    with main.writer(lock_timeout=lock_timeout) as mw:
        old = main.path / OBJECTS_DIR
        if os.path.lexists(old):
            aside = main.path / "damaged" / f"{OBJECTS_DIR}.{_stamp()}"
            aside.parent.mkdir(exist_ok=True)
            os.replace(old, aside)
            steps.append(f"object index: moved the old one to damaged/{aside.name}")
        nested = Codebook.open(old, create=True)
        config = nested_config(
            ed.config_for_manifest(), w=w, layer=layer, main_version=main.version + 1
        )
        with nested.writer(lock_timeout=lock_timeout) as nw:
            add_step(records, keys, images, config)(nw, nested)
        mw.set_config(objects=make_link(nested))
        version = mw.commit()
    steps.append(
        f"object index: rebuilt {len(keys)} key(s) from {len(records)} edit(s) naming a "
        f"region (w {w:.4g}, layer {layer}); linked by version {version}"
    )
    return steps


def _stamp() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
