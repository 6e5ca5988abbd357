"""Per-key tau measurements kept at write time (issue 22), so that tau for another
percentile (`ask --percentile`, `Codebook.tau_for`) costs one small file, not a pass
over every neighbour list.

The rules "images", "edits" and "nearest" (retrieval.py) each take one raw distance per
key from its neighbour list: to the first key on another image, to the first key of
another edit, to the nearest key. They change only where a list changes, and tau is a
percentile of them over sigma. At a million keys recomputing them from the lists took
14.6 s and 1.5 GB (the lists' 480 MB, every image id decoded and sorted as Python
strings); the writer, which holds the lists anyway, stores them here as one derived
file, `files.tau_other` in the manifest: float64 (n, 3), NaN where a key has no
measurement, plus the counts of distinct images and edits among the keys (the
percentile floors). Like every derived file it is a cache: verified by sha256 when
read, and a reader that finds it missing or damaged measures from the lists instead.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import retrieval as R
from ..errors import CodebookError
from .files import atomic_write, read_regular
from .format import sha256_hex

COLUMNS = ("other_image", "other_edit", "nearest")
RULES = ("images", "edits", "nearest")  # the rules this cache serves


@dataclass
class TauCache:
    """The per-key distances and the counts the percentile floors need."""

    other: np.ndarray  # (n, 3) float64: COLUMNS, NaN without a measurement
    n_images: int  # distinct images among the keys
    n_key_edits: int  # distinct edits among the keys (rule "images"' fallback)

    def threshold(self, sigma: np.ndarray, rule: str, p: float, n_edits: int) -> float | None:
        """tau by `rule` at percentile p, the same number as retrieval's rule over the
        lists (n_edits: the codebook's live edits, the floor of "edits" / "nearest")."""
        if len(self.other) < 2:
            return None
        if rule == "nearest":
            nn = self.other[:, 2] / np.asarray(sigma, dtype=np.float64)
            nn = nn[np.isfinite(nn)]
            if len(nn) == 0:
                return None
            return float(np.percentile(nn, R.effective_percentile(p, n_edits)))
        if rule == "edits":
            return R.halfway_threshold(self.other[:, 1], sigma, p, n_edits)
        if rule != "images":
            raise ValueError(f"tau cache does not serve rule {rule!r}")
        tau = R.halfway_threshold(self.other[:, 0], sigma, p, self.n_images)
        if tau is not None:
            return tau
        return R.halfway_threshold(self.other[:, 1], sigma, p, self.n_key_edits)


def codes(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """(an integer code per row, the number of distinct values) of a string column:
    Arrow's hash, not a sort of Python strings (1M image ids: ~0.1 s, not seconds)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    enc = arr.dictionary_encode()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(enc.dictionary)


def compute(
    knn_idx: np.ndarray,
    knn_dist: np.ndarray,
    image_column: pa.ChunkedArray | pa.Array,
    edit_column: pa.ChunkedArray | pa.Array,
) -> TauCache:
    """The cache of these lists and the keys' image / edit ids (row order)."""
    images, n_images = codes(image_column)
    edits, n_edits = codes(edit_column)
    n = len(knn_idx)
    other = np.full((n, len(COLUMNS)), np.nan)
    if n:
        other[:, 0] = R.nearest_other_distances(knn_idx, knn_dist, images)
        other[:, 1] = R.nearest_other_distances(knn_idx, knn_dist, edits)
        other[:, 2] = np.asarray(knn_dist, dtype=np.float64)[:, 0]
    return TauCache(other, n_images, n_edits)


def updated(
    old: TauCache,
    knn_idx: np.ndarray,
    knn_dist: np.ndarray,
    rows: np.ndarray,
    image_column: pa.ChunkedArray | pa.Array,
    edit_column: pa.ChunkedArray | pa.Array,
) -> TauCache:
    """The cache after an insert: `old` (of the first rows) with the rows whose list
    changed and the appended rows (`rows`) measured again; the same numbers as
    `compute` on the new lists, at the cost of the changed rows (the codes are Arrow's
    hash of every id: ~0.1 s at a million keys)."""
    images, n_images = codes(image_column)
    edits, n_edits = codes(edit_column)
    n = len(knn_idx)
    other = np.full((n, len(COLUMNS)), np.nan)
    other[: len(old.other)] = old.other
    rows = np.asarray(rows, dtype=np.int64)
    li, ld = knn_idx[rows], knn_dist[rows]
    other[rows, 0] = R.nearest_other_distances(li, ld, images, own=images[rows])
    other[rows, 1] = R.nearest_other_distances(li, ld, edits, own=edits[rows])
    other[rows, 2] = np.asarray(ld, dtype=np.float64)[:, 0] if len(rows) else 0.0
    return TauCache(other, n_images, n_edits)


def write(root: Path, rel: str, cache: TauCache) -> dict:
    """Write the cache atomically as `rel`; returns its manifest entry."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(cache.other, dtype=np.float64), allow_pickle=False)
    data = buf.getvalue()
    atomic_write(root / rel, data)
    return {
        "path": rel,
        "sha256": sha256_hex(data),
        "bytes": len(data),
        "rows": len(cache.other),
        "images": int(cache.n_images),
        "key_edits": int(cache.n_key_edits),
    }


def load(root: Path, entry: Any, n: int) -> TauCache | None:
    """The cache a manifest lists for n keys, verified (sha256, dtype, shape, counts);
    None when there is none or it is damaged (then tau is measured from the lists)."""
    if not isinstance(entry, dict):
        return None
    try:
        if int(entry["rows"]) != n:
            return None
        data = read_regular(root / entry["path"], root)
        if sha256_hex(data) != entry["sha256"]:
            return None
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        n_images, n_key_edits = int(entry["images"]), int(entry["key_edits"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, CodebookError):
        return None
    if arr.dtype != np.float64 or arr.shape != (n, len(COLUMNS)):
        return None
    if not (0 <= n_images <= n and 0 <= n_key_edits <= n):
        return None
    return TauCache(arr, n_images, n_key_edits)


def verify(root: Path, entry: Any, n: int) -> list[str]:
    """What `doctor` says about a listed cache ([] when it is fine or not listed)."""
    if entry is None:
        return []
    if load(root, entry, n) is None:
        path = entry.get("path", "tau_other") if isinstance(entry, dict) else "tau_other"
        return [f"{path} is missing or damaged"]
    return []
