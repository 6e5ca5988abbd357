"""A structural check of an hnswlib 0.8 index file, so that it can be loaded in place.

hnswlib trusts its input: `loadIndex` sizes its allocations from the file's header and
`searchKnn` follows every stored link without a bound check, so a file changed in place
(bytes flipped, size and mtime kept) could read outside its memory and kill the process
(SIGSEGV in 6 of 40 tries, docs/codebook-format.md). The engine used to hash each graph
into a private copy before loading it, which is most of a million-key open (0.63-0.73 s
for the 72 MB lifted graph). `check_hnsw` instead checks, with a few vectorised numpy
passes over the file, everything whose damage could make hnswlib read out of bounds, so
that what passes can only change which candidates a search returns (the engine
re-ranks them exactly on the full vectors), never crash it.

The layout, as `HierarchicalNSW::saveIndex` (hnswlib 0.8.0, hnswalg.h) writes it,
little-endian:

    offsetLevel0_, max_elements_, cur_element_count, size_data_per_element_,
    label_offset_, offsetData_                       size_t each
    maxlevel_                                        int
    enterpoint_node_                                 uint32
    maxM_, maxM0_, M_                                size_t each
    mult_                                            double
    ef_construction_                                 size_t
    cur_element_count records of size_data_per_element_ bytes (level 0):
        uint32 link count (low 16 bits; byte 2 holds the deleted mark), maxM0_ uint32
        neighbour ids, dim float32, uint64 label
    per element: uint32 linkListSize, then linkListSize bytes: one block of
        (uint32 count, maxM_ uint32 ids) per level above 0

What `searchKnn` dereferences, and so what is checked: the header's record layout (it
must be the one `dim` and M give: the offsets, not the file, decide where a vector is
read), the element count, the entry point and its level, each level's link counts and
ids (an id must be an element, and at level L an element with a level-L list: the
greedy descent reads `linkLists_[id] + (L - 1) * size`), the exact file size (what
`loadIndex` reads must be there), no deleted mark (the engine never deletes; a marked
element changes what a query can return) and labels in the caller's range.
Not checked: the vectors (a changed one changes distances only) and the parameters used
only to add elements (mult_, ef_construction_): the engine never adds to a loaded graph.
"""

from __future__ import annotations

import bisect
import os
import struct

import numpy as np

from .mapped import MappedError

HEADER = struct.Struct("<6QiI3QdQ")  # 96 bytes
#: link counts are 16 bits (`getListCount`); hnswlib's own limit on maxM0_
MAX_M = (1 << 15) - 1
_BLOCK = 4 << 20  # level-0 bytes checked per read: bounded memory; 2-4 MB stay in cache


def _read(
    fd: int, nbytes: int, offset: int, name: str, buf: np.ndarray | None = None
) -> np.ndarray:
    """nbytes at offset as a uint8 array (the start of `buf` when given: one buffer for
    every block, not a fresh allocation's page faults each), read, not mapped: a file
    truncated under the reader is an error, not SIGBUS."""
    out = np.empty(nbytes, dtype=np.uint8) if buf is None else buf[:nbytes]
    at = 0
    while at < nbytes:
        got = os.preadv(fd, [out.data[at:]], offset + at)
        if got <= 0:
            raise MappedError(f"{name} is truncated")
        at += got
    return out


def check_hnsw(fd: int, name: str, *, dim: int, count: int, first_label: int = 0) -> int:
    """Check the hnswlib file open on `fd` (named `name` in errors) against what a
    search will do with it: an l2 / ip graph of `count` float32 vectors of `dim`, labels
    first_label .. first_label + count - 1 (each once). Returns its M. Raises
    MappedError naming what is wrong. Reads the file once (level 0 in 4 MB blocks)."""
    size = os.fstat(fd).st_size
    if size < HEADER.size:
        raise MappedError(f"{name} is too short for an hnswlib header")
    head = _read(fd, HEADER.size, 0, name).tobytes()
    (off0, max_el, cur, per_elem, label_off, data_off, maxlevel, entry,
     max_m, max_m0, m, mult, _ef) = HEADER.unpack(head)  # fmt: skip
    if cur != count:
        raise MappedError(f"{name} holds {cur} keys, not {count}")
    if max_el < count:
        raise MappedError(f"{name}: max_elements {max_el} is below its {count} keys")
    if not (1 <= m <= MAX_M // 2 and max_m == m and max_m0 == 2 * m):
        raise MappedError(f"{name}: link sizes M {m}, maxM {max_m}, maxM0 {max_m0}")
    links0 = max_m0 * 4 + 4  # size_links_level0_
    links = max_m * 4 + 4  # size_links_per_element_
    if (off0, data_off, label_off, per_elem) != (
        0, links0, links0 + 4 * dim, links0 + 4 * dim + 8
    ):  # fmt: skip
        raise MappedError(f"{name}: record layout is not that of {dim}-dim keys with M {m}")
    if not (np.isfinite(mult) and mult > 0):
        raise MappedError(f"{name}: level multiplier {mult}")
    if count == 0:
        if size != HEADER.size or maxlevel != -1:
            raise MappedError(f"{name}: an empty graph with data or levels")
        return m
    level0_end = HEADER.size + count * per_elem
    if size < level0_end + 4 * count or (size - level0_end) % 4:
        raise MappedError(f"{name} has the wrong size for {count} keys")
    _check_level0(fd, name, count, per_elem, max_m0, label_off, first_label)
    tail = _read(fd, size - level0_end, level0_end, name).view("<u4")
    levels = _check_upper(tail, name, count, max_m, links)
    if not 0 <= entry < count:
        raise MappedError(f"{name}: entry point {entry} is not a key")
    if maxlevel != int(levels.max()) or levels[entry] != maxlevel:
        raise MappedError(f"{name}: max level {maxlevel} is not the entry point's or the top")
    return m


def _check_level0(
    fd: int, name: str, count: int, per_elem: int, max_m0: int, label_off: int, first: int
) -> None:
    words = per_elem // 4  # every field is 4-byte aligned (links0, 4 * dim, 8)
    rows = max(1, _BLOCK // per_elem)
    slots = np.arange(max_m0, dtype=np.uint32)
    seen = np.zeros(count, dtype=bool)
    lo = label_off // 4
    buf = np.empty(min(rows, count) * per_elem, dtype=np.uint8)
    for r0 in range(0, count, rows):
        r = min(rows, count - r0)
        rec = _read(fd, r * per_elem, HEADER.size + r0 * per_elem, name, buf).view("<u4")
        rec = rec.reshape(r, words)
        cnt = rec[:, 0]
        # the whole word, not its low 16 bits: a set deleted mark (byte 2) or byte 3
        # makes it exceed maxM0 too
        if int(cnt.max()) > max_m0:
            raise MappedError(f"{name}: a level-0 link count over {max_m0} or a deleted mark")
        slot_ids = rec[:, 1 : 1 + max_m0]
        # a writer leaves only ids of keys (or 0) in unused slots too: the max over
        # every slot settles a valid file; else only the slots in use count
        if int(slot_ids.max()) >= count:
            ids = np.where(slots[None, :] < cnt[:, None], slot_ids, 0)
            if int(ids.max()) >= count:
                raise MappedError(f"{name}: a level-0 link to no key")
        if rec[:, lo + 1].any():  # labels are uint64, < 2^32 here
            raise MappedError(f"{name}: labels out of range")
        lab = rec[:, lo].astype(np.int64) - first
        if int(lab.min()) < 0 or int(lab.max()) >= count:
            raise MappedError(f"{name}: labels out of range")
        seen[lab] = True
    if not seen.all():  # count labels in range, every one seen: each once
        raise MappedError(f"{name}: labels are not one per key")


def _check_upper(tail: np.ndarray, name: str, count: int, max_m: int, links: int) -> np.ndarray:
    """Walk the per-element link-list records (uint32 words); returns every element's
    level. Most records are a single 0 (level 0): the loop steps only over the others
    (about 1/M of the elements), found as the nonzero words."""
    n_words = len(tail)
    levels = np.zeros(count, dtype=np.int64)
    nonzero = np.flatnonzero(tail).tolist()
    starts: list[int] = []  # first word of each upper element's blocks
    owners: list[int] = []
    pos = i = 0
    while i < count:
        k = bisect.bisect_left(nonzero, pos)
        nxt = nonzero[k] if k < len(nonzero) else n_words
        if nxt - pos >= count - i:  # the remaining elements are all level 0
            pos += count - i
            break
        i += nxt - pos
        pos = nxt
        nbytes = int(tail[pos])
        if nbytes % links:
            raise MappedError(f"{name}: a link-list size that is no whole number of levels")
        end = pos + 1 + nbytes // 4
        if end > n_words:
            raise MappedError(f"{name} has the wrong size for its link lists")
        levels[i] = nbytes // links
        starts.append(pos + 1)
        owners.append(i)
        pos, i = end, i + 1
    if pos != n_words:
        raise MappedError(f"{name} has the wrong size for its link lists")
    if not starts:
        return levels
    # every upper list at once: row r is level lev[r] of an element, at word row_at[r]
    own = np.asarray(owners, dtype=np.int64)
    nlev = levels[own]
    row_at = np.repeat(np.asarray(starts, dtype=np.int64), nlev)
    first_row = np.repeat(np.cumsum(nlev) - nlev, nlev)
    lev = np.arange(len(row_at), dtype=np.int64) - first_row  # 0-based: level lev + 1
    row_at += lev * (links // 4)
    cnt = tail[row_at]
    if int(cnt.max()) > max_m:
        raise MappedError(f"{name}: an upper-level link count over {max_m}")
    live = np.arange(max_m)[None, :] < cnt[:, None]
    ids = tail[row_at[:, None] + 1 + np.arange(max_m)[None, :]][live].astype(np.int64)
    if len(ids) and int(ids.max()) >= count:
        raise MappedError(f"{name}: an upper-level link to no key")
    at_level = np.broadcast_to((lev + 1)[:, None], live.shape)[live]
    if len(ids) and (levels[ids] < at_level).any():
        raise MappedError(f"{name}: an upper-level link to a key without that level")
    return levels
