"""Decoding a large photo: reasonedit's reduced decode against PIL's full decode.

A synthetic 8000x6000 (48 MP) JPEG (a photo-like texture, quality 85) is decoded
`--runs` times each way, interleaved; medians and the ratio are printed, with the size
and the bytes of the decoded image. The reduced decode is what every command does with
an image whose longer side exceeds `DECODE_MAX_SIDE` (JPEG DCT scaling, then
`Image.reduce`).

    python benchmarks/bench_images.py [--runs 5] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time


def photo_jpeg(width: int = 8000, height: int = 6000) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = (rng.random((height // 10, width // 10, 3)) * 255).astype("uint8")
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def full_decode(data: bytes):
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def main() -> None:
    from reasonedit_cli.edits import decode_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data = photo_jpeg()
    ways = {"full (PIL)": full_decode, "reduced (reasonedit)": lambda d: decode_image(d, "x")}
    times: dict[str, list[float]] = {name: [] for name in ways}
    sizes = {}
    for _ in range(args.runs):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            img = fn(data)
            times[name].append(time.perf_counter() - t0)
            sizes[name] = (img.size, len(img.tobytes()))
            del img
    med = {name: statistics.median(t) for name, t in times.items()}
    ratio = med["full (PIL)"] / med["reduced (reasonedit)"]
    if args.json:
        print(json.dumps({"median_seconds": med, "ratio": ratio, "sizes": sizes}, indent=2))
        return
    print(f"48 MP JPEG ({len(data) / 1e6:.1f} MB), median of {args.runs} runs")
    for name, value in med.items():
        (w, h), nbytes = sizes[name]
        print(f"  {name:22s} {value:7.3f} s  {w}x{h}, {nbytes / 1e6:6.1f} MB of pixels")
    print(f"  full / reduced          {ratio:7.2f}x")


if __name__ == "__main__":
    main()
