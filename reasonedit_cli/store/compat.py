"""Reading codebooks written by older versions of reasonedit: every old-format rule here.

Each entry names the change that made it necessary. Writers always write the current
format (format.py); these functions only let a reader see an older file as if it were
current, so the rest of the store never tests for an old layout itself.

- schema 1 keys segments (format_version 1, before keys held several values): no
  `merged` column; read as keys with nothing merged (`keys_schema_for`, `upgrade_keys`);
- derived base files from before the delta layout carry no `rows`: they cover every key
  (`base_rows`);
- codebooks from before `tau_rule` was configurable measured tau by "nearest"
  (`tau_rule`);
- codebooks from before the lifted graph have none: search scans the large sigmas
  instead and `doctor --repair` builds it (store/index).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .format import ENTRY_TYPE, MERGED_TYPE, SCHEMA_VERSION, keys_fields, segment_metadata
from .manifest import int_in

#: Parquet segment schema versions this reasonedit reads; "1": keys without `merged`.
READ_SCHEMA_VERSIONS = ("1", "2")
#: tau_rule of a codebook whose config names none (or one this version does not know).
LEGACY_TAU_RULE = "nearest"


def keys_schema_for(dim: int, version: str = SCHEMA_VERSION) -> pa.Schema:
    """Schema of keys segments of schema `version` (one of READ_SCHEMA_VERSIONS)."""
    fields = keys_fields(dim)
    if version == "1":
        fields = [f for f in fields if f.name != "merged"]
    return pa.schema(fields, metadata=segment_metadata("keys", version, dim))


def upgrade_keys(table: pa.Table, version: str) -> pa.Table:
    """A keys table of schema `version` in the current schema."""
    if version != "1":
        return table
    # A format-1 keys table (one value per key) in the current schema: nothing merged.
    n = table.num_rows
    empty = pa.ListArray.from_arrays(
        pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array([], ENTRY_TYPE), type=MERGED_TYPE
    )
    at = table.schema.get_field_index("value") + 1
    return table.add_column(at, pa.field("merged", MERGED_TYPE, nullable=False), empty)


def base_rows(entry: Any, n: int) -> int:
    """Rows a base derived file covers: its `rows`, or all n keys (files written before
    the delta layout have no `rows`)."""
    if not isinstance(entry, dict):
        raise ValueError("no base file")
    return int_in(entry.get("rows", n), 0, n)


def tau_rule(config: dict, known: tuple[str, ...]) -> str:
    """The codebook's tau_rule; codebooks made before it was configurable measured tau by
    "nearest"."""
    rule = config.get("tau_rule", LEGACY_TAU_RULE)
    return rule if rule in known else LEGACY_TAU_RULE
