"""Derived retrieval index of a codebook: sigma, neighbour lists, graphs, deltas, lifted graph.

Everything here is a cache rebuildable from the committed keys. The reader and the
writer hand a `DerivedIndex` object over instead of writing each other's fields:

- derived.py: `DerivedIndex`, one version's derived data: verified loading, search;
- update.py: `IndexUpdate`, the writer's side: the next version's data, written to index/;
- neighbours.py: neighbour lists kept current (exact updates, approximate above
  KNN_EXACT_MAX_KEYS) and `Lists`, the in-memory sigma and lists;
- deltas.py: the log-structured layout (base + deltas) and its compaction policy;
- graphs.py: hnswlib graph parts: build, verified load, save, multi-part search;
- lift.py: the lifted graph that finds isolated (large-sigma) keys.
"""

from .derived import (
    SEARCH_EF,
    SEARCH_FETCH,
    SEARCH_SIGMA_SCAN,
    SEARCH_SIGMA_SCAN_LIFTED,
    DerivedIndex,
    Health,
)
from .graphs import HNSW_EF_CONSTRUCTION, HNSW_M, HNSW_SEED, HNSW_SPACE, Graph, build_hnsw
from .lift import Lift
from .neighbours import KNN_EXACT_MAX_KEYS, Lists
from .update import IndexUpdate

__all__ = [
    "HNSW_EF_CONSTRUCTION",
    "HNSW_M",
    "HNSW_SEED",
    "HNSW_SPACE",
    "KNN_EXACT_MAX_KEYS",
    "SEARCH_EF",
    "SEARCH_FETCH",
    "SEARCH_SIGMA_SCAN",
    "SEARCH_SIGMA_SCAN_LIFTED",
    "DerivedIndex",
    "Graph",
    "Health",
    "IndexUpdate",
    "Lift",
    "Lists",
    "build_hnsw",
]
