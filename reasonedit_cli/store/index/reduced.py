"""ANN on a reduced projection, exact re-rank on the mapped full vectors (issue 22).

The search engine for wide keys. A codebook's keys are 512 wide with the bundled model
but 1,408 (LLaVA-1.5-7B's projector input + MiniLM) to 4,480 (a 7-8B language layer +
MiniLM) with real ones; at a million keys and 4,480 dimensions a full-width hnsw graph
alone would be 18 GB. Here:

- the full vectors are a memory-mapped derived file (`mapped.py`), never decoded on open,
  stored in the IVF part's list order (`write_ordered`) so that the keys of a list are
  contiguous and read sequentially;
- candidates come from `Projection.graph_vectors` (PCA to `rank` dims + the residual
  norm, `projection.py`): rank + 1 floats a key, in a memory-mapped IVF index (`ivf.py`;
  hnswlib parts remain available, `ann="hnsw"`, for the side-by-side comparison), plus
  flat parts for keys inserted since the last compaction;
- a search takes their candidates (raw distance in the reduced space, which never
  exceeds the full distance), the lifted graph's (corrected distance, for the 5% of keys
  with the largest sigma: `lift.py`'s lift over `Projection.lift_*_vectors`), screens
  the next largest sigmas against the bound, and re-ranks all of them exactly on the
  full vectors by corrected distance |q - k| / sigma_k (`sq_distances`);
- neighbour lists (and so sigma) are exact over candidate clusters: each IVF list's keys
  against the keys of its LIST_PROBE nearest lists, full width (`ivf_lists`); an insert
  queries the parts for the new keys (`RerankedParts` serves `neighbours.append_knn_ann`).

`save` / `open` / `append_files` write and read the files (names in
docs/codebook-format.md); every file is verified before use (`open`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from ... import retrieval as R
from ..files import replaced
from . import deltas as DL
from . import graphs as GR
from . import lift as LF
from . import neighbours as NB
from .hnswfile import check_hnsw
from .ivf import NPROBE, FlatPart, IVFPart, valid_ivf
from .mapped import (
    MappedError,
    VectorParts,
    hash_fd,
    open_parts,
    open_regular,
    open_vectors,
    parse_npy_header,
    write_permuted,
    write_vectors,
)
from .projection import DEFAULT_RANK, Projection, fit_sample_rows, one_thread

GRAPH_M = 16  # hnsw parts (ann="hnsw"): rank + 1 dims
GRAPH_EF_CONSTRUCTION = 100
GRAPH_SEED = 100
SEARCH_FETCH = 128  # candidates per part, re-ranked on the full vectors
#: ... plus this many per IVF / flat part by reduced distance / sigma (`candidates`):
#: recall@5 at fetch 128 went 0.887 -> 0.934 at 100k x 4,480 (float32, +0.2-0.6 ms) and
#: 0.981 -> 0.989 at 1M x 4,480 (float16, same time); 128 more raw ones gave 0.941 / 0.988
CORRECTED_FETCH = 64
LIFT_FETCH = 32  # lifted-graph candidates per query (its reduced-space ranking is approximate)
#: largest sigmas outside the lifted graph screened per query: 128 and 512 gave the same
#: recall@5 at 100k x 4,480 (0.944 / 0.980 at fetch 128 / 256), 512 cost ~4 ms more CPU
SIGMA_SCAN = 128
#: search: candidates of the lowest bounds re-ranked first (`_rerank`); 0: all in one block.
#: Off by default: on the benchmark mixture it cost more than it saved (benchmarks/README.md)
RERANK_BLOCK = 0
LIST_PROBE = 3  # neighbour lists: a list's keys against the keys of its 3 nearest lists
LIST_CANDIDATES = 768  # ... and more lists until they hold this many keys
LIST_FETCH = 48  # insert: candidates per new key re-ranked for its 30 nearest
REVERSE_FETCH = 48  # insert: neighbours queried per new key (reverse-neighbour search)
MIN_IVF_KEYS = 2048  # below this a base part is flat (scanned in full)
NEAR_DUPLICATE = 1e-3  # ivf_lists: squared distances below this x the norms are recomputed
LIST_BLOCK = 2048  # ivf_lists: members x candidates compared per GEMM block (32 MB float64)
_TOPK_BATCH = 16  # exact_topk: queries re-ranked together (one GEMM, BATCH x fetch rows)


def sq_distances(q: np.ndarray, block: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Squared L2 from one query to each row of block: float32 differences (no
    cancellation, unlike |q|^2 + |k|^2 - 2qk), float32 sums (relative error ~1e-6 at
    4,480 dims; float64 sums cost 3x: 0.69 vs 0.23 ms for 224 x 4,480), float64 out.
    The one distance every re-rank uses, so the exact and the ANN paths return identical
    numbers; the store recomputes its hits' distances in float64 (`retrieval.direct_l2`).
    `overwrite`: block is a float32 scratch buffer the differences may replace (no
    temporary array: the same numbers)."""
    qv = np.asarray(q, dtype=np.float32).reshape(1, -1)
    if overwrite and isinstance(block, np.ndarray) and block.dtype == np.float32:
        d = np.subtract(block, qv, out=block)
    else:
        d = np.asarray(block, dtype=np.float32) - qv
    return np.einsum("ij,ij->i", d, d).astype(np.float64)


def _rounded(x: np.ndarray, half: bool) -> np.ndarray:
    """x as float16 would store it (float32 out) when half, else x."""
    if not half:
        return x
    with np.errstate(over="ignore"):  # write_vectors refuses what overflows
        return np.asarray(x, dtype=np.float16).astype(np.float32)


def _finite(x: np.ndarray) -> np.ndarray:
    # a damaged mapped file can hold NaN / inf: such keys are never nearest
    return np.where(np.isfinite(x), x, np.inf)


def build_graph(vectors: np.ndarray, start: int = 0, *, M: int = GRAPH_M) -> Any:
    """hnswlib graph of (reduced) `vectors` labelled start, start + 1, ..."""
    n, dim = vectors.shape
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(
        max_elements=max(n, 1), M=M, ef_construction=GRAPH_EF_CONSTRUCTION, random_seed=GRAPH_SEED
    )
    if n:
        index.add_items(
            np.ascontiguousarray(vectors, dtype=np.float32), np.arange(start, start + n)
        )
    return index


@dataclass
class HnswPart:
    """An hnswlib graph over rows start..stop-1 (the comparison to IVF)."""

    index: Any
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def graph_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The graph's own copies of codebook rows start..stop-1 (its labels)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if not len(rows):
            return np.empty((0, self.index.dim), dtype=np.float32)
        try:
            return np.asarray(self.index.get_items(rows), dtype=np.float32)
        except RuntimeError as e:  # a label the graph lacks: a damaged graph
            raise MappedError(f"hnsw part: {e}") from e

    def knn_query_corrected(
        self, q: np.ndarray, k: int, nprobe: int, sigma: np.ndarray | None, extra: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`knn_query` and no extra keys: a graph scans no lists to rank by sigma."""
        lab, sq = self.knn_query(q, k, nprobe)
        return lab, sq, np.empty((len(lab), 0), dtype=np.int64)

    def knn_query(self, q: np.ndarray, k: int, nprobe: int = 0):
        k = min(k, self.size)
        self.index.set_ef(max(k, SEARCH_FETCH))
        try:
            lab, sq = self.index.knn_query(q, k=k)
        except RuntimeError as e:  # fewer than k reachable: a damaged graph
            raise MappedError(f"hnsw part: {e}") from e
        lab = lab.astype(np.int64)
        if lab.size and (lab.min() < self.start or lab.max() >= self.stop):
            raise MappedError("hnsw part labels out of range")  # load_graph checks them
        return lab, sq


Part = IVFPart | FlatPart | HnswPart


def lift_candidates(lift: LF.Lift, lifted_queries: np.ndarray, f: int) -> np.ndarray:
    """The rows of the lifted graph's f nearest per lifted query, (m, f) int64. A graph
    that cannot answer (fewer than f keys reachable: only a damaged file that passed
    `load_graph`'s structural check) raises MappedError, as does a label outside its
    rows (which that check refuses: here so that no label indexes `rows` unchecked)."""
    lift.index.set_ef(max(LF.LIFT_EF, f))
    try:
        lab, _ = lift.index.knn_query(lifted_queries, k=f)
    except RuntimeError as e:
        raise MappedError(f"lifted graph: {e}") from e
    lab = lab.astype(np.int64)
    if lab.size and (lab.min() < 0 or lab.max() >= len(lift.rows)):
        raise MappedError("lifted graph labels out of range")
    return lift.rows[lab]


def candidates(
    parts: list,
    g: np.ndarray,
    fetch: int,
    nprobe: int = NPROBE,
    *,
    sigma: np.ndarray | None = None,
    corrected: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reduced-space candidates from every part and a bound per query.

    Like `graphs.search_candidates`: each part returns its `fetch` nearest (all of its
    keys if it has fewer); the smallest last distance over the parts that held more keys
    bounds every key outside the candidates (up to the ANN's misses), and since the
    reduced distance never exceeds the full one, it bounds their full distance too.
    With `sigma` and `corrected` > 0, IVF and flat parts add that many keys of the lists
    they scanned by reduced distance / sigma (`ivf.corrected_extra`): more candidates,
    so the bound still holds.
    """
    labels, bound = [], None
    for p in parts:
        f = min(p.size, fetch)
        if f <= 0:
            continue
        if corrected > 0 and sigma is not None:  # (an hnsw part adds none)
            lab, sq, extra = p.knn_query_corrected(g, f, nprobe, sigma, corrected)
            labels.append(extra)
        else:  # plain knn_query: IVF batches many queries (an insert's)
            lab, sq = p.knn_query(g, f, nprobe)
        labels.append(lab)
        if f < p.size:
            b = np.sqrt(np.asarray(sq[:, -1], dtype=np.float64))
            bound = b if bound is None else np.minimum(bound, b)
    cand = labels[0] if len(labels) == 1 else np.concatenate(labels, axis=1)
    return cand, bound


class RerankedParts:
    """The parts as one hnswlib-like index whose distances are exact full width.

    `knn_query(full_queries, k)` projects the queries, takes max(k, fetch) candidates
    from every part and returns the k nearest by exact distance: what
    `neighbours.append_knn_ann` needs to keep neighbour lists on insert.
    """

    def __init__(
        self,
        engine: ReducedIndex,
        fetch: int = LIST_FETCH,
        nprobe: int = LIST_PROBE,
        known: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.engine, self.fetch, self.nprobe = engine, fetch, nprobe
        #: (queries, their graph vectors) already projected (an insert's new keys)
        self.known = known

    def get_current_count(self) -> int:
        return self.engine.n

    def set_ef(self, ef: int) -> None:
        return None

    def knn_query(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.engine.dim)
        kq = self.known
        if kq is not None and kq[0].shape == q.shape and np.array_equal(kq[0], q):
            g = kq[1]
        else:
            g = self.engine.projection.graph_vectors(q)
        cand, _ = candidates(self.engine.parts, g, max(k, self.fetch), self.nprobe)
        # queries whose nearest candidates lie together in the file are re-ranked
        # together (an IVF-ordered file: the same lists), so that a batch's gather and
        # the next one's read the same pages
        order = np.argsort(self.engine.vectors.file_order(cand[:, 0]), kind="stable")
        lab, sq = self.engine.exact_topk(q[order], cand[order], k)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return lab[back], sq[back]


def ivf_lists(
    part: IVFPart, vectors: VectorParts, k: int = R.SIGMA_K, probe: int = LIST_PROBE, log=None
) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour lists of every key of an IVF part over candidate clusters: the keys of
    each list against the keys of its `probe` nearest lists, full width.

    Each list's vectors are gathered once (a million keys: ~4,000 gathers of ~1,000 rows)
    and compared by one float32 GEMM. Its distances are relatively exact to ~1e-6 except
    for near-duplicates (cancellation in |q|^2 + |k|^2 - 2qk), which are recomputed by
    `sq_distances` (entries below NEAR_DUPLICATE of the squared norms).
    """
    # per-list GEMMs (tens of ms each): one BLAS thread. Threaded BLAS on the shared
    # 2-core machine made each list take ~1 s (100k x 4,480 at load 9)
    with one_thread():
        return _ivf_lists(part, vectors, k, probe, log)


def _ivf_lists(part: IVFPart, vectors: VectorParts, k: int, probe: int, log) -> tuple:
    n = part.size
    idx = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), np.inf)
    off = part.offsets
    for j in range(len(part.centroids)):
        members = part.labels[off[j] : off[j + 1]]
        if not len(members):
            continue
        near = part.lists_near(part.centroids[j], probe, max(k + 1, LIST_CANDIDATES))
        cand = np.concatenate([part.labels[off[c] : off[c + 1]] for c in near])
        kk = min(k, len(cand) - 1)
        if kk <= 0:
            continue
        vectors.prefetch(cand)  # contiguous ranges in an IVF-ordered file: read ahead
        qv = vectors.take(members)
        q_sq = np.einsum("ij,ij->i", qv, qv)
        best_d = np.full((len(members), 0), np.inf)
        best_i = np.zeros((len(members), 0), dtype=np.int64)
        # candidates and members in blocks: memory stays ~LIST_BLOCK^2 floats whatever
        # the list's size (k-means lists are uneven: up to 70x the mean measured at 100k)
        for c0 in range(0, len(cand), LIST_BLOCK):
            cb = cand[c0 : c0 + LIST_BLOCK]
            cv = vectors.take(cb)
            c_sq = np.einsum("ij,ij->i", cv, cv)
            for m0 in range(0, len(members), LIST_BLOCK):
                sl = slice(m0, m0 + LIST_BLOCK)
                sq = (qv[sl] @ cv.T) * -2.0
                sq += q_sq[sl, None]
                sq += c_sq[None, :]
                np.maximum(sq, 0.0, out=sq)
                sq[members[sl, None] == cb[None, :]] = np.inf  # not itself
                d = sq.astype(np.float64)
                close = np.argwhere(d < NEAR_DUPLICATE * (q_sq[sl, None] + c_sq[None, :]))
                for a, b in close:  # rare: recompute without cancellation
                    d[a, b] = sq_distances(qv[m0 + a], cv[b : b + 1])[0]
                d[members[sl, None] == cb[None, :]] = np.inf
                cd = np.concatenate([best_d[sl], d], axis=1)
                ci = np.concatenate([best_i[sl], np.broadcast_to(cb, d.shape)], axis=1)
                keep = min(kk, cd.shape[1])
                short = np.argpartition(cd, keep - 1, axis=1)[:, :keep]
                nd, ni = np.take_along_axis(cd, short, 1), np.take_along_axis(ci, short, 1)
                if m0 == 0:
                    new_d = np.empty((len(members), keep))
                    new_i = np.empty((len(members), keep), dtype=np.int64)
                new_d[sl], new_i[sl] = nd, ni
            best_d, best_i = new_d, new_i
        order = np.lexsort((best_i, best_d), axis=1)
        rows = members - part.start
        w = best_d.shape[1]
        idx[rows, :w] = np.take_along_axis(best_i, order, 1)
        dist[rows, :w] = np.sqrt(np.take_along_axis(best_d, order, 1))
        if j % 50 == 0:
            vectors.release()
            if log and j % 500 == 0:
                log(f"lists {j}/{len(part.centroids)}")
    idx[~np.isfinite(dist)] = -1
    return idx, dist


@dataclass
class ReducedIndex:
    """Projection, candidate parts, lifted graph, sigma and the mapped full vectors."""

    projection: Projection
    parts: list
    vectors: VectorParts
    sigma_raw: np.ndarray  # (n,) float64 before the floor
    knn_idx: np.ndarray | None = None  # writers only (insert); (n, SIGMA_K)
    knn_dist: np.ndarray | None = None
    lift: LF.Lift | None = None
    entries: dict = field(default_factory=dict)  # manifest entries of the files
    #: after `append`: the rows whose neighbour list it changed and the appended rows
    changed_rows: np.ndarray | None = None
    #: buffers that knn_idx / knn_dist are the first rows of (`open(spare_rows=...)`):
    #: an append writes its rows there instead of copying every list (480 MB at 1M)
    list_room: tuple[np.ndarray, np.ndarray] | None = None
    #: after `append`: the changed rows' lists before it (what the list patch replays on)
    replaced_lists: tuple[np.ndarray, np.ndarray] | None = None
    _scan: tuple | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.sigma = R.floor_sigma(self.sigma_raw)

    @property
    def n(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.dim

    # -- building -------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        vectors: VectorParts,
        *,
        rank: int = DEFAULT_RANK,
        ann: str = "ivf",
        lift: bool = True,
        lists: str = "full",
        log: Any = None,
        root: Path | None = None,
        tag: str | None = None,
        dtype: str = "float32",
        balanced: bool = True,
    ) -> ReducedIndex:
        """Everything from the full vectors: fit, project, candidate index, lists,
        sigma, lifted graph (what a compaction does). Memory: the reduced vectors (n x
        (rank + 1) float32, twice) and the index; the full vectors are streamed.

        With `root` and `tag`, an IVF build writes the index's own vector file
        (`index/vectors-<tag>.npy`, `dtype`) in IVF order as soon as the lists are known,
        reading `vectors` sequentially (`write_permuted`), and computes the neighbour
        lists from it: each list and its neighbour lists are then contiguous ranges of
        the file, read sequentially, where `vectors` in row order would be read at
        random (a disk read a row once the file outgrows the page cache). Without
        them, `save` writes that file. `dtype` float16 rounds the keys before they are
        projected, so that reduced distances bound the stored keys' distances.
        `balanced=False` keeps k-means' uneven lists (the benchmark's before/after)."""
        say = log or (lambda *_: None)
        n = len(vectors)
        # the vector files it reads are the index's own (save() writes no second copy)
        # unless the index wants them in IVF order (below)
        files = vectors.files
        entries = {"vectors": [m.entry for m in files]} if len(files) == len(vectors.parts) else {}
        half = dtype == "float16"
        proj = Projection.fit(_rounded(vectors.take(fit_sample_rows(n)), half), rank)
        vectors.release()
        say("fitted projection")
        g = np.empty((n, proj.rank + 1), dtype=np.float32)
        for rows, block in vectors.row_chunks():
            g[rows] = proj.graph_vectors(_rounded(block, half))
        say("projected")
        eng = cls(proj, [], vectors, np.ones(n), entries=entries)
        if ann == "hnsw":
            eng.parts = [HnswPart(build_graph(g), 0, n)]
        elif n >= MIN_IVF_KEYS:
            cent, offsets, labels, order = IVFPart.build(g, balanced=balanced)
            eng.parts = [IVFPart(cent, offsets, labels, g[order], 0, n)]
        else:
            eng.parts = [FlatPart(g, 0, n)]
        say("index")
        if isinstance(eng.parts[0], IVFPart) and root is not None and tag is not None:
            eng.vectors = eng.write_ordered(root, tag, dtype)
            vectors.release()
            vectors = eng.vectors
            say("ordered")
        if isinstance(eng.parts[0], IVFPart) and lists == "reduced":
            # sigma from reduced-space distances (underestimates it): for when the full
            # vectors cannot be read in random order fast enough (benchmarks/README.md)
            idx, dist = ivf_lists(eng.parts[0], VectorParts([g]), log=say)
        elif isinstance(eng.parts[0], IVFPart):
            idx, dist = ivf_lists(eng.parts[0], vectors, log=say)
        elif n <= 2 * MIN_IVF_KEYS:
            idx, dist = R.knn_lists(vectors.take(np.arange(n)), R.SIGMA_K)
        else:
            idx, dist = NB.knn_lists_ann(RerankedParts(eng), vectors.take(np.arange(n)), R.SIGMA_K)
        eng.knn_idx, eng.knn_dist = idx, dist
        eng.set_sigma(R.sigma_raw_from_knn(dist))
        vectors.release()
        say("lists")
        if lift and n >= 2:
            eng.lift = eng.build_lift(g)
            say("lift")
        return eng

    def write_ordered(self, root: Path, tag: str, dtype: str = "float32") -> VectorParts:
        """Write the base vectors in the IVF part's order as `index/vectors-<tag>.npy`
        (the entry records `"order": "ivf"`), map it and return it as VectorParts; the
        index's `vectors` entry becomes that file."""
        part = self.parts[0]
        if not isinstance(part, IVFPart) or part.start != 0 or part.stop != self.n:
            raise ValueError("an IVF-ordered vector file needs one IVF part over every key")
        order = part.labels - part.start
        rel = f"index/vectors-{tag}.npy"
        (root / "index").mkdir(parents=True, exist_ok=True)
        ent = dict(write_permuted(root / rel, self.vectors, order, dtype), path=rel, order="ivf")
        m = open_vectors(root / rel, ent)
        self.entries["vectors"] = [ent]
        return VectorParts([m.array], [m], [order])

    def set_sigma(self, sigma_raw: np.ndarray) -> None:
        self.sigma_raw = np.asarray(sigma_raw, dtype=np.float64)
        self.sigma = R.floor_sigma(self.sigma_raw)
        self._scan = None

    def build_lift(self, graph_rows: np.ndarray | None = None) -> LF.Lift:
        """The lifted graph of the LIFT_FRACTION largest sigmas, in the reduced space."""
        rows = LF.lift_members(self.sigma)
        if graph_rows is None:
            g = self.projection.graph_vectors(self.vectors.take(rows))
        else:
            g = graph_rows[rows]
        keys = Projection.lift_key_vectors(g)
        params = LF.lift_params(keys, self.sigma[rows])
        index = build_graph(LF.lift_keys(keys, self.sigma[rows], params), M=LF.LIFT_M)
        return LF.Lift(index, rows, params)

    def graph_rows(self, rows: np.ndarray) -> np.ndarray:
        """The reduced (graph) vectors of `rows`, as the parts store them (an IVF or
        flat part: one small row each; an hnsw part: its graph's copy), projected from
        the full vectors for rows no part holds."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.projection.rank + 1), dtype=np.float32)
        done = np.zeros(len(rows), dtype=bool)
        for p in self.parts:
            sel = np.flatnonzero((rows >= p.start) & (rows < p.stop))
            if len(sel):
                out[sel] = p.graph_vectors(rows[sel])
                done[sel] = True
        if not done.all():
            out[~done] = self.projection.graph_vectors(self.vectors.take(rows[~done]))
        return out

    # -- exact re-rank ----------------------------------------------------------------

    def exact_topk(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query the k nearest of its batch's candidate rows by full-width squared
        distance: (labels (m, k) int64, squared distances (m, k) float64), -1 / inf padded.

        Queries go _TOPK_BATCH at a time: the batch's candidates are gathered once (each
        row read and converted once) and compared with every query of the batch by one
        GEMM, so a query may find more than its own candidates. As for the neighbour
        lists at build (`ivf_lists`), the GEMM form is relatively exact to ~1e-6 except
        for near-duplicates, which are recomputed by `sq_distances`.
        """
        m, f = cand.shape
        lab = np.full((m, k), -1, dtype=np.int64)
        sq = np.full((m, k), np.inf)
        for s in range(0, m, _TOPK_BATCH):
            qb = q[s : s + _TOPK_BATCH]
            u = np.unique(cand[s : s + _TOPK_BATCH])
            kk = min(k, len(u))
            if kk <= 0:
                continue
            u, v = self.vectors.take_stored(u)  # any order: ranked, then sorted by (d, row)
            v_sq = np.einsum("ij,ij->i", v, v)
            q_sq = np.einsum("ij,ij->i", qb, qb)
            d32 = (qb @ v.T) * -2.0
            d32 += q_sq[:, None]
            d32 += v_sq[None, :]
            np.maximum(d32, 0.0, out=d32)
            d32 = _finite(d32)
            short = np.argpartition(d32, kk - 1, axis=1)[:, :kk] if kk < len(u) else None
            if short is None:
                short = np.broadcast_to(np.arange(len(u)), (len(qb), len(u)))
            d = np.take_along_axis(d32, short, 1).astype(np.float64)
            ci = u[short]
            a, b = np.nonzero(d < NEAR_DUPLICATE * (q_sq[:, None] + v_sq[short]))
            if len(a):  # recompute without cancellation (an insert: each key and itself)
                diff = v[short[a, b]] - qb[a]
                d[a, b] = _finite(np.einsum("ij,ij->i", diff, diff).astype(np.float64))
            order = np.lexsort((ci, d), axis=1)
            lab[s : s + len(qb), :kk] = np.take_along_axis(ci, order, 1)
            sq[s : s + len(qb), :kk] = np.take_along_axis(d, order, 1)
        return lab, sq

    # -- search -----------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int = 5,
        *,
        fetch: int = SEARCH_FETCH,
        nprobe: int = NPROBE,
        scan: int = SIGMA_SCAN,
        use_lift: bool = True,
        lift_fetch: int = LIFT_FETCH,
        corrected: int = CORRECTED_FETCH,
        block: int = RERANK_BLOCK,
    ) -> list[list[tuple[int, float, float]]]:
        """k nearest keys per query by corrected distance: (row, raw L2, corrected).

        Candidates: each part's `fetch` nearest in the reduced space (IVF: among its
        `nprobe` nearest lists) and `corrected` more of those lists by reduced distance /
        sigma, the lifted graph's `lift_fetch`, and every key among the
        `scan` largest sigmas outside the lifted graph that the reduced-space bound cannot
        exclude; re-ranked exactly on the full vectors (`sq_distances`), `block` at a
        time while their lower bounds can still win (`_rerank`; 0: all at once).
        """
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        n = self.n
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        k = min(k, n)
        g = self.projection.graph_vectors(q)
        fetch = min(n, max(fetch, 2 * k))
        with self._lock:  # hnswlib: no concurrent add and query
            cand, bound = candidates(
                self.parts, g, fetch, nprobe, sigma=self.sigma, corrected=corrected
            )
            lift = self.lift if use_lift else None
            if lift is not None:
                f = min(len(lift.rows), max(lift_fetch, k))
                lq = LF.lift_queries(Projection.lift_query_vectors(g), lift.params)
                cand = np.concatenate([cand, lift_candidates(lift, lq, f)], axis=1)
        if cand.size and (cand.min() < 0 or cand.max() >= n):
            raise MappedError("index labels out of range")
        if bound is not None:
            bound = bound * (1.0 - 1e-5)
        out = []
        for i in range(len(q)):
            rows, raw, corr = self._rerank(q[i], g[i], np.unique(cand[i]), k, block)
            if bound is not None and scan > 0:
                kth = float(np.partition(corr, k - 1)[k - 1])
                extra = self._scan_rows(g[i], bound[i] / kth if kth > 0 else np.inf, kth, scan)
                extra = extra[~np.isin(extra, rows)]
                if len(extra):
                    extra, xraw = self._exact(q[i], extra, 0)
                    rows = np.concatenate([rows, extra])
                    raw = np.concatenate([raw, xraw])
                    corr = np.concatenate([corr, xraw / self.sigma[extra]])
            order = np.lexsort((rows, corr))[:k]
            out.append([(int(rows[j]), float(raw[j]), float(corr[j])) for j in order])
        return out

    def _rerank(
        self, q: np.ndarray, g: np.ndarray, rows: np.ndarray, k: int, block: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, raw L2, corrected) of the candidate `rows` that can be among the k
        nearest by corrected distance, exactly on the full vectors.

        A candidate's reduced distance / sigma bounds its corrected distance from below
        (the graph space is a contraction of full-width L2, projection.py), so the
        `block` candidates of the lowest bounds are re-ranked first, then, as one more
        block, those of the rest whose bound does not exceed the k-th corrected
        distance found: the same k nearest as re-ranking every candidate, from fewer
        row reads where the bounds spread (benchmarks/README.md, "Search at 1M x 4,480,
        session 31"). The slack covers float32 rounding of the bound (as `_scan_rows`)."""
        if block <= 0 or len(rows) <= block:  # one block of every candidate
            rows, raw = self._exact(q, rows, 0)
            return rows, raw, raw / self.sigma[rows]
        d = self.graph_rows(rows) - g
        lower = np.sqrt(np.einsum("ij,ij->i", d, d)) / self.sigma[rows]
        lower = np.where(np.isnan(lower), -np.inf, lower)  # a damaged value prunes nothing
        order = np.argsort(lower, kind="stable")
        first, rest = order[:block], order[block:]
        r1, raw1 = self._exact(q, rows[first], block)
        corr1 = raw1 / self.sigma[r1]
        # the k-th after the first block only falls with more rows: what it excludes
        # now stays excluded, so the rest that can still win is read as one block
        kth = float(np.partition(corr1, k - 1)[k - 1]) if len(corr1) >= k else np.inf
        rest = rest[lower[rest] <= kth * (1.0 + 1e-3) + 1e-6]
        if not len(rest):
            return r1, raw1, corr1
        r2, raw2 = self._exact(q, rows[rest], 0)
        return (
            np.concatenate([r1, r2]),
            np.concatenate([raw1, raw2]),
            np.concatenate([corr1, raw2 / self.sigma[r2]]),
        )

    def _exact(self, q: np.ndarray, rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows as stored, their exact L2 to q), read `block` rows at a time into one
        buffer (`VectorParts.stored_blocks`; 0: all in one)."""
        size = block if block > 0 else max(len(rows), 1)
        got = [
            (r, sq_distances(q, vecs, overwrite=True))
            for r, vecs in self.vectors.stored_blocks(rows, size)
        ]
        if not got:
            return np.asarray(rows, dtype=np.int64)[:0], np.empty(0)
        return np.concatenate([g[0] for g in got]), np.sqrt(
            _finite(np.concatenate([g[1] for g in got]))
        )

    def _scan_rows(self, g: np.ndarray, limit: float, kth: float, cap: int) -> np.ndarray:
        """Rows among the `cap` largest sigmas outside the lifted graph with sigma >
        `limit` whose corrected distance may be <= kth, screened by their reduced-space
        distance (a lower bound of the full one, so the screen drops no winner)."""
        if self._scan is None or self._scan[0] != cap:
            s = self.sigma.copy()
            if self.lift is not None:
                s[self.lift.rows[self.lift.rows < len(s)]] = -np.inf
            m = min(cap, len(s))
            top = np.argpartition(-s, m - 1)[:m] if m < len(s) else np.arange(len(s))
            top = top[np.argsort(-s[top], kind="stable")]
            top = top[s[top] > -np.inf]
            gv = self.graph_rows(top)
            self._scan = (cap, top, s[top], gv)
        _, order, values, gv = self._scan
        m = int(np.searchsorted(-values, -limit, side="left"))
        if m == 0:
            return order[:0]
        d = gv[:m] - g
        lower = np.sqrt(np.einsum("ij,ij->i", d, d)) / values[:m]
        return order[:m][lower <= kth * (1.0 + 1e-3) + 1e-6]

    def exact_search(self, queries: np.ndarray, k: int = 5) -> list[list[tuple[int, float, float]]]:
        """The same results by brute force over every key (tests, small codebooks)."""
        q = np.asarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(k, self.n)
        out = []
        for i in range(len(q)):
            raw = np.empty(self.n)
            for rows, block in self.vectors.row_chunks():
                raw[rows] = sq_distances(q[i], block)
            raw = np.sqrt(_finite(raw))
            corr = raw / self.sigma
            order = np.lexsort((np.arange(self.n), corr))[:k]
            out.append([(int(j), float(raw[j]), float(corr[j])) for j in order])
        return out

    # -- insert -------------------------------------------------------------------------

    def append(
        self,
        vectors: VectorParts,
        graph_vecs: np.ndarray | None = None,
        new_vectors: np.ndarray | None = None,
    ) -> NB.KnnAppend:
        """Rows n_old.. of `vectors` (the old parts plus a delta part) were appended:
        add their flat part and update neighbour lists and sigma. Returns the list change
        (`deltas.knn_patch` turns it into the delta file). Needs `knn_idx` / `knn_dist`.
        `new_vectors`: those rows as float32, when the caller holds them (not read back)."""
        if self.knn_idx is None or self.knn_dist is None:
            raise ValueError("append needs the neighbour lists (a writer's index)")
        n_old = self.n
        if new_vectors is None or len(new_vectors) != len(vectors) - n_old:
            new_vectors = vectors.take(np.arange(n_old, len(vectors)))
        new = new_vectors
        g = self.projection.graph_vectors(new) if graph_vecs is None else graph_vecs
        self.vectors = vectors
        with self._lock:
            self.parts.append(FlatPart(g, n_old, len(vectors)))
        if not any(isinstance(p, IVFPart) for p in self.parts) and len(vectors) <= 2 * MIN_IVF_KEYS:
            # a flat engine's lists are exact (as `build` makes them): keep them exact,
            # as the store's own lists are (so both give the same sigma, tau, answers)
            old = vectors.take(np.arange(n_old))
            idx, dist = NB.update_knn_lists(old, self.knn_idx, self.knn_dist, new, R.SIGMA_K)
            app = DL.knn_append_from_full(self.knn_idx, self.knn_dist, idx, dist)
        else:
            with one_thread():  # threaded BLAS stalled this 4x on the shared 2-core machine
                app = NB.append_knn_ann(
                    RerankedParts(self, known=(new, g)), new, self.knn_idx, self.knn_dist,
                    reverse_fetch=REVERSE_FETCH,
                )  # fmt: skip
        # what the list patch needs of the old lists, before they change in place
        self.replaced_lists = (self.knn_idx[app.rows].copy(), self.knn_dist[app.rows].copy())
        self.knn_idx, self.knn_dist = self._apply_lists(app)
        raw = np.concatenate([self.sigma_raw, np.ones(len(new))])
        changed = np.concatenate([app.rows, np.arange(n_old, len(vectors))])
        self.changed_rows = changed  # the lists this insert changed (the store's tau cache)
        raw[changed] = R.sigma_raw_from_knn(self.knn_dist[changed])
        self.set_sigma(raw)
        return app

    def _apply_lists(self, app: NB.KnnAppend) -> tuple[np.ndarray, np.ndarray]:
        """The lists after `app`: written into `list_room` when it has the rows (no
        copy of the old lists), else new arrays (`KnnAppend.apply`)."""
        assert self.knn_idx is not None and self.knn_dist is not None
        n_old, n_new = len(self.knn_idx), len(self.knn_idx) + len(app.new_idx)
        room = self.list_room
        if room is None or len(room[0]) < n_new or self.knn_idx.base is not room[0]:
            return app.apply(self.knn_idx, self.knn_dist)
        idx, dist = room[0][:n_new], room[1][:n_new]
        idx[n_old:], dist[n_old:] = app.new_idx, app.new_dist
        idx[app.rows], dist[app.rows] = app.rows_idx, app.rows_dist
        return idx, dist

    def append_files(
        self, root: Path, tag: str, new_vectors: np.ndarray, *, dtype: str = "float32",
    ) -> dict:  # fmt: skip
        """Insert `new_vectors` and write only what the insert adds: a delta vector file,
        the reduced vectors of the new flat part, and the sigma and list patches
        (`deltas.py` formats). Existing files stay as they are. Returns the entries."""
        n_old = self.n
        new = np.asarray(new_vectors, dtype=np.float32)
        rel = f"index/vectors-delta-{tag}.npy"
        ent = dict(write_vectors(root / rel, [new], len(new), self.dim, dtype), path=rel)
        open_vectors(root / rel, ent)  # what was written opens (header, size)
        g = self.projection.graph_vectors(new)
        grel = f"index/reduced-delta-{tag}.npy"
        gent = dict(write_vectors(root / grel, [g], len(g), g.shape[1]), path=grel)
        # the new rows are read from memory (the values the file holds), not from the
        # file: the re-rank gathers each new key ~40 times (5,000 keys into 100k x 4,480:
        # 194,000 of its 228,000 row reads)
        held = _rounded(new, dtype == "float16")
        parts = self.vectors.with_part(held)
        app = self.append(parts, g, held)
        assert self.replaced_lists is not None
        patch = DL.knn_patch(app, n_old, *self.replaced_lists)
        if patch is None:
            raise ValueError("neighbour-list patch does not replay (write a new base)")
        changed = np.concatenate([app.rows, np.arange(n_old, self.n)])
        e = self.entries
        e["vectors"] = [*e["vectors"], ent]
        e["parts"] = [*e["parts"], {"kind": "flat", "start": n_old, "stop": self.n, "vecs": gent}]
        # rows / entries: what the store's DerivedIndex reads these same files by
        # (store/engine.py store_layout: the engine's lists are the store's)
        sig = DL.sigma_patch(self.sigma_raw, changed)
        e["deltas"]["sigma"].append(
            dict(_write_npy(root, f"index/rsigma-delta-{tag}.npy", sig), keys=self.n,
                 rows=len(sig))
        )  # fmt: skip
        e["deltas"]["knn"].append(
            dict(_write_npy(root, f"index/rknn-delta-{tag}.npy", patch), keys=self.n,
                 entries=len(patch))
        )  # fmt: skip
        e["keys"] = self.n
        return e

    # -- files --------------------------------------------------------------------------

    def save(self, root: Path, tag: str, *, dtype: str = "float32") -> dict:
        """Write every file under root/index/ (the full vectors too unless they are
        already one base file there) and return their manifest entries."""
        (root / "index").mkdir(parents=True, exist_ok=True)
        e: dict[str, Any] = {}
        ivf = isinstance(self.parts[0], IVFPart) and len(self.parts) == 1
        own = self.entries.get("vectors") or []
        if len(own) == 1 and (own[0].get("order") == "ivf") == ivf:
            e["vectors"] = own
        elif ivf:
            self.vectors = self.write_ordered(root, tag, dtype)
            e["vectors"] = self.entries["vectors"]
        else:
            rel = f"index/vectors-{tag}.npy"
            chunks = (b for _, b in self.vectors.chunks())
            ent = write_vectors(root / rel, chunks, self.n, self.dim, dtype)
            e["vectors"] = [dict(ent, path=rel)]
        e["projection"] = _write_npy(
            root,
            f"index/proj-{tag}.npy",
            self.projection.to_array(),
        )
        e["sigma"] = dict(_write_npy(root, f"index/rsigma-{tag}.npy", self.sigma_raw), rows=self.n)
        if self.knn_idx is not None and self.knn_dist is not None:
            e["knn_idx"] = _write_npy(root, f"index/rknn_idx-{tag}.npy", self.knn_idx)
            e["knn_dist"] = _write_npy(root, f"index/rknn_dist-{tag}.npy", self.knn_dist)
        e["parts"] = [self._save_part(p, root, f"{tag}-{j}") for j, p in enumerate(self.parts)]
        if self.lift is not None:
            e["lift_hnsw"] = save_graph(self.lift.index, root, f"index/rlift-{tag}.bin")
            e["lift_rows"] = _write_npy(root, f"index/rlift-rows-{tag}.npy", self.lift.rows)
            e["lift_params"] = _write_npy(
                root,
                f"index/rlift-params-{tag}.npy",
                self.lift.params,
            )
        e["keys"], e["dim"], e["rank"] = self.n, self.dim, self.projection.rank
        e["deltas"] = {"sigma": [], "knn": []}
        self.entries = e
        return e

    @staticmethod
    def _save_part(p: Any, root: Path, tag: str) -> dict:
        base = {"start": p.start, "stop": p.stop}
        if isinstance(p, HnswPart):
            return {
                **base,
                "kind": "hnsw",
                "graph": save_graph(p.index, root, f"index/rgraph-{tag}.bin"),
            }
        rel = f"index/reduced-{tag}.npy"
        vecs = dict(write_vectors(root / rel, [p.vecs], len(p.vecs), p.vecs.shape[1]), path=rel)
        if isinstance(p, FlatPart):
            return {**base, "kind": "flat", "vecs": vecs}
        return {
            **base,
            "kind": "ivf",
            "lists": len(p.centroids),
            "vecs": vecs,
            "centroids": _write_npy(root, f"index/ivf-centroids-{tag}.npy", p.centroids),
            "lists_index": _write_npy(
                root,
                f"index/ivf-lists-{tag}.npy",
                np.concatenate([p.offsets, p.labels]),
            ),
        }

    @classmethod
    def open(
        cls,
        root: Path,
        entries: dict,
        *,
        lists: bool = False,
        full_check: bool = False,
        lift: str = "load",
        spare_rows: int = 0,
    ):
        """Map and load what a search needs (lists too for a writer), each file verified:
        small files by sha256, the mapped files and the neighbour lists by size, header
        and mtime, hnsw graphs by size, mtime and hnswlib's structure (`load_graph`);
        rehashed in full with full_check (`doctor`) or when the mtime is not the
        recorded one. Raises MappedError.

        lift "verify" (a writer, which never searches): the lifted graph's file is
        checked (`verify_graph_file`) but not loaded into hnswlib (`lift` stays None;
        its entries are kept as they are). At a million keys loading it is a 72 MB
        hnswlib load on every insert.

        spare_rows (a writer that will append that many keys): the lists are read into
        buffers with room for them (`list_room`), so the append writes in place."""
        try:
            return cls._open(
                root, entries, lists=lists, full_check=full_check, lift=lift, spare=spare_rows
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            if isinstance(e, MappedError):
                raise
            raise MappedError(f"derived entries: {e}") from e

    @classmethod
    def verify(cls, root: Path, entries: dict) -> list[str]:
        """What `doctor` reports: every file rehashed in full, every delta replayed;
        [] when all is well, else one line naming what is damaged."""
        try:
            cls.open(root, entries, lists=True, full_check=True)
        except MappedError as e:
            return [f"derived cache: {e}"]
        return []

    @classmethod
    def _open(
        cls, root: Path, entries: dict, *, lists: bool, full_check: bool, lift: str, spare: int = 0
    ):
        n, dim = int(entries["keys"]), int(entries["dim"])
        try:
            proj = Projection.from_array(_read_npy(root, entries["projection"]))
        except ValueError as e:
            raise MappedError(f"projection: {e}") from e
        if proj.dim != dim:
            raise MappedError("projection width differs from the keys'")
        gdim = proj.rank + 1
        parts = [_open_part(root, pe, gdim, n, full_check) for pe in entries["parts"]]
        if not GR.graphs_cover(parts, n):  # duck-typed: start / stop
            raise MappedError("index parts do not cover every key")
        orders: list[np.ndarray | None] = []
        for ve in entries["vectors"]:
            if ve.get("order") is None:
                orders.append(None)
                continue
            base = parts[0]  # the only order: the base file in its IVF part's order
            if (ve.get("order") != "ivf" or orders or not isinstance(base, IVFPart)
                    or base.start != 0 or base.size != int(ve["rows"])):  # fmt: skip
                raise MappedError("vector file order does not match the IVF part")
            orders.append(base.labels)
        vectors = open_parts(root, entries["vectors"], full_check=full_check, orders=orders)
        if len(vectors) != n or vectors.dim != dim:
            raise MappedError("vector files do not cover every key")
        deltas = entries.get("deltas") or {}
        base_rows = int(entries["sigma"].get("rows", n))
        sigma_raw = _read_npy(root, entries["sigma"], (base_rows,), np.float64)
        if not (np.isfinite(sigma_raw).all() and (sigma_raw >= 0).all()):
            raise MappedError("sigma values")
        try:
            for de in deltas.get("sigma") or []:
                patch = _read_npy(root, de, None, DL.SIGMA_PATCH_DTYPE)
                sigma_raw = DL.apply_sigma_patch(sigma_raw, patch, int(de["keys"]))
        except ValueError as e:
            raise MappedError(f"sigma delta: {e}") from e
        if len(sigma_raw) != n:
            raise MappedError("sigma files do not cover every key")
        eng = cls(proj, parts, vectors, sigma_raw, entries=entries)
        if entries.get("lift_hnsw"):
            rows = _read_npy(root, entries["lift_rows"], None, np.int64)
            params = _read_npy(root, entries["lift_params"], None, np.float64)
            if rows.ndim != 1 or not LF.valid_lift(rows, params, n, proj.rank + 2):
                raise MappedError("lift rows or params")
            if lift == "verify" and not full_check:
                verify_graph_file(root, entries["lift_hnsw"], proj.rank + 5, len(rows))
            else:
                eng.lift = LF.Lift(
                    load_graph(root, entries["lift_hnsw"], proj.rank + 5, len(rows),
                               full_check=full_check), rows, params,
                )  # fmt: skip
        if lists:
            room = _open_lists(root, entries, base_rows, n, full_check, spare)
            eng.knn_idx, eng.knn_dist = room[0][:n], room[1][:n]
            eng.list_room = room if spare > 0 else None
        return eng


def _open_part(root: Path, pe: dict, gdim: int, n: int, full_check: bool) -> Any:
    a, b = int(pe["start"]), int(pe["stop"])
    if not 0 <= a <= b <= n:
        raise MappedError("index part rows out of range")
    if pe["kind"] == "hnsw":
        graph = load_graph(root, pe["graph"], gdim, b - a, full_check=full_check, first_label=a)
        return HnswPart(graph, a, b)
    vecs = open_vectors(root / pe["vecs"]["path"], pe["vecs"], full_check=full_check).array
    if vecs.shape != (b - a, gdim) or vecs.dtype != np.float32:
        raise MappedError("reduced vectors have the wrong shape")
    if pe["kind"] == "flat":
        return FlatPart(vecs, a, b)
    if pe["kind"] != "ivf":
        raise MappedError(f"unknown index part {pe['kind']!r}")
    c = int(pe["lists"])
    cent = _read_npy(root, pe["centroids"], (c, gdim), np.float32)
    li = _read_npy(root, pe["lists_index"], (c + 1 + b - a,), np.int64)
    offsets, labels = li[: c + 1], li[c + 1 :]
    if not np.isfinite(cent).all() or not valid_ivf(offsets, labels, a, b, c):
        raise MappedError("IVF lists are inconsistent")
    return IVFPart(cent, offsets, labels, vecs, a, b)


def _open_lists(
    root: Path, entries: dict, base_rows: int, n: int, full_check: bool, spare: int = 0
):
    """The neighbour lists (n + spare, SIGMA_K) after every patch (the spare rows
    empty): the base files read straight into the arrays, checked by size and mtime
    (`read_stamped`), then the patches (small: sha256) replayed. Only rows the files do
    not fill are initialised (at a million keys np.full cost 0.56 s of an insert)."""
    k = R.SIGMA_K
    idx, dist = np.empty((n + spare, k), np.int64), np.empty((n + spare, k))
    idx[base_rows:], dist[base_rows:] = -1, np.inf
    read_stamped(root, entries["knn_idx"], idx[:base_rows], full_check=full_check)
    read_stamped(root, entries["knn_dist"], dist[:base_rows], full_check=full_check)
    # what a check by size and mtime cannot exclude (bytes changed in place, the mtime
    # put back) must not reach an index: neighbours in range, distances >= 0 (no NaN)
    if base_rows and (idx[:base_rows].min() < -1 or idx[:base_rows].max() >= n):
        raise MappedError(f"{entries['knn_idx']['path']}: neighbours out of range")
    if base_rows and not (dist[:base_rows] >= 0).all():
        raise MappedError(f"{entries['knn_dist']['path']}: distances are not >= 0")
    cur = base_rows
    try:
        for de in (entries.get("deltas") or {}).get("knn") or []:
            patch = _read_npy(root, de, None, DL.KNN_PATCH_DTYPE)
            DL.apply_knn_patch(idx, dist, cur, patch, int(de["keys"]))
            cur = int(de["keys"])
    except ValueError as e:
        raise MappedError(f"knn delta: {e}") from e
    if cur != n:
        raise MappedError("list files do not cover every key")
    return idx, dist


# -- file helpers (phase 1: the store's file seam replaces these when integrated) -----


def _write_npy(root: Path, rel: str, arr: np.ndarray) -> dict:
    """Write arr as `.npy` atomically; the entry records size, sha256 and the mtime
    after the rename (which `read_stamped` compares; other readers rehash)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    data = buf.getvalue()
    with replaced(root / rel) as tmp, open(tmp, "xb") as f:
        f.write(data)
    st = os.stat(root / rel)
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "mtime_ns": st.st_mtime_ns}  # fmt: skip


def read_stamped(root: Path, entry: dict, out: np.ndarray, *, full_check: bool = False) -> bool:
    """Read a `.npy` file (header: out's dtype and shape, C order) straight into `out`,
    verified before use: a regular file (no symlink) of the recorded size and header.
    Its bytes are hashed only with full_check (`doctor`), when the entry records no
    `mtime_ns` (files written before this check) or when the file's mtime is not the
    recorded one; a file that then matches its sha256 gets its mtime recorded in
    `entry` (a writer's entries are the next manifest's: later opens are cheap).
    Returns whether it hashed. Raises MappedError.

    Why: the neighbour lists are the writer's largest read (1M keys: 2 x 240 MB), and
    hashing them on every insert was ~0.5 s of CPU plus two copies. What the size and
    mtime cannot catch (bytes changed in place with the mtime put back) the callers
    range-check (`_open_lists`); docs/codebook-format.md says what it can do.
    """
    rel = entry["path"]
    if not out.flags.c_contiguous:
        raise ValueError("read_stamped needs a C-contiguous array")
    try:
        fd = open_regular(root / rel, rel)
    except OSError as e:
        raise MappedError(f"{rel}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if st.st_size != int(entry["bytes"]):
            raise MappedError(f"{rel} has {st.st_size} bytes, the manifest says {entry['bytes']}")
        head = os.pread(fd, min(4096, st.st_size), 0)
        shape, fortran, dt, offset = parse_npy_header(head, rel)
        if fortran or dt != out.dtype or shape != out.shape:
            raise MappedError(f"{rel} has the wrong dtype or shape")
        if offset + out.nbytes != st.st_size:
            raise MappedError(f"{rel}: header and size disagree")
        buf = out.reshape(-1).view(np.uint8).data
        at = 0
        while at < out.nbytes:
            got = os.preadv(fd, [buf[at:]], offset + at)
            if got <= 0:
                raise MappedError(f"{rel} is truncated")
            at += got
        hashed = _stale(entry, st, full_check)
        if hashed:
            h = hashlib.sha256(head[:offset])
            h.update(buf)
            if h.hexdigest() != entry["sha256"]:
                raise MappedError(f"{rel} is damaged (checksum mismatch)")
            entry["mtime_ns"] = st.st_mtime_ns
        return hashed
    except OSError as e:
        raise MappedError(f"{rel}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _read_npy(root: Path, entry: dict, shape: tuple | None = None, dtype: Any = None) -> np.ndarray:
    try:
        fd = os.open(root / entry["path"], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise MappedError(f"{entry['path']} is not a regular file")
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise MappedError(f"{entry['path']} is damaged (checksum mismatch)")
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except MappedError:
        raise
    except (OSError, ValueError, KeyError, EOFError, TypeError) as e:
        raise MappedError(f"{entry.get('path')}: {e}") from e
    if (dtype is not None and arr.dtype != np.dtype(dtype)) or (
        shape is not None and arr.shape != shape
    ):
        raise MappedError(f"{entry['path']} has the wrong dtype or shape")
    return arr


def save_graph(index: Any, root: Path, rel: str) -> dict:
    """save_index to a temp name, hash, fsync, rename; the entry records size and mtime."""
    path = root / rel
    h = hashlib.sha256()
    with replaced(path) as tmp:
        index.save_index(str(tmp))
        with open(tmp, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    st = os.stat(path)
    return {
        "path": rel,
        "bytes": st.st_size,
        "sha256": h.hexdigest(),
        "mtime_ns": st.st_mtime_ns,
        "count": int(index.get_current_count()),
    }


def _check_graph(fd: int, entry: dict, dim: int, count: int, first_label: int) -> os.stat_result:
    """The graph file open on fd has the entry's size and hnswlib's structure for `count`
    keys of `dim` (`hnswfile.check_hnsw`); returns its stat."""
    rel = entry["path"]
    st = os.fstat(fd)
    if st.st_size != int(entry["bytes"]):
        raise MappedError(f"{rel} has {st.st_size} bytes, the manifest says {entry['bytes']}")
    check_hnsw(fd, rel, dim=dim, count=count, first_label=first_label)
    return st


def _stale(entry: dict, st: os.stat_result, full_check: bool) -> bool:
    """Whether a file checked by size and mtime is hashed: with full_check, or when the
    entry records no mtime or another one (`read_stamped`, the graph files)."""
    stamp = entry.get("mtime_ns")
    return full_check or stamp is None or st.st_mtime_ns != int(stamp)


def _fd_path(fd: int, path: Path) -> str:
    """A name that opens the file fd has open (Linux: /proc/self/fd), so that hnswlib
    loads the file that was checked, not one renamed over it since; else path."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else str(path)


def verify_graph_file(
    root: Path, entry: dict, dim: int, count: int, *, first_label: int = 0
) -> bool:
    """A graph file the writer keeps without loading it (the lifted graph), checked as
    `read_stamped` checks the neighbour lists: a regular file of the recorded size and
    of hnswlib's structure for these keys (`hnswfile.check_hnsw`: what a later `ask`
    loads in place cannot crash it); hashed only when the entry records no `mtime_ns`
    or another mtime, and a file that then matches its sha256 gets its mtime recorded
    in `entry` (the next manifest's). Returns whether it hashed. Raises MappedError.

    Why: at a million keys the lifted graph is 72 MB; hashing it on every insert took
    0.10 s, the structural check 0.03 s (benchmarks/bench_graph_open.py)."""
    rel = entry["path"]
    try:
        fd = open_regular(root / rel, rel)
        try:
            st = _check_graph(fd, entry, dim, count, first_label)
            hashed = _stale(entry, st, False)
            if hashed:
                if hash_fd(fd) != entry["sha256"]:
                    raise MappedError(f"{rel} is damaged (checksum mismatch)")
                entry["mtime_ns"] = st.st_mtime_ns
            return hashed
        finally:
            os.close(fd)
    except OSError as e:
        raise MappedError(f"{rel}: {e.strerror or e}") from e


def load_graph(
    root: Path, entry: dict, dim: int, count: int, *, full_check: bool = False,
    first_label: int = 0,
) -> Any:  # fmt: skip
    """An hnswlib graph file, verified before hnswlib reads it (hnswlib trusts its input).

    Always: a regular file (no symlink) of the recorded size and of hnswlib's structure
    for `count` keys of `dim` labelled first_label.. (`hnswfile.check_hnsw`: everything
    whose damage could make hnswlib read out of bounds). Then, when the mtime is the
    recorded one, it is loaded in place (the file descriptor that was checked); with
    full_check (`doctor`), without a recorded mtime or with another one, it is hashed
    into a private copy, which is loaded if its sha256 is the recorded one.

    Why: the hash and the copy were 0.63-0.73 s of a ~1 s million-key open (the 72 MB
    lifted graph, under load); the structural check reads the file once, vectorised
    (0.03 s; benchmarks/bench_graph_open.py). Bytes changed in
    place with the mtime put back that pass it can only change what the graph returns
    (docs/codebook-format.md); `doctor` finds them by hash.
    """
    rel = entry["path"]
    path = root / rel
    try:
        fd = open_regular(path, rel)
        try:
            st = _check_graph(fd, entry, dim, count, first_label)
            index = hnswlib.Index(space="l2", dim=dim)
            if _stale(entry, st, full_check):
                _load_hashed(index, fd, entry, count)
            else:
                index.load_index(_fd_path(fd, path), max_elements=max(count, 1))
        finally:
            os.close(fd)
    except MappedError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as e:
        raise MappedError(f"{entry.get('path')}: {e}") from e
    if index.get_current_count() != count:
        raise MappedError(f"{entry['path']} holds {index.get_current_count()} keys, not {count}")
    return index


def _load_hashed(index: Any, fd: int, entry: dict, count: int) -> None:
    """Hash the file on fd into a private copy and load the copy when the hash is the
    recorded one (the copy cannot change between the check and the load)."""
    out_fd, tmp = tempfile.mkstemp(prefix="reasonedit-graph-")
    try:
        h = hashlib.sha256()
        with os.fdopen(out_fd, "wb") as out:
            at = 0
            while block := os.pread(fd, 1 << 24, at):
                h.update(block)
                out.write(block)
                at += len(block)
        if h.hexdigest() != entry["sha256"]:
            raise MappedError(f"{entry['path']} is damaged (checksum mismatch)")
        index.load_index(tmp, max_elements=max(count, 1))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
