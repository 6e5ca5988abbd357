"""Codebook.open + the first and a second retrieve in this process, peak RSS (issue 22).

python benchmarks/results/issue22s/open_retrieve.py CODEBOOK
"""

from __future__ import annotations

import resource
import sys
import time


def main() -> None:
    t0 = time.perf_counter()
    import numpy as np

    from reasonedit_cli import retrieval as R
    from reasonedit_cli.store import Codebook

    t1 = time.perf_counter()
    cb = Codebook.open(sys.argv[1])
    q = np.random.default_rng(0).normal(size=(cb.dim or 1,)).astype(np.float32)
    R.retrieve(cb, q)
    t2 = time.perf_counter()
    R.retrieve(cb, q + 0.1)
    t3 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(
        f"{sys.argv[1]}: import {t1 - t0:.2f} s, open + first retrieve {t2 - t1:.3f} s, "
        f"second {t3 - t2:.4f} s, engine {cb.engine() is not None}, peak RSS {rss} MB"
    )


if __name__ == "__main__":
    main()
