"""Build a synthetic N x D codebook in the real store format (issue 22's scale checks).

    python scripts/make_synthetic_codebook.py --n 1000000 --dim 512 --dir /tmp/cb1m
    python scripts/make_synthetic_codebook.py --n 1000000 --config-from CB --dir DIR \
        [--dtype float16]

Synthetic keys and facts, real Parquet segments, real manifest, the engine's mapped
files (reasonedit_cli/store/synthetic.py says what is written and what is not). With
--config-from, the config and the live keys of a real codebook (made by `add-edit`
with the model you will `ask` with) come first, so `ask` on its images retrieves its
facts among N synthetic keys; its key width then sets D. Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, required=True, help="keys in all (real ones included)")
    ap.add_argument("--dim", type=int, help="key width (default: --config-from's)")
    ap.add_argument("--dir", required=True, help="the new codebook (must not exist)")
    ap.add_argument("--config-from", help="a real codebook whose config and keys come first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "float16"),
        help="the engine's mapped vectors (float16: half the disk and page cache)",
    )  # fmt: skip
    args = ap.parse_args()
    from reasonedit_cli.errors import CodebookError
    from reasonedit_cli.store.synthetic import build_synthetic_codebook

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        out = build_synthetic_codebook(
            args.dir,
            args.n,
            args.dim,
            config_from=args.config_from,
            seed=args.seed,
            dtype=args.dtype,
            log=log,
        )
    except CodebookError as e:
        sys.exit(f"Error: {e}")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
