"""Key merging (docs/method.md#merging): consolidate keys whose deferral balls coincide.

A new key k_new may merge into an earlier key k_old when

* they are near-duplicates: d < 0.1 * r_new and d < 0.1 * r_old, or
* their balls overlap by more than 90% of both. For two balls with centres d apart the
  overlap along the line through the centres is `r_old + r_new - d`; it must exceed 90%
  of each diameter (`2 r`).

The merged key keeps k_old's vector, grows its radius to max(r_old, d + r_new) so the
ball still covers k_new's, and gains k_new's values. A key holds a list of
(value, edit_id) entries: k_new's entries are appended unless k_old holds that exact
entry. An entry whose value k_old already holds from another edit is still kept, as
provenance: removing either edit must leave the value to the other one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

NEAR_DUPLICATE = 0.1
OVERLAP = 0.9
CANDIDATES = 8  # nearest earlier surviving keys tested per key

Entry = tuple[str, str]  # (value, edit_id)


#: merge rules: "ours" (module docstring) or "reference" (the authors' code, REFERENCE row 14)
MERGE_RULES = ("ours", "reference")


def circle_intersection(d: float, r1: float, r2: float) -> float:
    """Area of the intersection of two discs of radii r1, r2 whose centres are d apart.

    The reference measures key overlap in 2-D: the balls are treated as discs in the
    plane through both centres, whatever the key width."""
    if d >= r1 + r2:
        return 0.0
    if d <= abs(r1 - r2):
        return math.pi * min(r1, r2) ** 2
    a1 = r1**2 * math.acos(max(-1.0, min(1.0, (d**2 + r1**2 - r2**2) / (2 * d * r1))))
    a2 = r2**2 * math.acos(max(-1.0, min(1.0, (d**2 + r2**2 - r1**2) / (2 * d * r2))))
    k = (r1 + r2 - d) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2)
    return a1 + a2 - 0.5 * math.sqrt(max(0.0, k))


def may_merge_reference(d: float, r_old: float, r_new: float) -> bool:
    """The reference's rule for one pair of keys (its balls must touch, d < r_old + r_new):
    near-duplicates as ours, or a 2-D intersection over each disc's area above 0.9."""
    if r_old <= 0 or r_new <= 0:
        return d <= 1e-6
    if d >= r_old + r_new:
        return False
    if d < NEAR_DUPLICATE * r_new and d < NEAR_DUPLICATE * r_old:
        return True
    inter = circle_intersection(d, r_new, r_old)
    return inter / (math.pi * r_new**2) > OVERLAP and inter / (math.pi * r_old**2) > OVERLAP


def may_merge(d: float, r_old: float, r_new: float) -> bool:
    """The docs/method.md#merging rule for one pair of keys."""
    if r_old <= 0 or r_new <= 0:
        return d <= 1e-6  # keys without a ball merge only when identical
    if d < NEAR_DUPLICATE * r_new and d < NEAR_DUPLICATE * r_old:
        return True
    overlap = r_old + r_new - d
    return overlap > OVERLAP * 2 * r_old and overlap > OVERLAP * 2 * r_new


@dataclass
class MergePlan:
    """Which key rows merge into which, and the survivors' new radii and entries."""

    n_before: int
    merged_into: dict[int, int] = field(default_factory=dict)  # row -> surviving row
    radius: dict[int, float] = field(default_factory=dict)  # surviving row -> new radius
    entries: dict[int, list[Entry]] = field(default_factory=dict)  # survivor -> all entries
    values_collected: int = 0  # distinct values survivors gained (they held other values)
    key_ids: list[str] = field(default_factory=list)  # of the rows, when the caller knows them

    def summary(self, groups: bool = False) -> dict:
        """Counts for reports (`merge-keys --json`, `add-edit --merge --json`); with
        `groups`, each survivor that absorbed keys, with the values it now holds."""
        out: dict = {
            "before": self.n_before,
            "after": self.n_after,
            "merged": len(self.merged_into),
            "values_collected": self.values_collected,
            "multi_value_keys": self.multi_value_keys(),
        }
        if groups:
            out["groups"] = [
                {
                    "key_id": self.key_ids[row] if self.key_ids else None,
                    "absorbed": len(rows),
                    "radius": self.radius[row],
                    "values": list(dict.fromkeys(v for v, _ in self.entries[row])),
                    "edit_ids": list(dict.fromkeys(e for _, e in self.entries[row])),
                }
                for row, rows in sorted(self.groups().items())
            ]
        return out

    @property
    def n_after(self) -> int:
        return self.n_before - len(self.merged_into)

    def groups(self) -> dict[int, list[int]]:
        """Surviving row -> the rows merged into it, in merge order."""
        out: dict[int, list[int]] = {}
        for row, into in self.merged_into.items():
            out.setdefault(into, []).append(row)
        return out

    def multi_value_keys(self) -> int:
        """Survivors that hold more than one distinct value after the merge."""
        return sum(len({v for v, _ in e}) > 1 for e in self.entries.values())


def plan_merges(
    vectors: np.ndarray,
    radii: Sequence[float | None] | np.ndarray,
    entries: Sequence[Sequence[Entry]],
    *,
    new_from: int = 0,
    block: int = 4096,
    rule: str = "ours",
) -> MergePlan:
    """Greedy merge in insertion order: each key joins the nearest earlier survivor that
    the rule allows (`rule="ours"`), or, as the authors' code does (`"reference"`), the
    FIRST earlier survivor in row order whose ball touches its own and that
    `may_merge_reference` allows.

    `entries[i]` are key i's (value, edit_id) pairs, its own first. Only rows from
    `new_from` on are merge candidates (merge on insert: the new keys of an add); every
    earlier row can absorb them. Exact distances in row blocks, so memory stays bounded
    (O(block * n)).
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"plan_merges: rule must be one of {', '.join(MERGE_RULES)}")
    n = len(vectors)
    if len(entries) != n:
        raise ValueError(f"plan_merges: {n} vectors but {len(entries)} entry lists")
    plan = MergePlan(n_before=n)
    radius = np.nan_to_num(
        np.array([np.nan if r is None else r for r in radii], dtype=np.float64), nan=0.0
    )
    vec = np.asarray(vectors, dtype=np.float64)
    survivor = np.ones(n, dtype=bool)
    sq = (vec**2).sum(1)
    for start in range(max(1, new_from), n, block):
        stop = min(n, start + block)
        d2 = sq[start:stop, None] + sq[None, :stop] - 2 * vec[start:stop] @ vec[:stop].T
        dist = np.sqrt(np.maximum(d2, 0.0))
        for i in range(start, stop):
            # merged-away keys are no candidates: a run of duplicates all joins the first
            row = np.where(survivor[:i], dist[i - start, :i], np.inf)
            if rule == "reference":  # every touching survivor, in row order
                order = np.flatnonzero(row < radius[:i] + radius[i])
                allowed = may_merge_reference
            else:
                near = (
                    np.argpartition(row, CANDIDATES - 1)[:CANDIDATES]
                    if i > CANDIDATES
                    else np.arange(i)
                )
                order = near[np.lexsort((near, row[near]))]  # nearest first, ties by row
                allowed = may_merge
            for j in order:
                d = float(row[j])
                if not np.isfinite(d) or not allowed(d, float(radius[j]), float(radius[i])):
                    continue
                survivor[i] = False
                plan.merged_into[i] = int(j)
                radius[j] = max(radius[j], d + radius[i])
                plan.radius[int(j)] = float(radius[j])
                held = plan.entries.setdefault(int(j), list(entries[int(j)]))
                values = {v for v, _ in held}
                for entry in entries[i]:
                    if entry not in held:
                        held.append(entry)
                    if entry[0] not in values:
                        values.add(entry[0])
                        plan.values_collected += 1
                break
    return plan
