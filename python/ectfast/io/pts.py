"""Reading and writing 68-point ``.pts`` landmark files.

Two forms are accepted:

* the standard form of the iBUG 300-W release::

      version: 1
      n_points:  68
      {
      x y
      ...
      }

* a header-less form: one ``x y`` pair per line (some official .pts files have no header).

Coordinates in ``.pts`` files are 1-based pixel coordinates (the top-left pixel centre is
(1, 1)). ectfast works with 0-based pixel centres, so :func:`read_pts` subtracts 1 and
:func:`write_pts` adds it back unless ``one_based=True`` is passed.
"""
from __future__ import annotations

import math
import os
import re
from typing import Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

#: The landmarks of the iBUG 68-point scheme of 300-W: the one home of the number 68.
N_LANDMARKS = 68
#: The largest .pts file read (a 68-point file is ~1 kB).
MAX_FILE_BYTES = 1 << 20

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"^\s*({_NUMBER})[\s,;]+({_NUMBER})\s*$")


def parse_pts(text: str, *, source: str = "<string>", one_based: bool = False) -> np.ndarray:
    """Parse the text of a ``.pts`` file into an (n, 2) float64 array of (x, y).

    Raises ``ValueError`` naming ``source`` when the text is not a .pts file: a bad line, a
    point count that disagrees with the ``n_points`` header, no points, or non-finite values.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected the str of a .pts file, got {type(text).__name__}")
    n_header = None
    points = []
    in_braces = False
    saw_brace = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        low = line.lower()
        if low.startswith("version"):
            continue
        if low.startswith("n_points"):
            m = re.match(r"n_points\s*:?\s*(\d+)\s*$", low)
            if not m:
                raise ValueError(f"{source}:{lineno}: malformed n_points header {line!r}")
            n_header = int(m.group(1))
            continue
        if line == "{":
            in_braces, saw_brace = True, True
            continue
        if line == "}":
            in_braces = False
            continue
        m = _PAIR.match(line)
        if not m:
            if _non_finite_pair(line):
                raise ValueError(f"{source}:{lineno}: non-finite coordinate in {_clip(line)!r}")
            raise ValueError(f"{source}:{lineno}: expected 'x y', got {_clip(line)!r}")
        if saw_brace and not in_braces:
            raise ValueError(f"{source}:{lineno}: point after the closing brace")
        x, y = float(m.group(1)), float(m.group(2))
        if not (math.isfinite(x) and math.isfinite(y)):  # e.g. 1e999
            raise ValueError(f"{source}:{lineno}: non-finite coordinate in {_clip(line)!r}")
        points.append((x, y))
    if not points:
        raise ValueError(f"{source}: no landmark points found")
    if n_header is not None and n_header != len(points):
        raise ValueError(f"{source}: header says n_points {n_header} but {len(points)} points were read")
    arr = np.asarray(points, dtype=np.float64)
    out = arr if one_based else arr - 1.0
    if not np.isfinite(out).all():  # a finite 1.7e308 minus 1 stays finite; kept as a guard
        raise ValueError(f"{source}: non-finite coordinate")
    return out


_TOKENS = re.compile(r"[\s,;]+")


def _non_finite_pair(line: str) -> bool:
    """True for an 'x y' line whose values parse as numbers, one of them NaN or infinite."""
    parts = [t for t in _TOKENS.split(line.strip()) if t]
    if len(parts) != 2:
        return False
    try:
        vals = [float(t) for t in parts]
    except ValueError:
        return False
    return not all(math.isfinite(v) for v in vals)


def _clip(line: str, n: int = 60) -> str:
    return line if len(line) <= n else line[:n] + "..."


def _path_arg(path) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p or "\x00" in p:
        raise ValueError(f"path: expected a file name, got {p!r}")
    return p


def read_pts(path: PathLike, *, one_based: bool = False) -> np.ndarray:
    """Read a ``.pts`` file (with or without header) as (n, 2) float64, 0-based by default."""
    path = _path_arg(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a .pts file")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such .pts file") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read the .pts file ({e.strerror or type(e).__name__})") from None
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: {size} bytes is too large for a .pts file (at most {MAX_FILE_BYTES})")
    try:
        with open(path, "r", encoding="utf-8", errors="strict") as f:
            text = f.read(MAX_FILE_BYTES + 1)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a text .pts file ({e})") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such .pts file") from None
    except OSError as e:
        raise OSError(f"{path}: cannot read the .pts file ({e.strerror or type(e).__name__})") from None
    return parse_pts(text, source=path, one_based=one_based)


def format_pts(points: np.ndarray, *, one_based: bool = False) -> str:
    """The standard-form text of a .pts file for (n, 2) 0-based points."""
    try:
        pts = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"points: expected an (n, 2) array of numbers, got {type(points).__name__}") from None
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points: expected an (n, 2) array with n > 0, got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points: non-finite coordinate")
    if not one_based:
        pts = pts + 1.0
        if not np.isfinite(pts).all():
            raise ValueError("points: non-finite coordinate (overflow)")
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in pts)
    return f"version: 1\nn_points:  {len(pts)}\n{{\n{body}\n}}\n"


def write_pts(path: PathLike, points: np.ndarray, *, one_based: bool = False) -> None:
    """Write (n, 2) 0-based points as a standard-form ``.pts`` file (1-based inside)."""
    path = _path_arg(path)
    text = format_pts(points, one_based=one_based)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder; write_pts needs a file name")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: cannot write: the folder {os.path.dirname(path) or '.'!r} "
                                "does not exist") from None
    except OSError as e:
        raise OSError(f"{path}: cannot write the .pts file ({e.strerror or type(e).__name__})") from None
