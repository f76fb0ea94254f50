"""Image files and arrays: :func:`read_image` (files, safely), :func:`load_image`, :func:`to_bgr`
(arrays and paths to H x W x 3 uint8 BGR). The one home of image reading in ectfast.

Image files are read by :func:`read_image`: the header is parsed first (JPEG, PNG, BMP, GIF,
WebP, TIFF, PNM) so that nothing is decoded before its size is known; JPEGs over the pixel limit
are decoded reduced (1/2, 1/4 or 1/8, by libjpeg's DCT scaling), other formats over it are
refused; truncated JPEG/PNG files, decoder errors and libjpeg's "corrupt data" warnings are
reported as one line naming the file. Arrays: uint8, uint16 or float in [0, 1]; grey, BGR/RGB,
BGRA/RGBA.
"""
from __future__ import annotations

import math
import os
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Tuple

import numpy as np

#: images are decoded at most this many pixels (JPEGs over it are decoded reduced by 2, 4 or 8;
#: other formats over it are refused): ``--max-megapixels``
MAX_PIXELS = 64_000_000
#: file extensions ``ectfast detect`` picks up in folders (files named explicitly are always tried)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".gif")


class ImageError(ValueError):
    """An image file that cannot be used; the message starts with the file's path."""


def _be16(b, i):
    return struct.unpack_from(">H", b, i)[0]


def _jpeg_size(data: bytes):
    """(width, height) from the first SOFn marker of a JPEG, or raise ValueError."""
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"bad JPEG marker structure at byte {i}")
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            break
        marker = data[i]
        i += 1
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            break
        if i + 2 > n:
            break
        length = _be16(data, i)
        if length < 2:
            raise ValueError(f"bad JPEG segment length at byte {i}")
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if i + 7 > n:
                break
            h, w = _be16(data, i + 3), _be16(data, i + 5)
            return w, h
        if marker == 0xDA:
            raise ValueError("no frame header (SOF) before the scan data")
        i += length
    raise ValueError("the file ends before the JPEG frame header (truncated)")


def _tiff_size(data: bytes):
    end = "<" if data[:2] == b"II" else ">"
    (off,) = struct.unpack_from(end + "I", data, 4)
    (count,) = struct.unpack_from(end + "H", data, off)
    w = h = None
    for k in range(count):
        tag, typ, cnt = struct.unpack_from(end + "HHI", data, off + 2 + 12 * k)
        fmt = {3: "H", 4: "I"}.get(typ)
        if fmt is None:
            continue
        (val,) = struct.unpack_from(end + fmt, data, off + 2 + 12 * k + 8)
        if tag == 256:
            w = val
        elif tag == 257:
            h = val
    if w is None or h is None:
        raise ValueError("no ImageWidth/ImageLength in the first TIFF directory")
    return w, h


def _pnm_size(data: bytes):
    tokens, i, n = [], 2, min(len(data), 4096)
    while len(tokens) < 2 and i < n:
        c = data[i:i + 1]
        if c == b"#":
            while i < n and data[i:i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < n and data[j:j + 1].isdigit():
                j += 1
            if j == i:
                raise ValueError("bad PNM header")
            tokens.append(int(data[i:j]))
            i = j
    if len(tokens) < 2:
        raise ValueError("bad PNM header")
    return tokens[0], tokens[1]


def _webp_size(data: bytes):
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8L":
        b = int.from_bytes(data[21:25], "little")
        w, h = 1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF)
    elif chunk == b"VP8 ":
        w = struct.unpack_from("<H", data, 26)[0] & 0x3FFF
        h = struct.unpack_from("<H", data, 28)[0] & 0x3FFF
    else:
        raise ValueError(f"unknown WebP chunk {chunk!r}")
    return w, h


def image_header(data: bytes) -> Tuple[str, int, int]:
    """(format, width, height) from an image file's first bytes, without decoding it.
    ValueError for an unknown format or a header that cannot be parsed."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            if data[12:16] != b"IHDR":
                raise ValueError("no IHDR chunk")
            w, h = struct.unpack_from(">II", data, 16)
            return "PNG", w, h
        if data[:3] == b"\xff\xd8\xff":
            return ("JPEG",) + _jpeg_size(data)
        if data[:2] == b"BM":
            w, h = struct.unpack_from("<ii", data, 18)
            return "BMP", abs(w), abs(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack_from("<HH", data, 6)
            return "GIF", w, h
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return ("WebP",) + _webp_size(data)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return ("TIFF",) + _tiff_size(data)
        if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"123456" and data[2:3].isspace():
            return ("PNM",) + _pnm_size(data)
    except (struct.error, IndexError) as e:
        raise ValueError(f"truncated or damaged header ({e})") from None
    head = data[:12]
    shown = head.decode("ascii", "replace") if all(32 <= c < 127 or c in (9, 10, 13) for c in head) else head.hex(" ")
    raise ValueError(f"not an image file (unrecognised header {shown!r}; JPEG, PNG, BMP, GIF, WebP, TIFF, PNM are read)")


_STDERR_LOCK = threading.RLock()


def _decode_quietly(data: bytes, flags: int):
    """cv2.imdecode with the C libraries' stderr (libjpeg's "Corrupt JPEG data" warnings,
    libpng's errors) captured: (image or None, captured text). Serialised by a lock that every
    write of ``ectfast detect`` to stderr also takes."""
    import tempfile

    import cv2

    buf = np.frombuffer(data, np.uint8)
    with _STDERR_LOCK:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return cv2.imdecode(buf, flags), ""
        with tempfile.TemporaryFile() as tmp:
            os.dup2(tmp.fileno(), 2)
            try:
                img = cv2.imdecode(buf, flags)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            text = tmp.read(4096).decode("utf-8", "replace")
    return img, " ".join(text.split())


_CV2_QUIET = False


def _quiet_cv2():
    global _CV2_QUIET
    if not _CV2_QUIET:
        import cv2

        try:
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
        except AttributeError:
            pass
        _CV2_QUIET = True


@dataclass
class LoadedImage:
    """An image file as decoded: ``image`` H x W x 3 uint8 BGR, ``scale`` = decoded / original
    side (1 unless a large JPEG was decoded reduced), the original ``width``, ``height``."""
    image: np.ndarray
    scale: float
    width: int
    height: int
    format: str


def read_image(path, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """Read an image file safely (see the module docstring). ImageError (a ValueError) whose
    message starts with the path, for every way a file can be unusable."""
    import cv2

    _quiet_cv2()
    p = os.fspath(path)
    try:
        if os.path.isdir(p):
            raise ImageError(f"{p}: is a directory, not an image")
        size = os.path.getsize(p)
        if size == 0:
            raise ImageError(f"{p}: empty file (0 bytes)")
        with open(p, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ImageError(f"{p}: no such file") from None
    except OSError as e:
        raise ImageError(f"{p}: cannot read the file ({e.strerror or e})") from None
    try:
        fmt, w, h = image_header(data)
    except ValueError as e:
        raise ImageError(f"{p}: {e}") from None
    if w < 1 or h < 1:
        raise ImageError(f"{p}: {fmt} header gives an empty image ({w}x{h} px)")
    flags, factor = cv2.IMREAD_COLOR, 1
    if w * h > max_pixels:
        if fmt != "JPEG":
            raise ImageError(f"{p}: {fmt} image of {w}x{h} px ({w * h / 1e6:.0f} megapixels) is over the limit of "
                             f"{max_pixels / 1e6:g} megapixels (--max-megapixels); not decoded")
        factor = next((k for k in (2, 4, 8) if math.ceil(w / k) * math.ceil(h / k) <= max_pixels), None)
        if factor is None:
            raise ImageError(f"{p}: JPEG of {w}x{h} px is over {max_pixels / 1e6:g} megapixels even decoded "
                             "at 1/8 (--max-megapixels); not decoded")
        flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    if fmt == "JPEG":
        sos = data.rfind(b"\xff\xda")
        if sos < 0 or data.find(b"\xff\xd9", sos) < 0:
            raise ImageError(f"{p}: truncated JPEG (the file ends before its end-of-image marker)")
    elif fmt == "PNG" and data.rfind(b"IEND") < 0:
        raise ImageError(f"{p}: truncated PNG (no IEND chunk: the file ends early)")
    img, said = _decode_quietly(data, flags)
    if img is None or img.size == 0:
        why = f" ({said[:160]})" if said else ""
        raise ImageError(f"{p}: cannot decode the {fmt} image (corrupt data){why}")
    if said and fmt == "JPEG" and ("Corrupt" in said or "Premature" in said or "Invalid" in said):
        raise ImageError(f"{p}: corrupt JPEG data (libjpeg: {said[:160]})")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if factor == 1:
        w, h = img.shape[1], img.shape[0]  # as decoded (EXIF orientation applied)
    elif w != h and (img.shape[1] > img.shape[0]) != (w > h):
        w, h = h, w  # the decoder turned the image by its EXIF orientation
    scale = img.shape[1] / w if factor > 1 else 1.0
    return LoadedImage(np.ascontiguousarray(img), scale, int(w), int(h), fmt)


def load_image(path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 BGR (grey, 16-bit and RGBA files are converted;
    :func:`read_image` has the details). ValueError naming the file when it cannot be used."""
    loaded = read_image(path)
    if loaded.scale != 1.0:
        raise ImageError(f"{os.fspath(path)}: image of {loaded.width}x{loaded.height} px is over the "
                         f"limit of {MAX_PIXELS / 1e6:g} megapixels for a full decode")
    return loaded.image


def to_bgr(image, *, rgb: bool = False, name: str = "image") -> np.ndarray:
    """Convert an image (path or array) to a C-contiguous H x W x 3 uint8 BGR array.

    Arrays: uint8 (0..255), uint16 (0..65535) or float in [0, 1]; H x W or H x W x 1 (grey),
    H x W x 3 (BGR, or RGB with ``rgb=True``), H x W x 4 (BGRA, or RGBA with ``rgb=True``)."""
    import cv2

    if isinstance(image, (str, bytes, os.PathLike)):
        return load_image(image if not isinstance(image, bytes) else image.decode())
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy image array or a file path, got {type(image).__name__}")
    a = image
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"{name}: expected an H x W (grey), H x W x 3 or H x W x 4 image, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"{name}: image of {a.shape[1]}x{a.shape[0]} px is too small")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or infinite values")
        if a.min() < 0 or a.max() > 1:
            raise ValueError(f"{name}: float images must have values in [0, 1], got "
                             f"[{float(a.min()):.3g}, {float(a.max()):.3g}] (pass uint8 for 0..255)")
        a = (a * 255.0 + 0.5).astype(np.uint8)
    else:
        raise TypeError(f"{name}: expected uint8, uint16 or float pixel values, got dtype {a.dtype}")
    if a.ndim == 2:
        a = cv2.cvtColor(a, cv2.COLOR_GRAY2BGR)
    elif a.shape[2] == 4:
        a = cv2.cvtColor(a, cv2.COLOR_RGBA2BGR if rgb else cv2.COLOR_BGRA2BGR)
    elif rgb:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(a)
