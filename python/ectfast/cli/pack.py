"""``python -m ectfast.cli.pack --data DIR --out FILE``: decode, margin-crop and JPEG-pack the
300-W training and validation faces into one ``.npz`` (:func:`ectfast.nets.data.pack`), for
training on a machine without the data folder. The packed file is derived from research-only
data: keep it in an ignored folder (``.devdata/``), never commit it."""
from __future__ import annotations

import argparse
import sys

from ectfast.io.datasets import TRAIN_SUBSETS, VALIDATION_SUBSETS
from ectfast.nets.data import CONTEXT, STORED_SIZE, load_crops, pack


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ectfast.cli.pack",
                                description="pack 300-W training/validation crops into one .npz")
    p.add_argument("--data", required=True, help="300-W root (afw/, helen/trainset/, lfpw/...)")
    p.add_argument("--out", required=True, help="output .npz (keep it in an ignored folder, e.g. .devdata/)")
    p.add_argument("--stored-size", type=int, default=STORED_SIZE)
    p.add_argument("--context", type=float, default=CONTEXT)
    p.add_argument("--quality", type=int, default=85)
    p.add_argument("--limit", type=int, default=None, help="first N faces of each split (tests)")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    train = load_crops(a.data, TRAIN_SUBSETS, a.stored_size, a.context, a.limit, a.workers, progress=True)
    val = load_crops(a.data, VALIDATION_SUBSETS, a.stored_size, a.context, a.limit, a.workers, progress=True)
    n = pack(a.out, train, val, a.quality)
    print(f"packed {len(train)} training + {len(val)} validation faces into {a.out}: {n / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
