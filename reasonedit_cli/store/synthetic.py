"""A synthetic N x D codebook in the real store format (issue 22's scale checks).

`build_synthetic_codebook` writes what `CodebookWriter` would write for N keys, without
going through it: Parquet keys and edits segments (the source of truth), the engine's
files (mapped vectors, reduced index, facts: store/engine.py), the `DerivedIndex`'s
sigma and neighbour-list files (from the engine's lists), tiny real PNG images, and a
checksummed manifest with a real `derived` section (tau by the codebook's rule). The
writer's own path would build a full-width hnsw graph (18 GB, hours at 1M x 4,480);
this one streams the vectors in chunks, so memory stays at the engine build's (the
reduced vectors, ~1 GB at a million keys) whatever D is.

With `config_from` (a real codebook, e.g. made by `add-edit` with the bundled model)
its config is copied and its live keys, edits and images come first, so that `ask`
on that codebook's images retrieves its real facts among N synthetic keys. The
synthetic vectors are a Gaussian mixture scaled to the real keys' per-dimension mean
and spread. What is missing: the full-width hnsw graph (`doctor` notes it; readers use
the engine, which does not need it). `scripts/make_synthetic_codebook.py` is the CLI.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .. import retrieval as R
from ..errors import CodebookError
from . import compat
from . import taucache as TC
from .engine import SEARCH_FETCH, min_keys, store_layout
from .files import atomic_write, mkdirs, unlink
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    EditRecord,
    KeyRecord,
    edits_to_table,
    keys_schema,
    keys_to_table,
    now_iso,
    sha256_hex,
    table_bytes,
)
from .index import DerivedIndex, Lists
from .index import deltas as DL
from .index.facts import write_facts
from .index.mapped import VectorParts, open_vectors, write_vectors
from .index.reduced import MIN_IVF_KEYS, ReducedIndex
from .manifest import manifest_bytes

SEGMENT_ROWS = 50_000  # keys per Parquet segment (a segment is decoded whole)
KEYS_PER_EDIT = 4
EDITS_PER_IMAGE = 1000
CHUNK = 20_000  # rows generated at a time


def _png(i: int) -> bytes:
    from PIL import Image

    img = Image.new("RGB", (8, 8), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256))
    img.putpixel((i % 8, (i // 8) % 8), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Mixture:
    """A seeded Gaussian mixture (CLUSTERS centres, spreads varying by cluster) scaled to
    `mean` / `std` per dimension; `rows(start, count)` is deterministic per start."""

    CLUSTERS = 2048

    def __init__(self, dim: int, seed: int, mean: np.ndarray, std: np.ndarray):
        rng = np.random.default_rng([seed, 1])
        self.cent = rng.normal(size=(self.CLUSTERS, dim)).astype(np.float32)
        self.spread = np.exp(rng.normal(-1.0, 0.35, size=self.CLUSTERS)).astype(np.float32)
        self.dim, self.seed = dim, seed
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)

    def rows(self, start: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, start])
        c = rng.integers(0, self.CLUSTERS, count)
        out = rng.standard_normal(size=(count, self.dim), dtype=np.float32)
        out *= self.spread[c, None]
        out += self.cent[c]
        out *= self.std
        out += self.mean
        return out


def build_synthetic_codebook(
    path: str | Path,
    n: int,
    dim: int | None = None,
    *,
    config_from: str | Path | None = None,
    seed: int = 0,
    dtype: str = "float32",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write a codebook of n keys (the real ones of `config_from` first) at `path`,
    which must not exist; returns a summary (keys, dim, engine, seconds per step).

    `dtype` float16: the engine's mapped vectors are float16 (9 GB instead of 18 GB at
    1M x 4,480), and so are the synthetic keys themselves (drawn, then rounded), so that
    their Parquet rows (float32) and the engine hold the same numbers; the real keys
    stay exact in Parquet and are rounded in the engine only."""
    import time

    from .reader import Codebook

    say = log or (lambda _m: None)
    root = Path(path).expanduser().absolute()
    if root.exists():
        raise CodebookError(f"{root} exists; give a new directory")
    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    config: dict[str, Any] = {"model": "synthetic", "percentile": 25.0, "tau_rule": "images"}
    real_keys: pa.Table | None = None
    real_edits: list[EditRecord] = []
    if config_from is not None:
        src = Codebook.open(config_from)
        config = dict(src.config)
        real_keys = src.keys_table()
        real_edits = src.edits()
    if dim is None:
        dim = int(config.get("dim") or 0) or None
    if not dim:
        raise CodebookError("give --dim (or --config-from a codebook with keys)")
    if config.get("dim") not in (None, dim):
        raise CodebookError(f"{config_from} holds {config['dim']}-d keys, not {dim}-d")
    config["dim"] = dim
    n_real = real_keys.num_rows if real_keys is not None else 0
    if n < n_real:
        raise CodebookError(f"n must be at least the {n_real} keys of {config_from}")
    real_vecs = np.zeros((0, dim), np.float32)
    if real_keys is not None and n_real:
        real_vecs = np.stack(real_keys.column("vector").to_numpy(zero_copy_only=False)).astype(
            np.float32
        )
    mean = real_vecs.mean(0) if n_real >= 2 else np.zeros(dim, np.float32)
    std = real_vecs.std(0) + 1e-3 if n_real >= 2 else np.ones(dim, np.float32)
    n_syn = n - n_real
    n_edits = math.ceil(n_syn / KEYS_PER_EDIT)
    for sub in ("segments", "images", "index", "versions"):
        mkdirs(root / sub)
    if config_from is not None:
        shutil.copytree(Path(config_from) / "images", root / "images", dirs_exist_ok=True)
    shas = []
    for i in range(math.ceil(n_edits / EDITS_PER_IMAGE)):
        data = _png(i)
        sha = sha256_hex(data)
        atomic_write(root / "images" / sha[:2] / f"{sha}.png", data)
        shas.append(sha)

    mix = Mixture(dim, seed, mean, std)

    def chunks() -> Iterator[tuple[int, np.ndarray]]:
        if n_real:
            yield 0, real_vecs
        for s in range(0, n_syn, CHUNK):
            yield n_real + s, mix.rows(s, min(CHUNK, n_syn - s))

    # 1. the keys in row order (streamed; the segments below are cut from them), then the
    # engine over them, which writes its own vector file in IVF order (sequential reads
    # for its neighbour lists); the row-order file is deleted once the segments exist
    use_engine = n >= min_keys() and config.get("tau_rule") != "reference"
    ordered = use_engine and n >= MIN_IVF_KEYS  # fewer keys: one flat part, row order
    rel = "index/synthetic-input-vectors.npy" if ordered else "index/vectors-000001.npy"
    if dtype not in ("float32", "float16"):
        raise CodebookError(f"dtype must be float32 or float16, not {dtype!r}")
    ent = dict(write_vectors(root / rel, (b for _, b in chunks()), n, dim, dtype), path=rel)
    steps["vectors"] = time.perf_counter() - t0
    say(f"vectors written ({steps['vectors']:.0f} s)")
    m = open_vectors(root / rel, ent)
    eng = ReducedIndex.build(
        VectorParts([m.array], [m]),
        lift=n > SEARCH_FETCH,
        log=say,
        root=root if ordered else None,
        tag="000001" if ordered else None,
        dtype=dtype,
    )
    steps["engine"] = time.perf_counter() - t0 - sum(steps.values())
    say(f"engine built ({steps['engine']:.0f} s)")
    # 2. Parquet segments: the real keys, then the synthetic ones in SEGMENT_ROWS pieces
    now = dt.datetime.now(dt.timezone.utc)
    segments, facts = [], []

    def segment(kind: str, table: pa.Table, j: int) -> None:
        data = table_bytes(table)
        rel = f"segments/{kind}-000001-{j:05d}.parquet"
        atomic_write(root / rel, data)
        segments.append(
            {"kind": kind, "path": rel, "sha256": sha256_hex(data), "rows": table.num_rows,
             "bytes": len(data), "version": 1}
        )  # fmt: skip

    edits = list(real_edits)
    for e in range(n_edits):
        edits.append(
            EditRecord(f"syn{e:07d}", shas[e // EDITS_PER_IMAGE], f"synthetic question {e}?",
                       f"answer {e}", [f"Synthetic fact {e}."], None, "synthetic")
        )  # fmt: skip
    segment("edits", edits_to_table(edits, now), 0)
    j = 0
    if real_keys is not None and n_real:
        segment("keys", real_keys.replace_schema_metadata(keys_schema(dim).metadata), j)
        facts.append(real_keys.drop(["vector"]))
        j += 1
    for s in range(0, n_syn, SEGMENT_ROWS):
        rows = np.arange(n_real + s, n_real + min(n_syn, s + SEGMENT_ROWS))
        vecs = m.array[rows[0] : rows[-1] + 1]
        items = []
        for r, v in zip(rows, vecs):
            i = int(r) - n_real
            e = i // KEYS_PER_EDIT
            k = KeyRecord(f"syn{e:07d}", "answer" if i % KEYS_PER_EDIT == 0 else "sentence",
                          f"Synthetic fact {i}.", f"synthetic text {i}",
                          shas[e // EDITS_PER_IMAGE], None, v)  # fmt: skip
            items.append((k.key_id, k))
        table = keys_to_table(items, dim)
        segment("keys", table, j)
        facts.append(table.drop(["vector"]).replace_schema_metadata(None))
        j += 1
        m.release()
    facts_table = pa.concat_tables([f.replace_schema_metadata(None) for f in facts])
    steps["segments"] = time.perf_counter() - t0 - sum(steps.values())
    say(f"segments written ({steps['segments']:.0f} s)")
    # 3. the engine and its facts, and the store's view of them as a writer leaves it
    # (store/writer.py `_derive_engine`): the engine's sigma and neighbour lists listed
    # as the store's own (one copy), and the per-key tau measurements, so that the first
    # insert costs what any later one does. Below the engine's threshold the
    # DerivedIndex gets its own sigma and list files, as a small codebook has.
    assert eng.knn_idx is not None and eng.knn_dist is not None
    tau_cache = None
    if use_engine:
        index = eng.save(root, "000001", dtype=dtype)
        frel = "index/facts-000001.arrow"
        fe = dict(write_facts(root / frel, facts_table), path=frel, start=0)
        section = {"index": index, "facts": [fe], "keys": n, "sigma": "store"}
        layout = store_layout(root, section)
        if compat.tau_rule(config, R.TAU_RULES) in TC.RULES:
            tau_cache = TC.compute(
                eng.knn_idx,
                eng.knn_dist,
                facts_table.column("image_sha256"),
                facts_table.column("edit_id"),
            )
            layout["files"]["tau_other"] = TC.write(root, "index/tau-other-000001.npy", tau_cache)
    else:

        def derived_file(rel: str, arr: np.ndarray) -> dict:
            data = DL.npy_bytes(arr)
            atomic_write(root / rel, data)
            return {"path": rel, "sha256": sha256_hex(data), "bytes": len(data), "rows": n}

        files = {
            "sigma": derived_file("index/sigma-000001.npy", eng.sigma_raw),
            "knn_idx": derived_file("index/knn_idx-000001.npy", eng.knn_idx),
            "knn_dist": derived_file("index/knn_dist-000001.npy", eng.knn_dist),
        }
        layout = {"files": files, "deltas": {"sigma": [], "knn": [], "hnsw": []}}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": 1,
        "created": now_iso(),
        "updated": now_iso(),
        "config": config,
        "segments": segments,
        "removed_edits": [],
        "derived": None,
    }
    # tau by the codebook's rule over these lists: a view whose keys are the facts
    # (tau reads edit and image ids only) and whose index holds the lists
    view = Codebook(root, manifest, keys=facts_table, edits=edits_to_table(edits, now))
    lists = Lists(eng.sigma_raw, eng.knn_idx, eng.knn_dist)
    view.use_index(DerivedIndex(root, None, n, dim, view.vectors, lists=lists, lift_known=True))
    if tau_cache is not None:
        view.use_tau_cache(tau_cache)
    derived = view.derived_section(layout)
    if use_engine:
        derived["engine"] = section
    if ordered or not use_engine:
        # the row-order input is no file of the codebook: the engine has its IVF-order
        # copy, or (below the threshold) a reader takes the Parquet path, as for a
        # codebook that was written
        m.release()
        del m, eng
        unlink(root / rel)
    manifest["derived"] = derived
    data = manifest_bytes(manifest)
    atomic_write(root / "versions" / "v000001.json", data)
    atomic_write(root / MANIFEST, data)
    steps["derived"] = time.perf_counter() - t0 - sum(steps.values())
    digest = hashlib.sha256(data).hexdigest()[:12]
    return {"path": str(root), "keys": n, "real_keys": n_real, "dim": dim, "dtype": dtype,
            "edits": len(edits),
            "engine": "engine" in derived, "tau": derived["tau"], "seconds": steps,
            "manifest": digest}  # fmt: skip
