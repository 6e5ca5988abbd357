"""Keys that hold several values (key merging, docs/method.md#merging) and removals of edits.

A merged key holds (value, edit_id) entries of several edits; removing one edit drops
just its entries, and the key goes only when none is left. The same operation serves the
reader (tombstones applied to segments) and the writer (an incremental removal), so the
two always agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from .format import MERGED_TYPE, KeyRecord


def compute() -> Any:
    """pyarrow.compute, imported only when tombstones filter rows (it is slow to import)."""
    import pyarrow.compute as pc

    return pc


def without_edits(table: pa.Table, ids: Iterable[str]) -> pa.Table:
    """An edits table without the rows of `ids`."""
    pc = compute()
    value_set = pa.array(sorted(set(ids)), pa.string())
    return table.filter(pc.invert(pc.is_in(table.column("edit_id"), value_set=value_set)))


def live_record(k: KeyRecord, live: set[str]) -> KeyRecord | None:
    """`k` without the entries of edits not in `live` (None when none is left)."""
    entries = [(v, e) for v, e in k.entries if e in live]
    if not entries:
        return None
    if len(entries) == len(k.merged) + 1:
        return k
    (value, edit_id), *rest = entries
    return dataclasses.replace(k, edit_id=edit_id, value=value, merged=rest)


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    if col.num_chunks == 1:
        return col.chunk(0)
    return pa.concat_arrays(col.chunks) if col.num_chunks else pa.array([], col.type)


def _mask(arr: Any) -> np.ndarray:
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=bool)


def drop_entries(table: pa.Table, hidden: Iterable[str]) -> tuple[pa.Table, np.ndarray]:
    """Remove the entries (values) of the `hidden` edits from a keys table.

    Returns the rows that still hold an entry and the keep mask over the input rows. A
    key merged from several edits thus survives the removal of one of them; when its own
    entry goes, its first remaining merged entry moves into `edit_id`/`value`, so a
    live key's first entry is always in those columns. Applying the tombstones of two
    removals one after the other gives the same table as applying both at once (the
    incremental `remove_edits` and the from-segments read agree).
    """
    n = table.num_rows
    ids = sorted(set(hidden))
    if not ids or n == 0:
        return table, np.ones(n, dtype=bool)
    pc = compute()
    value_set = pa.array(ids, pa.string())
    own_gone = _mask(pc.is_in(table.column("edit_id"), value_set=value_set))
    merged = _one_chunk(table.column("merged"))
    flat = merged.flatten()  # every merged entry, row by row (offsets applied)
    if len(flat) == 0:  # nothing merged anywhere: a plain row filter
        keep = ~own_gone
        return (table if keep.all() else table.filter(pa.array(keep))), keep
    parents = np.asarray(pc.list_parent_indices(merged).to_numpy(zero_copy_only=False))
    values, edit_ids = flat.flatten()  # the struct's fields, offsets applied
    stays = ~_mask(pc.is_in(edit_ids, value_set=value_set))
    left = np.bincount(parents[stays], minlength=n)
    keep = ~own_gone | (left > 0)
    if not own_gone.any() and stays.all():
        return table, keep
    promote = own_gone & (left > 0)
    if promote.any():
        pos = np.flatnonzero(stays)
        rows, first = np.unique(parents[pos], return_index=True)
        sel = promote[rows]
        take = pos[first[sel]]  # each promoted row's first remaining merged entry
        stays[take] = False
        mask = pa.array(promote)
        for name, src in (("edit_id", edit_ids), ("value", values)):
            col = pc.replace_with_mask(_one_chunk(table.column(name)), mask, src.take(take))
            at = table.schema.get_field_index(name)
            table = table.set_column(at, table.schema.field(at), col)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(parents[stays], minlength=n), out=offsets[1:])
    new = pa.ListArray.from_arrays(
        pa.array(offsets), flat.filter(pa.array(stays)), type=MERGED_TYPE
    )
    at = table.schema.get_field_index("merged")
    table = table.set_column(at, table.schema.field(at), new)
    return table.filter(pa.array(keep)), keep
