"""Key merging (DESIGN 1.6): consolidate keys whose deferral balls coincide.

A new key k_new may merge into an earlier key k_old when

* they are near-duplicates: d < 0.1 * r_new and d < 0.1 * r_old, or
* their balls overlap by more than 90% of both. For two balls with centres d apart the
  overlap along the line through the centres is `r_old + r_new - d`; it must exceed 90%
  of each diameter (`2 r`).

The merged key keeps k_old's vector and grows its radius to max(r_old, d + r_new) so the
ball still covers k_new's. A codebook key holds one value, so this version merges only
keys that store the same value (the same fact from several edits, or the same edit added
under several ids); keys with different values stay separate and are reported as
`blocked` candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEAR_DUPLICATE = 0.1
OVERLAP = 0.9


def may_merge(d: float, r_old: float, r_new: float) -> bool:
    """The DESIGN 1.6 rule for one pair of keys."""
    if r_old <= 0 or r_new <= 0:
        return d <= 1e-6  # keys without a ball merge only when identical
    if d < NEAR_DUPLICATE * r_new and d < NEAR_DUPLICATE * r_old:
        return True
    overlap = r_old + r_new - d
    return overlap > OVERLAP * 2 * r_old and overlap > OVERLAP * 2 * r_new


@dataclass
class MergePlan:
    """Which key rows merge into which, and the survivors' new radii."""

    n_before: int
    merged_into: dict[int, int] = field(default_factory=dict)  # row -> surviving row
    radius: dict[int, float] = field(default_factory=dict)  # surviving row -> new radius
    blocked: int = 0  # pairs that satisfy the geometric rule but hold different values

    @property
    def n_after(self) -> int:
        return self.n_before - len(self.merged_into)


def plan_merges(
    vectors: np.ndarray, radii: np.ndarray, values: list[str], *, block: int = 4096
) -> MergePlan:
    """Greedy merge in insertion order: each key joins the nearest earlier survivor.

    Exact distances in row blocks, so memory stays bounded (O(block * n)).
    """
    n = len(vectors)
    plan = MergePlan(n_before=n)
    radius = np.nan_to_num(np.asarray(radii, dtype=np.float64), nan=0.0).copy()
    vec = np.asarray(vectors, dtype=np.float64)
    survivor = np.ones(n, dtype=bool)
    sq = (vec**2).sum(1)
    for start in range(1, n, block):
        stop = min(n, start + block)
        d2 = sq[start:stop, None] + sq[None, :stop] - 2 * vec[start:stop] @ vec[:stop].T
        dist = np.sqrt(np.maximum(d2, 0.0))
        for i in range(start, stop):
            row = dist[i - start, :i]
            order = np.argsort(row, kind="stable")
            for j in order[:8]:  # the nearest few earlier keys
                if not survivor[j]:
                    continue
                d = float(row[j])
                if not may_merge(d, float(radius[j]), float(radius[i])):
                    continue
                if values[j] != values[i]:
                    plan.blocked += 1
                    continue
                survivor[i] = False
                plan.merged_into[i] = int(j)
                radius[j] = max(radius[j], d + radius[i])
                plan.radius[int(j)] = float(radius[j])
                break
    return plan
