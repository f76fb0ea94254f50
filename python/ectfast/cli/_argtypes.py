"""argparse value types shared by the sub-commands: a bad value is a usage error (exit 2) that
names the option, before anything runs."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

from ectfast.nets.engine import check_device


def unit_float(text: str) -> float:
    """A finite number in [0, 1]."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return v


def bounded_int(lo: int, hi: Optional[int] = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (no upper bound when hi is None)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v

    return parse


positive_int = bounded_int(1)


def megapixels(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of megapixels > 0, got {text!r}") from None
    if not (math.isfinite(v) and 0 < v <= 4096):
        raise argparse.ArgumentTypeError(f"expected a number of megapixels in (0, 4096], got {text!r}")
    return v


def device_arg(text: str) -> str:
    """argparse type of --device: the spelling is checked here (usage error, exit 2)."""
    try:
        return check_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
