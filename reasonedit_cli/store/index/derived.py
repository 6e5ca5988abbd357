"""`DerivedIndex`: one codebook version's derived data, loaded, verified and searched.

index/ holds, per part, a base file plus deltas appended by later inserts (deltas.py,
docs/codebook-format.md): sigma, the neighbour lists, the hnsw graph parts and the
lifted graph of large-sigma keys. Everything there is a cache rebuildable from the keys:
every loader verifies checksums, dtypes, shapes and ranges and returns None on any
doubt, and the caller recomputes in memory (a damaged file is rebuilt, never trusted).

The reader (store/reader.py) owns one DerivedIndex per snapshot; the writer builds the
next version's with update.py and hands it to the reader (`Codebook.adopt`), so neither
touches the other's state.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ... import retrieval as R
from ...errors import CodebookError
from ..compat import base_rows
from ..files import read_regular
from ..format import sha256_hex
from ..manifest import ENTRY_ERRORS, entry_path, int_in
from . import deltas as DL
from . import lift as LF
from . import neighbours as NB
from .graphs import Graph, build_hnsw, graphs_cover, load_hnsw_file, search_candidates
from .neighbours import Lists

SEARCH_FETCH = 64  # hnsw candidates (raw distance) re-ranked by corrected distance
SEARCH_EF = 64  # hnsw ef for search (>= fetch); recall/latency in benchmarks/README.md
SEARCH_SIGMA_SCAN = 2048  # at most this many large-sigma keys checked per query (bound)
SEARCH_SIGMA_SCAN_LIFTED = 512  # the same when the lifted graph covers the largest sigmas

NO_GRAPH = "hnsw index is not persisted"  # Health.bad's line for a missing graph

#: One search result per query: (row, raw L2 distance, corrected distance), best first.
Hits = list[list[tuple[int, float, float]]]


@dataclass
class Health:
    """What `check` found in the derived files (store/check.py words it)."""

    bad: list[str]  # one line per damaged, missing or out-of-date part
    lift_missing: bool  # a graph but no lifted graph (a codebook written before it)
    n_deltas: int  # delta files of sigma, lists and graphs (compaction folds them)


class DerivedIndex:
    """sigma, neighbour lists, graph parts and the lifted graph of one codebook version.

    `section` is the manifest's `derived` entry (None: nothing persisted); it applies only
    when it counts `n` keys. `vectors` gives the keys (loaded on first need: sigma loads
    without them). With reference=True, search divides by the reference's sigma
    (tau_rule "reference"). `lock` serialises hnswlib use (no concurrent add and query).
    The parts already computed (by the writer) can be handed in.
    """

    def __init__(
        self,
        root: Path,
        section: dict | None,
        n: int,
        dim: int,
        vectors: Callable[[], np.ndarray],
        *,
        reference: bool = False,
        lock: threading.Lock | None = None,
        lists: Lists | None = None,
        graphs: list[Graph] | None = None,
        lift: LF.Lift | None = None,
        lift_known: bool = False,
    ):
        self.root = root
        self.n = n
        self.dim = dim
        self.raw_section = section or {}
        self.section = section if section and section.get("keys") == n else {}
        self.reference = reference
        self.lock = lock or threading.Lock()
        self._vectors = vectors
        self._lists = lists
        self._graphs = graphs  # base graph + small graphs of recent adds
        self._lift = lift
        self._lift_loaded = lift_known or lift is not None
        self._ref_sigma: np.ndarray | None = None
        self._sigma_desc: tuple[np.ndarray, ...] | None = None

    def committed(
        self, section: dict | None, vectors: Callable[[], np.ndarray] | None = None
    ) -> DerivedIndex:
        """This index as the one of the version whose manifest lists `section` (and whose
        keys `vectors` gives, when another snapshot holds them now)."""
        return DerivedIndex(
            self.root,
            section,
            self.n,
            self.dim,
            vectors or self._vectors,
            reference=self.reference,
            lock=self.lock,
            lists=self._lists,
            graphs=self._graphs,
            lift=self._lift,
            lift_known=self._lift_loaded,
        )

    def vectors(self) -> np.ndarray:
        """The key vectors this index is of (row i = graph label i)."""
        return self._vectors()

    # -- the files --------------------------------------------------------

    def deltas(self, part: str) -> list[dict]:
        """The delta entries of one part ("sigma", "knn", "hnsw"), oldest first."""
        return list((self.section.get("deltas") or {}).get(part) or [])

    def files(self) -> dict:
        """The base file entries the manifest lists."""
        return self.section.get("files") or {}

    def _load_npy(
        self, entry: dict | None, shape: tuple[int, ...], dtype: Any
    ) -> np.ndarray | None:
        """A derived .npy file if it exists, matches its checksum, dtype and shape; else None."""
        if not entry:
            return None
        try:
            data = read_regular(self.root / entry["path"], self.root)
            if sha256_hex(data) != entry["sha256"]:
                return None
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, KeyError, EOFError, TypeError):
            return None
        if arr.dtype != dtype or arr.shape != shape:
            return None
        return arr

    def load_sigma_files(self) -> tuple[np.ndarray | None, dict | None, str | None]:
        """(sigma before the floor, the entries it came from, None) replayed from the base
        file and its patches, or (None, None, the first file that failed)."""
        n = self.n
        base: Any = self.files().get("sigma")
        deltas = self.deltas("sigma")
        at = base
        try:
            rows = base_rows(base, n)
            base = dict(base, rows=rows)
            raw = self._load_npy(base, (rows,), np.dtype(np.float64))
            if raw is None or not (np.isfinite(raw).all() and (raw >= 0).all()):
                return None, None, entry_path(at, "sigma")
            for at in deltas:
                keys = int_in(at["keys"], len(raw), n)
                patch = self._load_npy(at, (int_in(at["rows"], 0, keys),), DL.SIGMA_PATCH_DTYPE)
                if patch is None:
                    return None, None, entry_path(at, "sigma delta")
                raw = DL.apply_sigma_patch(raw, patch, keys)
            if len(raw) != n:
                raise ValueError("sigma files do not cover every key")
        except ENTRY_ERRORS:
            return None, None, entry_path(at, "sigma")
        return raw, {"base": base, "deltas": deltas}, None

    def load_knn_files(
        self,
    ) -> tuple[np.ndarray | None, np.ndarray | None, dict | None, str | None]:
        """(idx, dist, entries, None) replayed from the base lists and their patches, or
        (None, None, None, the first file that failed)."""
        n, k = self.n, R.SIGMA_K
        files = self.files()
        bi: Any = files.get("knn_idx")
        bd: Any = files.get("knn_dist")
        deltas = self.deltas("knn")
        at = bi
        try:
            rows = base_rows(bi, n)
            if base_rows(bd, n) != rows:
                raise ValueError("knn base files disagree")
            bi, bd = dict(bi, rows=rows), dict(bd, rows=rows)
            idx = self._load_npy(bi, (rows, k), np.dtype(np.int64))
            if idx is None:
                return None, None, None, entry_path(bi, "knn_idx")
            at = bd
            dist = self._load_npy(bd, (rows, k), np.dtype(np.float64))
            if dist is None:
                return None, None, None, entry_path(bd, "knn_dist")
            if rows and (idx.min() < -1 or idx.max() >= rows):
                raise ValueError("knn base rows out of range")
            if deltas:
                full_idx = np.full((n, k), -1, dtype=np.int64)
                full_dist = np.full((n, k), np.inf)
                full_idx[:rows], full_dist[:rows] = idx, dist
                idx, dist, cur = full_idx, full_dist, rows
                for at in deltas:
                    keys = int_in(at["keys"], cur, n)
                    shape = (int_in(at["entries"], 0, keys * k),)
                    patch = self._load_npy(at, shape, DL.KNN_PATCH_DTYPE)
                    if patch is None:
                        return None, None, None, entry_path(at, "knn delta")
                    DL.apply_knn_patch(idx, dist, cur, patch, keys)
                    cur = keys
                rows = cur
            if rows != n:
                raise ValueError("knn files do not cover every key")
        except ENTRY_ERRORS:
            return None, None, None, entry_path(at, "knn")
        return idx, dist, {"base": {"knn_idx": bi, "knn_dist": bd}, "deltas": deltas}, None

    def load_lift(self) -> tuple[LF.Lift | None, str | None]:
        """The persisted lifted graph, verified: (lift, None); (None, None) when the
        manifest lists none (codebooks below hnsw_min_keys, or written before it); (None,
        the file that failed) when damaged."""
        files = self.files()
        eh: Any = files.get("lift_hnsw")
        er: Any = files.get("lift_rows")
        ep: Any = files.get("lift_params")
        if not (eh or er or ep):
            return None, None
        dim, n = self.dim, self.n
        at = er
        try:
            m = int_in(er["count"], 1, n)
            rows = self._load_npy(er, (m,), np.dtype(np.int64))
            if rows is None:
                return None, entry_path(er, "lift_rows")
            at = ep
            params = self._load_npy(ep, (LF.LIFT_PARAMS + 2 * dim,), np.dtype(np.float64))
            if params is None or not LF.valid_lift(rows, params, n, dim):
                return None, entry_path(ep, "lift_params")
            at = eh
            index = load_hnsw_file(self.root, eh, dim + 3, m, first_label=0)
            if index is None:
                return None, entry_path(eh, "lift_hnsw")
        except ENTRY_ERRORS:
            return None, entry_path(at, "lift")
        entries = {"lift_hnsw": eh, "lift_rows": er, "lift_params": ep}
        return LF.Lift(index, rows, params, entries), None

    def load_graphs(self, rebuild: bool) -> tuple[list[Graph] | None, list[str]]:
        """The persisted graph parts (base + small graphs of recent adds), verified.

        Returns (parts, paths that failed); parts is None when no graph is persisted or
        the layout is inconsistent. With rebuild=True a part that fails verification is
        rebuilt in memory from its rows' vectors (and marked as not on disk).
        """
        n = self.n
        base = self.files().get("hnsw")
        if not base:
            return None, []
        deltas = self.deltas("hnsw")
        try:
            base = dict(base, rows=base_rows(base, n))
            spans = [(base, 0, base["rows"])]
            spans += [(e, int_in(e["start"], 0, n), int_in(e["stop"], 0, n)) for e in deltas]
            if not graphs_cover([Graph(None, a, b) for _, a, b in spans], n):
                raise ValueError("graph parts do not cover every key")
        except ENTRY_ERRORS:
            return None, [entry_path(base, "hnsw")]
        parts, bad = [], []
        for entry, a, b in spans:
            # a small part's labels must be its rows (cheap to check); the base graph's,
            # labelled from 0 by construction, are not listed (a million-item list)
            index = load_hnsw_file(self.root, entry, self.dim, b - a, a or None)
            part_entry: dict | None = entry
            if index is None:
                bad.append(entry_path(entry, "hnsw"))
                if not rebuild:
                    continue
                index, part_entry = build_hnsw(self._vectors()[a:b], start=a), None
            parts.append(Graph(index, a, b, part_entry))
        return (None if bad and not rebuild else parts), bad

    # -- what a query needs -----------------------------------------------

    def lists(self, need_knn: bool = False) -> Lists:
        """sigma (and with need_knn the neighbour lists): from index/ if valid, else rebuilt.

        Damaged sigma files are recomputed from the stored lists when those verify: the
        same numbers, whichever search made the lists (an engine's IVF lists are not the
        exact ones that a rebuild from the vectors would give)."""
        if self._lists is not None and (self._lists.knn_idx is not None or not need_knn):
            return self._lists
        raw, sigma_files, _ = self.load_sigma_files()
        if need_knn or raw is None:
            idx, dist, knn_files, _ = self.load_knn_files()
            if idx is not None and dist is not None:
                if raw is None:  # sigma files damaged: recompute it from the lists
                    self._lists = Lists.from_lists(idx, dist, knn_files=knn_files)
                else:
                    self._lists = Lists(raw, idx, dist, sigma_files, knn_files)
                return self._lists
        elif raw is not None:
            self._lists = Lists(raw, sigma_files=sigma_files)
            return self._lists
        big = self.n > NB.KNN_EXACT_MAX_KEYS
        self._lists = Lists.compute(self._vectors(), self.graphs() if big else None)
        return self._lists

    def sigma(self) -> np.ndarray:
        """Per-key hubness scale sigma_k (float64), in key order: what search divides raw
        distances by.

        With reference=True it is the reference's `reference_sigma + 1e-6` (1 for a key
        without neighbours), computed from the stored neighbour lists; otherwise the numpy
        median with the duplicate floor (the derived sigma files).
        """
        if self.reference:
            if self._ref_sigma is None:
                raw = self.reference_sigma()
                self._ref_sigma = np.where(np.isnan(raw), 1.0, raw + R.REFERENCE_EPS)
            return self._ref_sigma
        return self.lists().sigma

    def reference_sigma(self) -> np.ndarray:
        """The reference's sigma (retrieval.reference_sigma_from_knn: lower median of the
        30 nearest distances, NaN without neighbours), in key order."""
        return R.reference_sigma_from_knn(self.lists(need_knn=True).dist)

    def graphs(self) -> list[Graph]:
        """The graph parts for search: persisted ones, anything missing rebuilt in memory."""
        if self._graphs is None:
            parts, _ = self.load_graphs(rebuild=True)
            if parts is None:
                parts = [Graph(build_hnsw(self._vectors()), 0, self.n)]
            self._graphs = parts
        return self._graphs

    def loaded_graphs(self) -> list[Graph] | None:
        """The graph parts in memory, else the persisted ones (damaged parts rebuilt), else
        None: what an append extends."""
        if self._graphs is not None:
            return self._graphs
        return self.load_graphs(rebuild=True)[0]

    def forget_graphs(self) -> None:
        """Drop the graph parts from memory (a writer grew the base graph in place)."""
        self._graphs = None

    def lift(self) -> LF.Lift | None:
        """The lifted graph for search, or None (then search scans large sigmas only)."""
        if not self._lift_loaded:
            self._lift, _ = self.load_lift()
            self._lift_loaded = True
        return self._lift

    def known_lift(self) -> tuple[LF.Lift | None, str | None]:
        """The lifted graph without a second read when already verified, else load_lift()."""
        if self._lift_loaded and self._lift is not None:
            return self._lift, None
        return self.load_lift()

    def copy(self, *, lift: bool = True) -> DerivedIndex:
        """The same index with fresh search caches; lift=False: its search does not use
        the lifted graph (tests, benchmarks)."""
        out = self.committed(self.raw_section or None)
        if not lift:
            out._lift, out._lift_loaded = None, True
        return out

    def without_lift(self) -> DerivedIndex:
        """The same index whose search does not use the lifted graph (tests, benchmarks)."""
        return self.copy(lift=False)

    # -- checking ---------------------------------------------------------

    def health(self, hnsw_min_keys: int) -> Health:
        """Every derived file replayed exactly as readers do (for `doctor`)."""
        n = self.n
        bad = []
        if n and (not self.section):
            bad.append("derived section is missing or out of date")
        files = self.raw_section.get("files", {})
        if n:
            failed = [self.load_sigma_files()[2], self.load_knn_files()[3]]
            bad += [f"{f} is missing or damaged" for f in failed if f]
        bad += [f"{f} is missing or damaged" for f in self.load_graphs(rebuild=False)[1]]
        if n >= hnsw_min_keys and not files.get("hnsw"):
            bad.append(NO_GRAPH)
        lift_bad = self.load_lift()[1] if n else None
        if lift_bad:
            bad.append(f"{lift_bad} is missing or damaged")
        lift_missing = bool(
            n >= hnsw_min_keys and files.get("hnsw") and not files.get("lift_hnsw") and not lift_bad
        )
        n_deltas = sum(len(self.deltas(part)) for part in ("sigma", "knn", "hnsw"))
        return Health(bad, lift_missing, n_deltas)

    # -- search -----------------------------------------------------------

    def search(self, q: np.ndarray, k: int, *, use_hnsw: bool) -> Hits:
        """k nearest keys per query (2-D float32, dim checked by the caller) by
        hubness-corrected distance: (row, raw L2 distance, corrected distance), best first.

        The hnsw path over-fetches candidates by raw distance, adds those of the lifted
        graph (the large-sigma keys, searched by corrected distance: lift.py), and
        re-ranks them exactly, since the correction can reorder neighbours.
        """
        n = self.n
        sigma = self.sigma()
        v = self._vectors()
        k = min(k, n)
        bound, lift = None, None
        if use_hnsw:
            # Candidates by raw distance; the correction reorders neighbours, which the
            # sigma bound below completes.
            # With several graph parts (base + recent adds) each returns its own fetch
            # nearest and the bound is the smallest last distance (graphs.py).
            fetch = min(n, max(SEARCH_FETCH, 2 * k))
            graphs = self.graphs()
            with self.lock:
                cand, bound = search_candidates(graphs, q, fetch, max(SEARCH_EF, 2 * k))
            if cand.size and (cand.min() < 0 or cand.max() >= n):
                raise CodebookError(f"codebook {self.root}: hnsw index labels out of range")
            if bound is not None:
                bound = bound * (1.0 - 1e-5)
            lift = self.lift()
            if lift is not None:
                # isolated keys that win by sigma, far down the raw order (lift.py)
                f = min(len(lift.rows), max(LF.LIFT_FETCH, k))
                with self.lock:
                    lift.index.set_ef(max(LF.LIFT_EF, f))
                    lab, _ = lift.index.knn_query(LF.lift_queries(q, lift.params), k=f)
                cand = np.concatenate([cand, lift.rows[lab.astype(np.int64)]], axis=1)
        else:
            # Exact: corrected distances to every key, shortlisted for the exact re-rank.
            fetch = min(n, 4 * k + 16)
            v_sq = np.einsum("ij,ij->i", v.astype(np.float64), v.astype(np.float64))
            cand = np.empty((len(q), fetch), dtype=np.int64)
            step = max(1, 4_000_000 // n)
            for start in range(0, len(q), step):
                corr = R.pairwise_sq_l2(q[start : start + step], v, v_sq)
                np.sqrt(corr, out=corr)
                corr /= sigma[None, :]
                cand[start : start + step] = (
                    np.argpartition(corr, fetch - 1, axis=1)[:, :fetch]
                    if fetch < n
                    else np.arange(n)
                )
        out = []
        for i in range(len(q)):
            # Both paths end in the same exact re-rank, so they return identical numbers.
            rows = cand[i] if lift is None else np.unique(cand[i])  # lift repeats some
            raw = R.direct_l2(q[i], v[rows])
            corr = raw / sigma[rows]
            if bound is not None:
                # A key outside the raw top-`fetch` is at raw distance >= bound[i], so its
                # corrected distance is >= bound[i] / sigma_key: only keys with a large
                # sigma (isolated keys) can still beat the current k-th; check the largest
                # SEARCH_SIGMA_SCAN of them (all of them in practice, see the benchmarks).
                kth = float(np.partition(corr, k - 1)[k - 1])
                extra = self._large_sigma_rows(q[i], bound[i] / kth if kth > 0 else np.inf, kth)
                extra = extra[~np.isin(extra, rows)]
                if len(extra):
                    xraw = R.direct_l2(q[i], v[extra])
                    rows = np.concatenate([rows, extra])
                    raw = np.concatenate([raw, xraw])
                    corr = np.concatenate([corr, xraw / sigma[extra]])
            order = np.lexsort((rows, corr))[:k]
            out.append([(int(rows[j]), float(raw[j]), float(corr[j])) for j in order])
        return out

    def _large_sigma_rows(self, q: np.ndarray, limit: float, kth: float) -> np.ndarray:
        """Rows with sigma > `limit` whose corrected distance to q may be <= kth.

        Screens at most SEARCH_SIGMA_SCAN keys, the largest sigmas first, in float32
        against a cached contiguous copy of their vectors; the caller re-ranks exactly.
        With a lifted graph its keys are left out (its search covers them) and at most
        SEARCH_SIGMA_SCAN_LIFTED others are screened: those just below its sigmas and keys
        added since it was built.
        """
        if self._sigma_desc is None:
            sigma = self.sigma().copy()
            lift = self.lift()
            cap = SEARCH_SIGMA_SCAN
            if lift is not None:
                sigma[lift.rows] = -np.inf
                cap = min(cap, SEARCH_SIGMA_SCAN_LIFTED)
            order = np.argsort(-sigma, kind="stable")[:cap]
            order = order[sigma[order] > -np.inf]
            vecs = np.ascontiguousarray(self._vectors()[order])
            self._sigma_desc = (order, sigma[order], vecs, np.einsum("ij,ij->i", vecs, vecs))
        order, values, vecs, v_sq = self._sigma_desc
        m = int(np.searchsorted(-values, -limit, side="left"))
        if m == 0:
            return order[:0]
        # einsum, not BLAS: a threaded GEMV for one query stalls on a busy machine
        sq = v_sq[:m] - 2.0 * np.einsum("ij,j->i", vecs[:m], q) + float(np.dot(q, q))
        approx = np.sqrt(np.maximum(sq, 0.0)) / values[:m]
        return order[:m][approx <= kth * (1.0 + 1e-3) + 1e-6]
