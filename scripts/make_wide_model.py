"""A tiny real-architecture LLaVA whose language layers are 4,096 wide (issue 22).

    python scripts/make_wide_model.py --dir /tmp/wide-llava [--text-hidden 4096]

Random weights, built offline from transformers configs (tests/tiny_models.py): a CLIP
vision tower, an MLP projector and a one-layer Llama decoder with hidden size 4,096,
the width of a 7-8B model's language layers. Keys embedded at a language layer are
then 4,096 + 384 (MiniLM) = 4,480 wide, as for LLaVA / Qwen3-VL at 7-8B, so a
synthetic 1M x 4,480 codebook (scripts/make_synthetic_codebook.py --config-from) can be
asked from the CLI. Its answers mean nothing; its key width, model loading and
retrieval path are real. docs/codebook-format.md#wide-keys-in-the-store has the steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", required=True, help="where to save the model (must not exist)")
    ap.add_argument("--text-hidden", type=int, default=4096)
    ap.add_argument("--text-layers", type=int, default=1)
    args = ap.parse_args()
    out = Path(args.dir)
    if out.exists():
        sys.exit(f"Error: {out} exists")
    from tiny_models import build_tiny_llava

    build_tiny_llava(out, text_hidden=args.text_hidden, text_layers=args.text_layers)
    print(out)


if __name__ == "__main__":
    main()
