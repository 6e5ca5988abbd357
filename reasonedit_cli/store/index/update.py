"""The writer's side of the derived index: the next version's sigma, lists, graphs, lift.

`IndexUpdate` computes the new version's derived data from the previous version's
`DerivedIndex` and writes it to index/: as deltas where that is exact (an append costs
O(batch)), as new base files otherwise. It returns the new `DerivedIndex` (handed to the
reader after the commit) and the manifest's `files`/`deltas` layout; the manifest itself
is the writer's (store/writer.py).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from ... import retrieval as R
from ..files import atomic_write
from ..format import sha256_hex
from . import deltas as DL
from . import lift as LF
from . import neighbours as NB
from .derived import DerivedIndex
from .graphs import Graph, build_hnsw, fold_graphs, save_graph
from .neighbours import Lists


class KeySource(Protocol):
    """The keys of the new version (a `Codebook` view over the new content)."""

    @property
    def n_keys(self) -> int: ...

    @property
    def dim(self) -> int | None: ...

    def vectors(self) -> np.ndarray: ...

    def vectors_from(self, start: int) -> np.ndarray: ...


class IndexUpdate:
    """Derived data of one commit: `root`'s version `version`, after `old` (the previous
    version's index)."""

    def __init__(
        self,
        root: Path,
        version: int,
        old: DerivedIndex | None,
        *,
        lock: threading.Lock,
        hnsw_min_keys: int,
    ):
        self.root = root
        self.version = version
        self.tag = f"{version:06d}"
        self._old = old
        self.lock = lock
        self.hnsw_min_keys = hnsw_min_keys

    @property
    def old(self) -> DerivedIndex:
        """The previous version's index (given for appends, removals and keeps)."""
        assert self._old is not None, "this change needs the previous version's index"
        return self._old

    def derive(
        self, new: KeySource, kind: str | None, keep: np.ndarray | None, *, reference: bool
    ) -> tuple[DerivedIndex, dict]:
        """The new version's index and its manifest layout, written as deltas where exact.

        append: a graph part holding just the new keys, and sigma / neighbour-list patches
        of the rows that changed: O(batch) to compute and write (a part is folded into new
        base files once its deltas outgrow the thresholds in deltas.py). same (a config
        change): the previous files as they are. compact (`compact`, `doctor --repair`):
        everything loaded, or rebuilt where damaged, then written as base files. remove
        (rows where `keep` is False gone) / full / None: recomputed (rows renumber) and
        written as base files.
        """
        n = new.n_keys
        old_n = self.old.n if kind in ("append", "same", "compact") else 0
        self._new = new
        self._lists: Lists
        self._graphs: list[Graph] | None = None
        self._lift: LF.Lift | None = None
        if kind == "append" and old_n:
            layout = self._append(new, old_n)
        elif kind in ("same", "compact") and n:
            layout = self._keep(new, compact=kind == "compact")
        else:
            layout = self._full(new, keep if kind == "remove" else None)
        index = DerivedIndex(
            self.root,
            None,
            n,
            new.dim or 0,
            new.vectors,
            reference=reference,
            lock=self.lock,
            lists=self._lists,
            graphs=self._graphs,
            lift=self._lift,
            lift_known=True,
        )
        return index, layout

    def _needs_graph(self, n: int) -> bool:
        # persisted from hnsw_min_keys on; above KNN_EXACT_MAX_KEYS the lists need it too
        return n > 0 and (n >= self.hnsw_min_keys or n > NB.KNN_EXACT_MAX_KEYS)

    def _full(self, new: KeySource, keep: np.ndarray | None) -> dict:
        n = new.n_keys
        vecs = new.vectors()
        graphs = [Graph(build_hnsw(vecs), 0, n)] if self._needs_graph(n) else None
        if keep is not None and n:
            od = self.old.lists(need_knn=True)
            idx, dist = NB.remove_from_knn_lists(vecs, od.idx, od.dist, keep, R.SIGMA_K)
            self._lists = Lists.from_lists(idx, dist)
        else:
            self._lists = Lists.compute(vecs, graphs)
        self._graphs = graphs
        return self._write_bases(("sigma", "knn", "hnsw"))

    def _keep(self, new: KeySource, *, compact: bool) -> dict:
        old = self.old
        d = old.lists(need_knn=True)  # from the files, or recomputed if damaged
        graphs = old.graphs() if self._needs_graph(new.n_keys) else None
        self._lists, self._graphs = d, graphs
        # rewrite what is not on disk (recomputed after damage); compaction also what
        # has deltas; a base file that is fine stays as it is (GBs at a million keys)
        rewrite = []
        if d.sigma_files is None or (compact and d.sigma_files["deltas"]):
            rewrite.append("sigma")
        if d.knn_files is None or (compact and d.knn_files["deltas"]):
            rewrite.append("knn")
        if graphs and (any(g.entry is None for g in graphs) or (compact and len(graphs) > 1)):
            rewrite.append("hnsw")
        # the lifted graph: rebuilt when damaged; compaction also builds a missing one or
        # one built with other settings
        lift, lift_bad = old.known_lift() if graphs else (None, None)
        self._lift = lift
        stale = (
            lift is None
            or lift.entries is None
            or lift.entries["lift_hnsw"].get("settings") != LF.lift_settings()
        )
        if graphs and (lift_bad or (compact and stale)):
            rewrite.append("lift")
        return self._write_bases(tuple(rewrite))

    def _append(self, new: KeySource, old_n: int) -> dict:
        """Derived data after appending keys old_n..n-1 (see `derive`)."""
        old = self.old
        n = new.n_keys
        od = old.lists(need_knn=True)
        new_vecs = new.vectors_from(old_n)
        graphs = None
        if self._needs_graph(n):
            parts = old.loaded_graphs()
            if parts:  # the new keys get a graph part of their own
                graphs = [*parts, Graph(build_hnsw(new_vecs, start=old_n), old_n, n)]
            else:  # the first graph: all keys
                graphs = [Graph(build_hnsw(new.vectors()), 0, n)]
        if n > NB.KNN_EXACT_MAX_KEYS:
            assert graphs is not None  # _needs_graph above KNN_EXACT_MAX_KEYS
            app = NB.append_knn_ann([g.index for g in graphs], new_vecs, od.idx, od.dist, R.SIGMA_K)
        else:
            idx, dist = NB.update_knn_lists(old.vectors(), od.idx, od.dist, new_vecs, R.SIGMA_K)
            app = DL.knn_append_from_full(od.idx, od.dist, idx, dist)
        idx, dist = app.apply(od.idx, od.dist)
        # sigma is row-local: recompute it only where a list changed, and for new rows
        touched = np.concatenate([app.rows, np.arange(old_n, n)])
        raw = np.empty(n, dtype=np.float64)
        raw[:old_n] = od.sigma_raw
        raw[touched] = R.sigma_raw_from_knn(dist[touched])
        d = Lists(raw, idx, dist)
        self._lists, self._graphs = d, graphs
        # the lifted graph stays valid for the old rows (appends only shrink sigmas); new
        # keys are searched through their graph part and the sigma scan
        self._lift = old.lift() if graphs else None
        rewrite: list[str] = []
        extra = {"keys": n, "version": self.version}
        tag = self.tag
        # sigma: a patch of the touched rows
        sf = od.sigma_files
        if sf is None or DL.should_compact_sigma(
            sf["base"]["rows"], sum(e["rows"] for e in sf["deltas"]) + len(touched)
        ):
            rewrite.append("sigma")
        else:
            patch = DL.sigma_patch(raw, touched)
            e = self._write_derived(f"index/sigma-delta-{tag}.npy", DL.npy_bytes(patch))
            entry = dict(e, rows=len(patch), **extra)
            d.sigma_files = {"base": sf["base"], "deltas": [*sf["deltas"], entry]}
        # neighbour lists: the entries that point at the new keys
        kf = od.knn_files
        knn = (
            DL.knn_patch(app, len(od.idx), od.idx[app.rows], od.dist[app.rows])
            if kf is not None
            else None
        )
        if kf is None or knn is None:
            rewrite.append("knn")
        elif DL.should_compact_knn(
            kf["base"]["knn_idx"]["rows"], sum(e["entries"] for e in kf["deltas"]) + len(knn)
        ):
            rewrite.append("knn")
        else:
            e = self._write_derived(f"index/knn-delta-{tag}.npy", DL.npy_bytes(knn))
            entry = dict(e, entries=len(knn), **extra)
            d.knn_files = {"base": kf["base"], "deltas": [*kf["deltas"], entry]}
        # graph: the new part, unless it is time to fold the parts into the base
        if graphs:
            small = [g.size for g in graphs[1:]]
            if (
                len(graphs) == 1
                or any(g.entry is None for g in graphs[:-1])
                or DL.should_fold_graphs(graphs[0].size, small)
            ):
                rewrite.append("hnsw")
            else:
                rel = f"index/hnsw-delta-{tag}.bin"
                e = save_graph(self.root, graphs[-1].index, rel, self.lock)
                graphs[-1].entry = dict(e, start=old_n, stop=n, version=self.version)
        return self._write_bases(tuple(rewrite))

    def _write_bases(self, parts: tuple[str, ...]) -> dict:
        """Write new base files for `parts` of the new lists / graphs (dropping their
        deltas; the graph parts are folded into one) and return the manifest layout."""
        d, n, tag = self._lists, self._new.n_keys, self.tag
        if "sigma" in parts:
            e = self._write_derived(f"index/sigma-{tag}.npy", DL.npy_bytes(d.sigma_raw))
            d.sigma_files = {"base": dict(e, rows=n), "deltas": []}
        if "knn" in parts:
            base = {
                name: dict(self._write_derived(f"index/{name}-{tag}.npy", DL.npy_bytes(a)), rows=n)
                for name, a in (("knn_idx", d.idx), ("knn_dist", d.dist))
            }
            d.knn_files = {"base": base, "deltas": []}
        if "hnsw" in parts and self._graphs:
            if len(self._graphs) > 1 and self._old is not None:
                self._old.forget_graphs()  # the base grows: no longer the old snapshot's graph
            index = fold_graphs(self._graphs, n, self.lock)
            e = save_graph(self.root, index, f"index/hnsw-{tag}.bin", self.lock)
            self._graphs = [Graph(index, 0, n, dict(e, rows=n))]
        if ("hnsw" in parts or "lift" in parts) and self._graphs:
            self._lift = self._write_lift()
        return self._layout()

    def _write_lift(self) -> LF.Lift:
        """Build and write the lifted graph of the new version's largest-sigma keys."""
        vecs, sigma = self._new.vectors(), self._lists.sigma
        rows = LF.lift_members(sigma)
        params = LF.lift_params(vecs[rows], sigma[rows])
        index = build_hnsw(LF.lift_keys(vecs[rows], sigma[rows], params), M=LF.LIFT_M)
        n, tag, lock = self._new.n_keys, self.tag, self.lock  # `rows`: keys at build
        entries = {
            "lift_hnsw": dict(
                save_graph(self.root, index, f"index/lift-hnsw-{tag}.bin", lock),
                rows=n,
                settings=LF.lift_settings(),
            ),
            "lift_rows": dict(
                self._write_derived(f"index/lift-rows-{tag}.npy", DL.npy_bytes(rows)),
                rows=n,
                count=len(rows),
            ),
            "lift_params": dict(
                self._write_derived(f"index/lift-params-{tag}.npy", DL.npy_bytes(params)), rows=n
            ),
        }
        return LF.Lift(index, rows, params, entries)

    def _layout(self) -> dict:
        """The manifest's `files` (base files) and `deltas` of the new lists / graphs."""
        d, graphs = self._lists, self._graphs or []
        assert d.sigma_files is not None and d.knn_files is not None
        files = {"sigma": d.sigma_files["base"], **d.knn_files["base"]}
        if graphs:
            files["hnsw"] = graphs[0].entry
        if graphs and self._lift is not None and self._lift.entries:
            files.update(self._lift.entries)
        deltas = {
            "sigma": d.sigma_files["deltas"],
            "knn": d.knn_files["deltas"],
            "hnsw": [g.entry for g in graphs[1:]],
        }
        return {"files": files, "deltas": deltas}

    def _write_derived(self, rel: str, data: bytes) -> dict:
        atomic_write(self.root / rel, data)
        return {"path": rel, "sha256": sha256_hex(data), "bytes": len(data)}
