"""The writer: `CodebookWriter` changes a codebook while holding its lock.

Each change writes new segments (never rewriting one), the derived data of the new
version (store/index/update.py) and then the manifest: replacing `manifest.json` is the
commit. The writer then hands the caller's `Codebook` the new version's tables and
`DerivedIndex` (`Codebook.adopt`) instead of letting it read them back. A failed change
leaves the previous version as it was and removes what it wrote.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import stat
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pyarrow as pa

from ..errors import CodebookError
from . import taucache as TC
from .engine import Engine, derive_engine, engine_section, store_layout
from .files import MAX_MANIFEST_BYTES, atomic_write, read_regular, tmp_files, unlink
from .format import (
    EXT_RE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    AddResult,
    EditRecord,
    KeyRecord,
    canonical,
    edits_to_table,
    keys_to_table,
    now_iso,
    sha256_hex,
    table_bytes,
    vectors_of,
)
from .index import DerivedIndex, IndexUpdate
from .index.neighbours import Lists
from .lock import WriterLock
from .manifest import derived_paths, manifest_bytes
from .merged import drop_entries, live_record, without_edits

if TYPE_CHECKING:
    from .reader import Codebook


@contextlib.contextmanager
def open_writer(cb: Codebook, lock_timeout: float = 10.0) -> Iterator[CodebookWriter]:
    """Take the writer lock (waiting up to lock_timeout s) and yield a writer
    (`Codebook.writer`).

    On entry the newest manifest is reloaded and leftovers of crashed writers are
    removed; on exit pending config changes are committed and the lock released.
    """
    with WriterLock(cb.path, lock_timeout):
        cb.refresh()
        w = CodebookWriter(cb)
        w._cleanup()
        try:
            yield w
            if w._pending_config:
                w.commit()
        except BaseException:
            # a failed change (disk full, read-only, interrupted) leaves the previous
            # version as it was: remove what it wrote before the error
            with contextlib.suppress(CodebookError, OSError):
                cb.refresh()
                w._cleanup()
            raise


class CodebookWriter:
    """Changes a codebook while holding its lock; each change commits one new version."""

    def __init__(self, codebook: Codebook):
        self.cb = codebook
        self._pending_config: dict = {}

    @property
    def path(self) -> Path:
        return self.cb.path

    # -- housekeeping -----------------------------------------------------

    def _cleanup(self) -> None:
        """Delete leftovers of crashed writers: temp files, unreferenced newer segments."""
        for p in tmp_files(self.path):
            with contextlib.suppress(OSError):
                unlink(p)
        cur = self.cb.version
        referenced = {s["path"] for s in self.cb.manifest["segments"]}
        for v in (self.path / "versions").glob("v*.json"):
            try:
                num = int(v.stem[1:])
            except ValueError:
                continue
            if num > cur:  # written by a writer that died before replacing the manifest
                with contextlib.suppress(OSError):
                    unlink(v)
                continue
            try:
                raw = read_regular(v, self.path, MAX_MANIFEST_BYTES)
                referenced |= {s["path"] for s in json.loads(raw)["segments"]}
            except (OSError, ValueError, KeyError, TypeError):
                continue
        try:
            mtime = (self.path / MANIFEST).stat().st_mtime
        except OSError:
            return
        for seg in (self.path / "segments").glob("*.parquet"):
            rel = f"segments/{seg.name}"
            try:
                if rel not in referenced and seg.lstat().st_mtime >= mtime:
                    unlink(seg)
            except OSError:
                pass
        # derived files newer than the manifest that it does not list: written by a
        # writer that failed or died before its commit (readers never look at them)
        listed = derived_paths(self.cb.manifest)
        for f in (self.path / "index").glob("*"):
            try:
                if f"index/{f.name}" not in listed and f.lstat().st_mtime > mtime:
                    if stat.S_ISREG(f.lstat().st_mode):
                        unlink(f)
            except OSError:
                pass

    # -- images -----------------------------------------------------------

    def store_image(self, data: bytes, ext: str) -> str:
        """Store image bytes content-addressed; returns their sha256 (idempotent)."""
        ext = ext.lower().lstrip(".")
        if not EXT_RE.fullmatch(ext):
            raise CodebookError(f"codebook {self.path}: bad image extension {ext!r}")
        sha = sha256_hex(data)
        d = self.path / "images" / sha[:2]
        for existing in d.glob(sha + ".*") if d.is_dir() else []:
            if ".tmp-" in existing.name:
                continue
            try:
                if sha256_hex(read_regular(existing, self.path)) == sha:
                    return sha
            except OSError:
                pass
        try:
            atomic_write(d / f"{sha}.{ext}", data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot store image: {e.strerror or e}"
            ) from e
        return sha

    # -- changes ----------------------------------------------------------

    def set_config(self, **changes: Any) -> None:
        """Stage config changes; committed with the next change or when the writer closes."""
        canonical(changes)  # must be plain JSON
        self._pending_config.update(changes)

    def add(self, edits: Sequence[EditRecord], keys: Sequence[KeyRecord]) -> AddResult:
        """Append new edits and their keys as one version; edits already present are skipped.

        Keys must belong to edits of this call; keys of skipped edits are skipped too.
        """
        cb = self.cb
        present = cb.edit_ids()
        res = AddResult(version=cb.version)
        new_edits: dict[str, EditRecord] = {}
        for e in edits:
            if e.edit_id in present or e.edit_id in new_edits:
                res.skipped_edits.append(e.edit_id)
            else:
                new_edits[e.edit_id] = e
        new_keys: dict[str, KeyRecord] = {}
        skipped = set(res.skipped_edits)
        for k in keys:
            if k.edit_id not in new_edits:
                if k.edit_id in present or k.edit_id in skipped:
                    res.skipped_keys += 1
                    continue
                raise CodebookError(f"key for edit {k.edit_id!r} has no edit record")
            kid = k.key_id
            if kid in new_keys:
                res.skipped_keys += 1
            else:
                new_keys[kid] = k
        if not new_edits:
            if self._pending_config:
                res.version = self.commit()
            return res
        dim = self._check_dim([k.vector for k in new_keys.values()])
        now = dt.datetime.now(dt.timezone.utc)
        version = cb.version + 1
        segs = list(cb.manifest["segments"])
        edits_table = edits_to_table(list(new_edits.values()), now)
        segs.append(self._write_segment("edits", edits_table, version))
        keys_table = keys_to_table(list(new_keys.items()), dim)
        if keys_table.num_rows:
            segs.append(self._write_segment("keys", keys_table, version))
        # The live tables after this commit, so the derived data updates incrementally.
        kt = keys_table.replace_schema_metadata(None)
        live_edits = pa.concat_tables(
            [cb.edits_table(), edits_table.replace_schema_metadata(None)]
        ).combine_chunks()
        n_old = cb.n_keys
        if engine_section(cb.manifest) is not None and cb.keys_if_loaded() is None:
            # the engine holds the old keys (store/engine.py): read none of them, only
            # the new rows (a million 4,480-wide keys are 18 GB of Parquet to decode)
            state: tuple = ("append", None, live_edits, (n_old, kt), n_old + kt.num_rows)
        else:
            old_keys = cb.keys_table()
            # chunked, not combined: copying every old key per insert is O(codebook)
            live_keys = pa.concat_tables([old_keys, kt]) if old_keys.num_rows else kt
            state = ("append", live_keys, live_edits)
        res.version = self._commit(segs, cb.manifest["removed_edits"], state=state)
        res.added_edits = list(new_edits)
        res.added_keys = len(new_keys)
        return res

    def replace_edits(self, edits: Sequence[EditRecord], keys: Sequence[KeyRecord]) -> AddResult:
        """Replace live edits by new records under the same ids, as ONE new version.

        The old edits are tombstoned up to the current version (which hides every segment
        written so far, so their keys and the values merged keys hold for them go) and the
        new records land in a segment of the new version, which the tombstone does not
        hide. Ids not yet stored are simply added. `restore` of the previous version
        brings the old edits back.
        """
        cb = self.cb
        ids = {e.edit_id for e in edits}
        if len(ids) != len(edits):
            raise CodebookError("replace_edits needs each edit id once")
        old = ids & cb.edit_ids()
        for k in keys:
            if k.edit_id not in ids:
                raise CodebookError(f"key for edit {k.edit_id!r} has no edit record")
        new_keys: dict[str, KeyRecord] = {}
        for k in keys:
            new_keys.setdefault(k.key_id, k)
        dim = self._check_dim([k.vector for k in new_keys.values()])
        version = cb.version + 1
        tomb = [t for t in cb.manifest["removed_edits"] if t["edit_id"] not in old]
        tomb += [{"edit_id": e, "version": cb.version} for e in sorted(old)]
        segs = list(cb.manifest["segments"])
        now = dt.datetime.now(dt.timezone.utc)
        segs.append(self._write_segment("edits", edits_to_table(list(edits), now), version))
        keys_table = keys_to_table(list(new_keys.items()), dim)
        if keys_table.num_rows:
            segs.append(self._write_segment("keys", keys_table, version))
        res = AddResult(version=cb.version)
        res.version = self._commit(segs, tomb, state=None)  # rows renumber: derive afresh
        res.added_edits = [e.edit_id for e in edits]
        res.added_keys = len(new_keys)
        return res

    def remove_edits(self, edit_ids: Iterable[str]) -> int:
        """Tombstone edits (their values stop being retrieved); returns the new version.

        A key merged from several edits loses only the removed edits' values and goes
        only when none is left.
        """
        cb = self.cb
        ids = set(edit_ids) & cb.edit_ids()
        if not ids:
            return self.commit()
        version = cb.version + 1
        tomb = [t for t in cb.manifest["removed_edits"] if t["edit_id"] not in ids]
        tomb += [{"edit_id": e, "version": version} for e in sorted(ids)]
        keys, keep = drop_entries(cb.keys_table(), ids)
        edits = without_edits(cb.edits_table(), ids)
        state = ("remove", keys.combine_chunks(), edits, keep)
        return self._commit(cb.manifest["segments"], tomb, state=state)

    def replace_all_keys(self, keys: Sequence[KeyRecord]) -> int:
        """Recalibration: one new keys segment replaces all key segments (new dim allowed).

        Old segments stay on disk for older versions; keys of edits that are not live
        are dropped. Config changes staged with set_config (layer, w, dim) land in the
        same version.
        """
        cb = self.cb
        live = cb.edit_ids()
        recs: dict[str, KeyRecord] = {}
        for k in keys:
            rec = live_record(k, live)
            if rec is not None:
                recs.setdefault(rec.key_id, rec)
        dim = self._check_dim([k.vector for k in recs.values()], replacing=True)
        version = cb.version + 1
        segs = [s for s in cb.manifest["segments"] if s["kind"] != "keys"]
        table = keys_to_table(list(recs.items()), dim)
        if table.num_rows:
            segs.append(self._write_segment("keys", table, version))
        return self._commit(
            segs, cb.manifest["removed_edits"], state=("full", table, cb.edits_table())
        )

    def rewrite_keys(self, items: Sequence[tuple[str, KeyRecord]], keep: np.ndarray) -> int:
        """Key merging (docs/method.md#merging): the live keys where `keep` is True,
        rewritten as one new keys segment with new radii and merged values; returns the new version.

        `items` are (key_id, record) for the kept rows in order, with their vectors
        unchanged: then the derived data updates like a removal of the dropped rows
        (only neighbour lists that held one are recomputed) instead of from scratch.
        """
        cb = self.cb
        keep = np.asarray(keep, dtype=bool)
        if len(keep) != cb.n_keys or int(keep.sum()) != len(items):
            raise CodebookError(
                f"codebook {self.path}: rewrite_keys needs one record per kept row "
                f"({int(keep.sum())} of {cb.n_keys}), got {len(items)}"
            )
        live = cb.edit_ids()
        for _, k in items:
            gone = sorted({e for _, e in k.entries} - live)
            if gone:
                raise CodebookError(f"key {k.key_id[:12]} holds values of missing edits {gone}")
        dim = cb.dim or 1
        table = keys_to_table(list(items), dim)
        if not np.array_equal(vectors_of(table, dim), cb.vectors()[keep]):
            raise CodebookError(f"codebook {self.path}: rewrite_keys must keep the key vectors")
        segs = [s for s in cb.manifest["segments"] if s["kind"] != "keys"]
        if table.num_rows:
            segs.append(self._write_segment("keys", table, cb.version + 1))
        state = ("remove", table.replace_schema_metadata(None), cb.edits_table(), keep)
        return self._commit(segs, cb.manifest["removed_edits"], state=state)

    def restore(self, version: int) -> int:
        """Commit a new version whose content (segments, removals, config) equals `version`."""
        f = self.path / "versions" / f"v{version:06d}.json"
        if not f.exists():
            raise CodebookError(
                f"codebook {self.path} has no version {version} "
                "(`reasonedit history` lists the kept versions)"
            )
        try:
            old = json.loads(read_regular(f, self.path, MAX_MANIFEST_BYTES))
            body = {k: v for k, v in old.items() if k != "checksum"}
            ok = old.get("checksum") == "sha256:" + sha256_hex(canonical(body))
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise CodebookError(f"codebook {self.path}: versions/{f.name} is damaged")
        self._pending_config = {}
        return self._commit(
            old["segments"], old["removed_edits"], state=None, config=dict(old["config"])
        )

    def compact(self) -> int:
        """Fold every delta of the derived index into new base files, as a new version.

        Inserts append deltas (store/index/deltas.py) and compact on their own once the deltas
        outgrow the base; this does it now, and rebuilds any damaged derived file
        (`doctor --repair`). Returns the new version.
        """
        cb = self.cb
        return self._commit(
            cb.manifest["segments"], cb.manifest["removed_edits"], state=("compact",)
        )

    def rebuild_segments(
        self, replacements: Sequence[tuple[dict, Sequence[EditRecord] | Sequence[KeyRecord]]]
    ) -> int:
        """Replace damaged segments, in place in the segment list, by new ones holding
        `records` (rebuilt by reasonedit_cli/repair.py), as one new version.

        An empty record list drops the segment from the new version. The damaged files
        stay on disk (older versions list them); derived data is rebuilt from scratch.
        """
        cb = self.cb
        version = cb.version + 1
        new: dict[str, dict | None] = {}
        for entry, records in replacements:
            if not records:
                new[entry["path"]] = None
            elif entry["kind"] == "edits":
                edits = cast("list[EditRecord]", list(records))
                table = edits_to_table(edits, dt.datetime.now(dt.timezone.utc))
                new[entry["path"]] = self._write_segment("edits", table, version)
            else:
                keys = cast("list[KeyRecord]", list(records))
                # replacing=True: the damaged keys cannot be counted, the width is config's
                dim = self._check_dim([k.vector for k in keys], replacing=True)
                if cb.dim is not None and dim != cb.dim:
                    raise CodebookError(
                        f"codebook {self.path}: rebuilt keys are {dim}-d, config says {cb.dim}"
                    )
                table = keys_to_table([(k.key_id, k) for k in keys], dim)
                new[entry["path"]] = self._write_segment("keys", table, version)
        segs = []
        for s in cb.manifest["segments"]:
            if s["path"] not in new:
                segs.append(s)
            elif new[s["path"]] is not None:
                segs.append(new[s["path"]])
        return self._commit(segs, cb.manifest["removed_edits"], state=None)

    def commit(self) -> int:
        """Commit staged config changes (if any); returns the current version."""
        if not self._pending_config:
            return self.cb.version
        cb = self.cb
        return self._commit(cb.manifest["segments"], cb.manifest["removed_edits"], state=("same",))

    # -- internals --------------------------------------------------------

    def _check_dim(self, vectors: list[np.ndarray], replacing: bool = False) -> int:
        """Validate key vectors; the dimension is fixed per codebook (config["dim"]).

        The first keys set it; `replace_all_keys` (recalibration) may change it.
        """
        for v in vectors:
            a = np.asarray(v)
            if a.ndim != 1:
                raise CodebookError(f"key vectors must be 1-D, got shape {a.shape}")
            if not np.isfinite(a).all():
                raise CodebookError("key vector contains NaN or infinity")
        dims = {int(np.asarray(v).size) for v in vectors}
        if len(dims) > 1:
            raise CodebookError(f"key vectors have different dimensions {sorted(dims)}")
        pending = self._pending_config.get("dim")
        if replacing or self.cb.n_keys == 0:
            want = pending  # recalibration or an empty codebook may change the dimension
        else:
            want = self.cb.dim
            if pending is not None and int(pending) != want:
                raise CodebookError(
                    f"codebook {self.path} holds {want}-d keys; cannot set "
                    f"dim={pending} without re-embedding every key"
                )
        if not dims:
            return int(want or self.cb.dim or 1)
        (dim,) = dims
        if want is not None and int(want) != dim:
            raise CodebookError(
                f"codebook {self.path} holds {want}-d keys; got {dim}-d "
                f"vectors (recalibrate to change the embedding)"
            )
        if self.cb.dim != dim:
            self._pending_config["dim"] = dim
        return dim

    def _write_segment(self, kind: str, table: pa.Table, version: int) -> dict:
        rel = f"segments/{kind}-{version:06d}-{uuid.uuid4().hex}.parquet"
        data = table_bytes(table)
        try:
            atomic_write(self.path / rel, data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: cannot write {rel}: {e.strerror or e}"
            ) from e
        return {
            "kind": kind,
            "path": rel,
            "sha256": sha256_hex(data),
            "rows": table.num_rows,
            "bytes": len(data),
            "version": version,
        }

    def _commit(
        self,
        segments: list[dict],
        removed: list[dict],
        *,
        state: tuple | None,
        config: dict | None = None,
    ) -> int:
        """Compute derived data, write it and the manifest; the rename is the commit.

        state describes how live keys changed, so derived data updates incrementally:
        ("append", keys, edits), ("remove", keys, edits, keep_mask), ("full", keys,
        edits), ("same",), ("compact",) (same keys, derived files rewritten as bases), or
        None (reload everything from the listed segments).
        """
        cb = self.cb
        old = cb.manifest
        version = cb.version + 1
        cfg = dict(old["config"] if config is None else config)
        cfg.update(self._pending_config)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "version": version,
            "created": old["created"],
            "updated": now_iso(),
            "config": cfg,
            "segments": segments,
            "removed_edits": removed,
            "derived": None,
        }
        # A scratch reader over the new content computes the derived data.
        kind = state[0] if state else None
        tables: dict[str, Any] = {}
        if state is not None and kind in ("append", "remove", "full"):
            tables = {"keys": state[1], "edits": state[2]}
        if kind == "append" and state is not None and state[1] is None:
            tables.update(tail=state[3], n_keys=state[4])  # the engine holds the old keys
        if kind in ("same", "compact"):
            # the same keys: decoded only if this snapshot already holds them or the
            # derived data needs them (the engine's need not: store/engine.py)
            keys = cb.keys_if_loaded()
            tables = {"keys": keys, "edits": cb.edits_table()}
            if keys is None:
                tables["n_keys"] = cb.n_keys
        new = cb.view(manifest, **tables)
        try:
            index, derived = self._derive(new, kind, state)
            manifest["derived"] = derived
            data = manifest_bytes(manifest)
            atomic_write(self.path / "versions" / f"v{version:06d}.json", data)
            atomic_write(self.path / MANIFEST, data)
        except OSError as e:
            raise CodebookError(
                f"codebook {self.path}: commit of version {version} failed: {e.strerror or e}"
            ) from e
        self._pending_config = {}
        # Hand the computed state to the caller's Codebook instead of rereading it.
        cb.adopt(json.loads(data), keys=new.keys_if_loaded(), edits=new.edits_table(), index=index)
        self._gc_derived(old)
        return version

    def _derive(
        self, new: Codebook, kind: str | None, state: tuple | None
    ) -> tuple[DerivedIndex, dict]:
        """The new version's derived index and its manifest `derived` section.

        Below `engine_min_keys` keys the index files are written by
        store/index/update.py (deltas where that is exact, base files otherwise); tau is
        measured on the new index by the codebook's rule. From `engine_min_keys` keys on
        (and any rule but `reference`) the engine is the index (`_derive_engine`).
        """
        cb = self.cb
        if new.n_keys >= cb.engine_min_keys and new.tau_rule != "reference" and new.dim:
            return self._derive_engine(new, kind)
        needs_old = kind in ("append", "same", "compact") or (kind == "remove" and new.n_keys)
        update = IndexUpdate(
            self.path,
            new.version,
            cb.index if needs_old else None,
            lock=cb.hnsw_lock,
            hnsw_min_keys=cb.hnsw_min_keys,
        )
        keep = state[3] if kind == "remove" and state else None
        index, layout = update.derive(new, kind, keep, reference=new.tau_rule == "reference")
        new.use_index(index)
        return index, new.derived_section(layout)

    def _derive_engine(self, new: Codebook, kind: str | None) -> tuple[DerivedIndex, dict]:
        """The derived data of a codebook of engine_min_keys keys or more: the engine
        (store/engine.py: appended to on an insert, rebuilt by streaming otherwise) is
        the source of sigma and the neighbour lists, whose files the store lists as its
        own (`store_layout`), and of the per-key tau measurements (store/taucache.py).
        No full-width index is built or updated, and an insert reads none of the old
        keys: memory and time follow the batch, not the codebook."""
        cb = self.cb
        n = new.n_keys
        eng, section = derive_engine(self.path, new.version, cb.manifest, kind, new, n)
        lists = None
        if eng is None:  # "same": the previous files as they are
            old = cb.manifest["derived"]
            layout = {
                "files": dict(old.get("files") or {}),
                "deltas": dict(old.get("deltas") or {}),
            }
        else:
            layout = store_layout(self.path, section)
            f, d = layout["files"], layout["deltas"]
            lists = Lists(
                eng.sigma_raw, eng.knn_idx, eng.knn_dist,
                sigma_files={"base": f["sigma"], "deltas": d["sigma"]},
                knn_files={"base": {"knn_idx": f["knn_idx"], "knn_dist": f["knn_dist"]},
                           "deltas": d["knn"]},
            )  # fmt: skip
        index = DerivedIndex(
            self.path,
            {"keys": n, **layout},
            n,
            new.dim or 0,
            new.vectors,
            lock=cb.hnsw_lock,
            lists=lists,
            lift_known=lists is not None,
        )
        new.use_index(index)
        if new.tau_rule in TC.RULES:
            old_files = (cb.manifest.get("derived") or {}).get("files") or {}
            cache = TC.load(self.path, layout["files"].get("tau_other"), n) if eng is None else None
            if cache is None:
                d_lists = index.lists(need_knn=True)
                tables = [t for _, t in Engine.facts_tables(self.path, section)]

                def column(name: str) -> pa.ChunkedArray:
                    return pa.chunked_array([c for t in tables for c in t.column(name).chunks])

                images, edits = column("image_sha256"), column("edit_id")
                rows = eng.changed_rows if eng is not None and kind == "append" else None
                before = TC.load(self.path, old_files.get("tau_other"), cb.n_keys)
                if rows is not None and before is not None and len(before.other) < n:
                    # an insert: the rows whose list changed, and the new ones
                    cache = TC.updated(before, d_lists.idx, d_lists.dist, rows, images, edits)
                else:
                    cache = TC.compute(d_lists.idx, d_lists.dist, images, edits)
                rel = f"index/tau-other-{new.version:06d}.npy"
                layout["files"]["tau_other"] = TC.write(self.path, rel, cache)
            new.use_tau_cache(cache)
        derived = new.derived_section(layout)
        derived["engine"] = section
        return index, derived

    def _gc_derived(self, previous: dict) -> None:
        """Drop derived files not listed by the current or the previous manifest.

        The previous version's files stay so that readers still on it keep their cache
        (base files stay as long as a delta builds on them).
        """
        keep = derived_paths(previous) | derived_paths(self.cb.manifest)
        for f in (self.path / "index").glob("*"):
            if f"index/{f.name}" not in keep and ".tmp-" not in f.name:
                with contextlib.suppress(OSError):
                    unlink(f)
