"""What a codebook stores: records, the Parquet schemas, and the one conversion between them.

Everything that decides the bytes of a segment lives here: the names of the format, the
record classes (`KeyRecord`, `EditRecord`, ...), the Arrow schemas of keys and edits
segments, the record <-> table conversion in both directions (`keys_to_table`,
`key_records`, `edits_to_table`, `edit_records`) and the Parquet encoding
(`table_bytes`). Readers of older segment layouts go through compat.py first.
Byte-level documentation: docs/codebook-format.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import CodebookError

FORMAT = "reasonedit-codebook"
# bump when old readers could misread new codebooks; 2: keys hold several values (`merged`)
FORMAT_VERSION = 2
SCHEMA_VERSION = "2"  # Parquet segment schema version written, stored in file metadata
MANIFEST = "manifest.json"
LOCK = "LOCK"
DAMAGED = "damaged"  # where repair moves a damaged manifest.json (it never deletes one)
KINDS = ("answer", "sentence", "patch")
SHA_RE = re.compile(r"[0-9a-f]{64}")
EXT_RE = re.compile(r"[a-z0-9]{1,8}")


# ---------------------------------------------------------------------------
# records


#: One value a key holds and the edit it came from: (value, edit_id).
Entry = tuple[str, str]


@dataclass
class KeyRecord:
    """One key: an (image, text) embedding and the facts it retrieves.

    `edit_id`/`value` are the key's first entry (the edit whose image and text the vector
    embeds); `merged` lists the (value, edit_id) entries it gained by key merging
    (docs/method.md#merging), so removing one of those edits drops just its value.
    """

    edit_id: str
    kind: str  # "answer" | "sentence" | "patch"
    value: str  # the fact prepended at inference
    key_text: str  # the text half of the key
    image_sha256: str
    box: tuple[int, int, int, int] | None  # crop in original image pixels; None = whole
    vector: np.ndarray
    radius: float | None = None
    merged: list[Entry] = field(default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        """Every (value, edit_id) the key holds, its own first."""
        return [(self.value, self.edit_id), *self.merged]

    @property
    def key_id(self) -> str:
        """Stable id: re-adding the same edit yields the same key ids."""
        return key_id_for(
            self.edit_id, self.kind, self.value, self.key_text, self.box, self.image_sha256
        )


@dataclass
class EditRecord:
    """One user edit as stored (the image itself lives in images/, by hash)."""

    edit_id: str
    image_sha256: str
    question: str
    answer: str
    reasoning: list[str]
    boxes: list[list[int] | None] | None
    source: str
    added: dt.datetime | None = None  # set by the writer


@dataclass
class AddResult:
    """What one `CodebookWriter.add` call stored."""

    version: int
    added_edits: list[str] = field(default_factory=list)
    skipped_edits: list[str] = field(default_factory=list)  # already present
    added_keys: int = 0
    skipped_keys: int = 0


@dataclass
class CheckReport:
    """Result of `Codebook.check`: one line per problem, and what repair rebuilt."""

    path: Path
    version: int
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def key_id_for(
    edit_id: str,
    kind: str,
    value: str,
    key_text: str,
    box: Sequence[int] | None,
    image_sha256: str,
) -> str:
    """sha256 hex of the canonical JSON array [edit_id, kind, value, key_text, box, image]."""
    payload = [
        edit_id,
        kind,
        value,
        key_text,
        list(map(int, box)) if box is not None else None,
        image_sha256,
    ]
    return hashlib.sha256(canonical(payload)).hexdigest()


def key_entries(row: dict[str, Any]) -> list[Entry]:
    """The (value, edit_id) entries of one `keys_table().to_pylist()` row, own first."""
    return [(row["value"], row["edit_id"])] + [
        (m["value"], m["edit_id"]) for m in row.get("merged") or []
    ]


# ---------------------------------------------------------------------------
# small encodings shared by the manifest, the lock and the segments


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, UTF-8): what checksums are taken of."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_iso(timespec: str = "microseconds") -> str:
    """The current UTC time as ISO 8601 (manifest `created`/`updated`, lock `started`)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


# ---------------------------------------------------------------------------
# Parquet schemas


#: A key's merged entries: list<struct<value, edit_id>> (empty for an unmerged key).
ENTRY_TYPE = pa.struct(
    [
        pa.field("value", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
    ]
)
MERGED_TYPE = pa.list_(pa.field("item", ENTRY_TYPE, nullable=False))


def keys_fields(dim: int) -> list[pa.Field]:
    """The columns of a keys segment of the current schema; the vector width is fixed per
    codebook (config["dim"])."""
    return [
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("value", pa.string(), nullable=False),
        pa.field("merged", MERGED_TYPE, nullable=False),
        pa.field("key_text", pa.string(), nullable=False),
        pa.field("box", pa.list_(pa.int32())),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("radius", pa.float32()),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
    ]


def segment_metadata(kind: str, version: str, dim: int | None = None) -> dict[bytes, bytes]:
    """The Parquet file metadata that names a segment's kind and schema version."""
    meta = {b"reasonedit.segment": kind.encode(), b"reasonedit.schema_version": version.encode()}
    if dim is not None:
        meta[b"reasonedit.dim"] = str(dim).encode()
    return meta


def keys_schema(dim: int) -> pa.Schema:
    """Schema of keys segments written now (older versions: compat.keys_schema_for)."""
    return pa.schema(keys_fields(dim), metadata=segment_metadata("keys", SCHEMA_VERSION, dim))


EDITS_SCHEMA = pa.schema(
    [
        pa.field("edit_id", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("reasoning", pa.list_(pa.string())),
        pa.field("boxes", pa.list_(pa.list_(pa.int32()))),
        pa.field("source", pa.string()),
        pa.field("added", pa.timestamp("us", tz="UTC")),
    ],
    metadata=segment_metadata("edits", SCHEMA_VERSION),
)


# ---------------------------------------------------------------------------
# records <-> tables (the only place either direction is written)


def edits_to_table(edits: Sequence[EditRecord], now: dt.datetime) -> pa.Table:
    """An edits table of `edits`; those without `added` are stamped `now`."""
    for e in edits:
        if not SHA_RE.fullmatch(e.image_sha256 or ""):
            raise CodebookError(f"edit {e.edit_id!r}: invalid image hash {e.image_sha256!r}")
    return pa.Table.from_pydict(
        {
            "edit_id": [e.edit_id for e in edits],
            "image_sha256": [e.image_sha256 for e in edits],
            "question": [e.question for e in edits],
            "answer": [e.answer for e in edits],
            "reasoning": [list(e.reasoning) for e in edits],
            "boxes": [
                None
                if e.boxes is None
                else [None if b is None else [int(x) for x in b] for b in e.boxes]
                for e in edits
            ],
            "source": [e.source for e in edits],
            "added": [e.added or now for e in edits],
        },
        schema=EDITS_SCHEMA,
    )


def edit_records(table: pa.Table, *, stamped: bool = True) -> list[EditRecord]:
    """The records of an edits table, in row order; stamped=False leaves `added` unset
    (staged edits: the commit stamps them)."""
    return [
        EditRecord(
            edit_id=r["edit_id"],
            image_sha256=r["image_sha256"],
            question=r["question"],
            answer=r["answer"],
            reasoning=list(r["reasoning"] or []),
            boxes=r["boxes"],
            source=r["source"] or "",
            added=r["added"] if stamped else None,
        )
        for r in table.to_pylist()
    ]


def keys_to_table(items: Sequence[tuple[str, KeyRecord]], dim: int) -> pa.Table:
    """A keys table of (key_id, record) items with `dim`-wide vectors."""
    for _, k in items:
        if k.kind not in KINDS:
            raise CodebookError(f"key of edit {k.edit_id!r}: kind {k.kind!r} not in {KINDS}")
        if k.box is not None and len(k.box) != 4:
            raise CodebookError(f"key of edit {k.edit_id!r}: box must have 4 numbers")
    vecs = (
        np.stack([np.asarray(k.vector, dtype=np.float32).reshape(-1) for _, k in items])
        if items
        else np.zeros((0, dim), dtype=np.float32)
    )
    schema = keys_schema(dim)
    cols = {
        "key_id": pa.array([kid for kid, _ in items], pa.string()),
        "edit_id": pa.array([k.edit_id for _, k in items], pa.string()),
        "kind": pa.array([k.kind for _, k in items], pa.string()),
        "value": pa.array([k.value for _, k in items], pa.string()),
        "merged": pa.array(
            [[{"value": v, "edit_id": e} for v, e in k.merged] for _, k in items], MERGED_TYPE
        ),
        "key_text": pa.array([k.key_text for _, k in items], pa.string()),
        "box": pa.array(
            [None if k.box is None else [int(x) for x in k.box] for _, k in items],
            pa.list_(pa.int32()),
        ),
        "image_sha256": pa.array([k.image_sha256 for _, k in items], pa.string()),
        "radius": pa.array(
            [None if k.radius is None else float(k.radius) for _, k in items], pa.float32()
        ),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), dim),
    }
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def key_record(row: dict[str, Any], vector: np.ndarray) -> KeyRecord:
    """The record of one keys row (a `to_pylist()` dict, the vector column not needed)."""
    return KeyRecord(
        edit_id=row["edit_id"],
        kind=row["kind"],
        value=row["value"],
        key_text=row["key_text"],
        image_sha256=row["image_sha256"],
        box=cast("tuple[int, int, int, int]", tuple(row["box"])) if row["box"] else None,
        vector=vector,
        radius=row.get("radius"),
        merged=key_entries(row)[1:],
    )


def key_records(rows: Sequence[dict[str, Any]], vectors: np.ndarray) -> list[KeyRecord]:
    """The records of keys rows and their vectors (row i gets vectors[i])."""
    return [key_record(r, vectors[i]) for i, r in enumerate(rows)]


def vectors_of(table: pa.Table, dim: int) -> np.ndarray:
    """float32 (n, dim) vectors of a keys table, in row order."""
    col = table.column("vector")
    if table.num_rows == 0:
        return np.zeros((0, dim), dtype=np.float32)
    arr = pa.concat_arrays(col.chunks) if col.num_chunks != 1 else col.chunk(0)
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, dim
    )


# ---------------------------------------------------------------------------
# Parquet encoding


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes of a segment, as every writer of segments encodes them."""
    # zstd everywhere except the key vectors: float embeddings barely compress (+8% size
    # uncompressed) and decompressing them was two thirds of the time to open a codebook
    # (Parquet wants leaf column paths: a nested column's name alone is silently ignored)
    comp = {path: "zstd" for f in table.schema if f.name != "vector" for path in _leaf_paths(f)}
    # and no dictionary or min/max statistics for them either: a dictionary of floats
    # is tried, then abandoned, and no reader filters on a vector's components; both
    # were 0.26 of 0.74 s writing the segment of 5,000 keys at 4,480 dims
    plain = [path for f in table.schema if f.name != "vector" for path in _leaf_paths(f)]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression=comp,
        row_group_size=max(1, table.num_rows),
        use_dictionary=plain,
        write_statistics=plain,
    )
    return sink.getvalue().to_pybytes()


def _leaf_paths(f: pa.Field, prefix: str = "") -> list[str]:
    """Parquet leaf column paths of an Arrow field (lists as `.list.element`)."""
    name = prefix + f.name
    if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type):
        return _leaf_paths(pa.field("element", f.type.value_type), name + ".list.")
    if pa.types.is_struct(f.type):
        children = [f.type.field(i) for i in range(f.type.num_fields)]
        return [p for c in children for p in _leaf_paths(c, name + ".")]
    return [name]
