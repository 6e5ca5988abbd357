"""The on-disk codebook: records, files, the manifest, the lock, the reader, the writer.

`from reasonedit_cli.store import Codebook, CodebookWriter, KeyRecord, EditRecord` is the
import for library users. The format is documented byte for byte in
docs/codebook-format.md; in short, Parquet segments are the source of truth and never
rewritten, `manifest.json` is the single commit point (readers trust only what it lists
and verify every checksum first), everything in index/ is a rebuildable cache verified
before loading, one writer at a time holds `LOCK`, and nothing is pickled.

One concern per module (dependencies point down this list, never up):

- format.py: records, Parquet schemas, the record <-> table conversion;
- compat.py: reading older formats (schema 1, pre-delta files, tau_rule defaults);
- files.py: atomic writes, fsync, safe reads of hostile files, the file-operation hooks;
- manifest.py: manifest bytes, validation, lookups;
- lock.py: the writer lock;
- merged.py: keys holding several values, removals of edits;
- index/: the derived index (`DerivedIndex`): sigma, neighbour lists, graphs, deltas,
  the lifted graph;
- writer.py: `CodebookWriter`;
- reader.py: `Codebook`, the snapshot (it opens writers);
- staging.py: the staging folders of Ray jobs as `doctor` sees them;
- check.py: `doctor`'s verification; restore.py: a damaged manifest brought back.

Staging I/O of distributed jobs (creating a job's folder, staged segments) lives with the
Ray engine (reasonedit_cli/staging.py); segment repair, which re-embeds keys with the
codebook's models, in reasonedit_cli/repair.py.
"""

from .files import MAX_MANIFEST_BYTES, NotRegularFileError, file_operations, read_codebook_file
from .format import (
    EDITS_SCHEMA,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    LOCK,
    MANIFEST,
    SCHEMA_VERSION,
    AddResult,
    CheckReport,
    EditRecord,
    Entry,
    KeyRecord,
    edit_records,
    key_entries,
    key_id_for,
    key_record,
    key_records,
    keys_schema,
)
from .index import DerivedIndex
from .manifest import manifest_problem
from .reader import HNSW_MIN_KEYS, Codebook, history, read_segment
from .restore import restore_manifest
from .writer import CodebookWriter

__all__ = [
    "EDITS_SCHEMA",
    "FORMAT",
    "FORMAT_VERSION",
    "HNSW_MIN_KEYS",
    "KINDS",
    "LOCK",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "SCHEMA_VERSION",
    "AddResult",
    "CheckReport",
    "Codebook",
    "CodebookWriter",
    "DerivedIndex",
    "EditRecord",
    "Entry",
    "KeyRecord",
    "NotRegularFileError",
    "edit_records",
    "file_operations",
    "history",
    "key_entries",
    "key_id_for",
    "key_record",
    "key_records",
    "keys_schema",
    "manifest_problem",
    "read_codebook_file",
    "read_segment",
    "restore_manifest",
]
