"""``ectfast.Detector`` (images -> faces with 68 landmarks) and the ``ectfast detect`` command.

The pipeline, for a batch of images:

1. faces: the face-detector layer :mod:`ectfast.faces` (BlazeFace by default, Haar as a
   fallback), a callable, or boxes the caller passes. Each detection becomes a crop box in the
   convention of :func:`ectfast.nets.data.box_from_landmarks` (``faces.crop_box``) and, where the
   detector gives eye keypoints, an eye-line angle (``faces.crop_angle``);
2. crops: every face of every image cropped to 256 x 256 by one 2x3 affine (image -> crop) that
   scales the box to the crop and rotates the eye line level;
3. estimation: the network (``ectfast.nets.engine``: ONNX Runtime or PyTorch) on batches of crops ->
   68 response maps each;
4. :func:`ectfast.fit` (ECT by default) on the same batches -> landmarks, confidence,
   visibility, in crop pixels;
5. landmarks mapped back to image pixels with the inverse affine (``cv2.invertAffineTransform``).

Images are NumPy arrays as OpenCV gives them (H x W x 3 uint8, **BGR**; pass ``rgb=True`` for
RGB arrays), grey H x W, H x W x 1 or 4-channel (BGRA / RGBA) arrays (converted), float arrays
in [0, 1], or paths to image files.

Image files are read by :func:`read_image`: the header is parsed first (JPEG, PNG, BMP, GIF,
WebP, TIFF, PNM) so that nothing is decoded before its size is known; JPEGs over the pixel limit
are decoded reduced (1/2, 1/4 or 1/8, by libjpeg's DCT scaling), other formats over it are
refused; truncated JPEG/PNG files, decoder errors and libjpeg's "corrupt data" warnings are
reported as one line naming the file.

``ectfast detect`` (``add_arguments`` / ``run``) is the bulk command; see its ``--help``
(EPILOG below) for outputs, resuming and exit statuses.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import numbers
import os
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ectfast.assets import asset
from ectfast.nets import engine as E
from ectfast.app._argtypes import positive_int, unit_float
from ectfast.core.fit import METHODS

CROP_SIZE = 256
#: the smallest image side a face can be found in (the smallest window of the face detectors)
MIN_IMAGE_SIDE = 24
#: images are decoded at most this many pixels (JPEGs over it are decoded reduced by 2, 4 or 8;
#: other formats over it are refused): ``--max-megapixels``
MAX_PIXELS = 64_000_000
#: the face detectors see images downscaled to this longer side at most (crops come from the
#: decoded image)
DETECT_MAX_SIDE = 2560
#: file extensions ``ectfast detect`` picks up in folders (files named explicitly are always tried)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".gif")
HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
#: images larger than this (longer side, px) are downscaled for the Haar search only
HAAR_MAX_SIDE = 1280

#: Haar box (x, y, w, h) -> landmark box, in units of the Haar width w: the landmark box's centre
#: is (x + w/2 + HAAR_DX w, y + h/2 + HAAR_DY w), its size (HAAR_SW w, HAAR_SH w). Medians measured
#: by bench/calibrate_haar.py on ../shared/data/faces and ../shared/data/300w/lfpw/testset
#: (recorded in bench/RESULTS.md, "pipeline (issue 6)"). Used by the legacy ``face_detector="haar"``
#: path (and ``ectfast eval --boxes detector``) when ectfast.faces is not available.
HAAR_DX = 0.0061
HAAR_DY = 0.1601
HAAR_SW = 0.8525
HAAR_SH = 0.8396

_DATA_NAMES = ("box_from_landmarks", "crop_face")


def _data():
    """ectfast.nets.data (face boxes and crops), checked for the functions the pipeline needs."""
    mod = importlib.import_module("ectfast.nets.data")
    missing = [n for n in _DATA_NAMES if not hasattr(mod, n)]
    if missing:
        raise ImportError(f"ectfast.nets.data does not provide {', '.join(missing)} (the face-cropping "
                          "module is missing from this installation)")
    return mod


def _faces_module():
    """ectfast.faces (the face-detector layer), or None where it is not installed."""
    try:
        return importlib.import_module("ectfast.faces")
    except ModuleNotFoundError as e:
        if e.name not in ("ectfast.faces",):
            raise
        return None


# ------------------------------------------------------------------ image files


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


# ------------------------------------------------------------------ Haar (legacy path)

_CASCADE = None


def haar_cascade():
    """The frontal-face Haar cascade shipped with opencv-python(-headless) 4.x (cached)."""
    global _CASCADE
    if _CASCADE is None:
        import cv2

        folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
        path = os.path.join(folder, HAAR_FILE) if folder else None
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(
                f"the OpenCV Haar cascade {HAAR_FILE} was not found ({path or 'cv2.data.haarcascades is missing'});"
                " install opencv-python-headless 4.x, which ships it, or pass face boxes (boxes=...)"
                " or your own face_detector")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise FileNotFoundError(f"{path}: OpenCV could not load the Haar cascade (corrupt file?)")
        _CASCADE = cascade
    return _CASCADE


def haar_faces(image_bgr: np.ndarray) -> np.ndarray:
    """(k, 4) int array of Haar face boxes (x, y, w, h), largest first, in image pixels."""
    import cv2

    grey = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
    scale = 1.0
    if max(grey.shape) > HAAR_MAX_SIDE:
        scale = HAAR_MAX_SIDE / max(grey.shape)
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    found = haar_cascade().detectMultiScale(grey, scaleFactor=HAAR_SCALE_FACTOR,
                                            minNeighbors=HAAR_MIN_NEIGHBORS,
                                            minSize=(MIN_IMAGE_SIDE, MIN_IMAGE_SIDE))
    boxes = np.asarray(found, dtype=np.float64).reshape(-1, 4) / scale
    boxes = boxes[np.argsort(-boxes[:, 2], kind="stable")]
    return np.round(boxes).astype(np.int64)


def haar_to_box(haar_box) -> np.ndarray:
    """A Haar box (x, y, w, h) -> the crop box (x0, y0, x1, y1) of ectfast.nets.data.box_from_landmarks,
    through the calibrated landmark box (HAAR_DX, HAAR_DY, HAAR_SW, HAAR_SH)."""
    x, y, w, h = (float(v) for v in haar_box)
    cx, cy = x + w / 2 + HAAR_DX * w, y + h / 2 + HAAR_DY * w
    hw, hh = HAAR_SW * w / 2, HAAR_SH * w / 2
    corners = np.array([[cx - hw, cy - hh], [cx + hw, cy - hh], [cx + hw, cy + hh], [cx - hw, cy + hh]])
    return np.asarray(_data().box_from_landmarks(corners), dtype=np.float64)


def check_boxes(boxes, name: str = "boxes") -> np.ndarray:
    """(k, 4) float64 boxes (x0, y0, x1, y1) with x1 > x0, y1 > y0, finite."""
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected (k, 4) numbers (x0, y0, x1, y1), got {type(boxes).__name__}") from None
    if b.ndim == 1 and b.shape[0] == 4:
        b = b[None]
    if b.size == 0:
        return np.zeros((0, 4))
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (k, 4) of (x0, y0, x1, y1), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        raise ValueError(f"{name}: every box needs x1 > x0 and y1 > y0 (x0, y0, x1, y1), got {b.tolist()}")
    return b


# ------------------------------------------------------------------ the estimator (network)

#: the PyTorch estimator (kept under its old name)
NetEstimator = E.TorchEstimator
NO_WEIGHTS_MESSAGE = E.NO_WEIGHTS_MESSAGE


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' where torch sees a GPU, else 'cpu'; other values are checked
    (ValueError for a malformed device or a CUDA device torch cannot use)."""
    device = E.check_device(device)
    if device == "cpu":
        return device
    try:
        import torch
    except ImportError:
        if device == "auto":
            return "cpu"
        raise ValueError(f"device: {device!r} was requested but torch is not installed "
                         "(pip install 'ectfast[torch]'); use --device cpu") from None
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    E._torch_cuda_check(torch, device)
    return device


def make_estimator(weights=None, device: str = "auto", engine: str = "auto", threads: Optional[int] = None):
    """The network as an estimator (:func:`ectfast.nets.engine.make_estimator`)."""
    return E.make_estimator(weights, device, engine, threads)


def _host(x) -> np.ndarray:
    """Any array (NumPy, torch CPU/CUDA, CuPy) -> NumPy."""
    if type(x).__module__.split(".")[0] == "torch":
        return x.detach().cpu().numpy()
    if hasattr(x, "__cuda_array_interface__") and hasattr(x, "get"):
        return x.get()
    return np.asarray(x)


def _on_device(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch" and x.device.type == "cuda"


def upsample_factor(maps_size: int, crop_size: int = CROP_SIZE) -> int:
    if maps_size <= 0 or crop_size % maps_size:
        raise ValueError(f"estimator: response maps of {maps_size} px do not divide the {crop_size} px crop")
    f = crop_size // maps_size
    if f > 1 and f % 2:
        raise ValueError(f"estimator: maps of {maps_size} px need an odd x{f} upsampling (use 1 or an even factor)")
    return f


def crops_to_input(crops_bgr: Sequence[np.ndarray], size: Optional[int] = None) -> np.ndarray:
    """Crops (S x S x 3 BGR, uint8 or float 0..255) -> (B, 3, S, S) float32 RGB in [0, 1]; with
    ``size`` dividing S, averaged down to (B, 3, size, size) by k x k block means first (the
    network's input; cv2.resize INTER_AREA at an integer factor is that exact mean, and pooling
    before the layout change does 4x less work than after)."""
    import cv2

    crops = [np.asarray(c) for c in crops_bgr]
    side = crops[0].shape[0] if crops else 0
    pool = size is not None and 0 < size < side and side % size == 0
    out_side = size if pool else side
    out = np.empty((len(crops), 3, out_side, out_side), np.float32)
    for i, c in enumerate(crops):
        f = c.astype(np.float32)
        if f.ndim != 3 or f.shape[2] != 3 or f.shape[0] != side or f.shape[1] != side:
            raise ValueError(f"crops: expected {side}x{side}x3 crops, got shape {c.shape}")
        if pool:
            f = cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA)
        out[i] = f[..., ::-1].transpose(2, 0, 1)
    out *= np.float32(1.0 / 255.0)
    return np.clip(out, 0.0, 1.0, out=out)


def crop_affine(box, angle: float = 0.0, size: int = CROP_SIZE) -> np.ndarray:
    """The 2x3 affine image -> crop of the square ``size`` crop of ``box`` (x0, y0, x1, y1, the
    convention of ectfast.nets.data.crop_transform: the box centre at the crop centre, its larger side
    spanning the crop), rotated by -``angle`` (radians, image y down) about the box centre, so
    that a line at ``angle`` in the image (the eye line) is level in the crop."""
    b = np.asarray(box, dtype=np.float64).reshape(4)
    side = max(b[2] - b[0], b[3] - b[1])
    if not (np.isfinite(b).all() and side > 0):
        raise ValueError(f"box: expected a finite non-empty (x0, y0, x1, y1), got {box!r}")
    if not math.isfinite(angle):
        raise ValueError(f"angle: expected a finite number of radians, got {angle!r}")
    s = size / side
    c = (b[:2] + b[2:]) / 2
    h = (size - 1) / 2.0
    co, si = math.cos(angle), math.sin(angle)
    A = s * np.array([[co, si], [-si, co]])
    return np.hstack([A, (h - A @ c)[:, None]])


def crop_faces(images_bgr: Sequence[np.ndarray], image_index: Sequence[int], boxes: np.ndarray, angles=None):
    """Crop face k (box ``boxes[k]``, eye-line angle ``angles[k]`` radians or 0, in image
    ``image_index[k]``) of every face: returns the crops (list of 256 x 256 x 3) and their
    (k, 2, 3) image -> crop affine transforms."""
    import cv2

    data = _data()
    crops, Ms = [], []
    angles = np.zeros(len(boxes)) if angles is None else np.asarray(angles, dtype=np.float64).reshape(-1)
    for i, box, a in zip(image_index, boxes, angles):
        if a == 0.0:  # exactly the training crops' transform (ectfast.nets.data.crop_face)
            crop, M = data.crop_face(images_bgr[i], tuple(float(v) for v in box), size=CROP_SIZE)
        else:
            M = crop_affine(box, float(a))
            crop = cv2.warpAffine(images_bgr[i], M, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        crops.append(crop)
        Ms.append(np.asarray(M, dtype=np.float64).reshape(2, 3))
    return crops, np.stack(Ms) if Ms else np.zeros((0, 2, 3))


def crop_to_image(points: np.ndarray, Ms: np.ndarray) -> np.ndarray:
    """Map (k, n, 2) crop points back to image pixels with the inverses
    (``cv2.invertAffineTransform``) of the (k, 2, 3) image -> crop affines M."""
    import cv2

    Ms = np.asarray(Ms, dtype=np.float64).reshape(-1, 2, 3)
    pts = np.asarray(points, dtype=np.float64)
    out = np.empty_like(pts)
    for k, M in enumerate(Ms):
        if abs(np.linalg.det(M[:, :2])) < 1e-12:
            raise ValueError("crop transform: singular affine (an empty face box?)")
        inv = cv2.invertAffineTransform(M)
        out[k] = pts[k] @ inv[:, :2].T + inv[:, 2]
    return out


def run_pipeline(estimator: Callable, crops_bgr: Sequence[np.ndarray], Ms: np.ndarray, methods: Sequence[str],
                 *, pdm=None, backend: str = "auto", batch_size: int = 16, fit_options: Optional[dict] = None,
                 progress=None) -> dict:
    """Estimator once per crop, then ectfast.fit for each method on the same maps, in batches of
    ``batch_size``; landmarks mapped back to image pixels with the inverse of each crop's M.

    Returns {method: {"landmarks": (k, n, 2) image px, "crop_landmarks": (k, n, 2),
    "confidence": (k, n), "visible": (k, n) bool}}."""
    from ectfast.core import _dispatch
    from ectfast.core.fit import fit

    k = len(crops_bgr)
    out = {m: {"crop_landmarks": [], "confidence": [], "visible": []} for m in methods}
    keep_on_device = backend == "cuda" or (backend == "auto" and "cuda" in _dispatch.backends())
    net_size = getattr(estimator, "input_size", None)
    for s in range(0, k, batch_size):
        crop_side = int(np.asarray(crops_bgr[s]).shape[0])
        x = crops_to_input(crops_bgr[s:s + batch_size], net_size if isinstance(net_size, int) else None)
        maps = estimator(x)
        if not _on_device(maps) or not keep_on_device:
            maps = _host(maps)
            if maps.dtype.kind != "f":
                raise TypeError(f"estimator: expected float response maps, got dtype {maps.dtype}")
        shape = tuple(maps.shape)
        if len(shape) != 4 or shape[0] != len(x) or shape[2] != shape[3]:
            raise ValueError(f"estimator: expected ({len(x)}, n, h, h) response maps for {len(x)} crops, got {shape}")
        factor = upsample_factor(shape[-1], crop_side)  # the fit's frame is the crop's
        opts = {**(getattr(estimator, "fit_options", None) or {}), **(fit_options or {})}
        for m in methods:
            r = fit(maps, pdm, method=m, upsample=factor, backend=backend, **opts)
            out[m]["crop_landmarks"].append(_host(r.landmarks).astype(np.float64))
            out[m]["confidence"].append(_host(r.confidence).astype(np.float64))
            out[m]["visible"].append(_host(r.visible).astype(bool))
        if progress is not None:
            progress.update(len(x))
    for m in methods:
        res = out[m]
        for key in ("crop_landmarks", "confidence", "visible"):
            res[key] = np.concatenate(res[key]) if res[key] else np.zeros((0,))
        res["landmarks"] = crop_to_image(res["crop_landmarks"], Ms) if k else np.zeros((0, 0, 2))
    return out


# ------------------------------------------------------------------ the Detector


@dataclass
class Face:
    """One detected face. Coordinates are (x, y) image pixels, 0-based pixel centres."""

    box: np.ndarray  #: (4,) crop box (x0, y0, x1, y1), the convention of ectfast.nets.data.box_from_landmarks
    landmarks: np.ndarray  #: (68, 2)
    confidence: np.ndarray  #: (68,) in [0, 1]
    visible: np.ndarray  #: (68,) bool: confidence >= the visibility threshold
    score: Optional[float] = None  #: the face detector's score (None for boxes passed in)
    angle: float = 0.0  #: the crop's rotation: the eye line's angle in the image, radians

    def scaled(self, factor: float) -> "Face":
        """The same face with coordinates multiplied by ``factor``."""
        if factor == 1.0:
            return self
        return Face(self.box * factor, self.landmarks * factor, self.confidence, self.visible, self.score, self.angle)

    def to_dict(self) -> dict:
        return {"box": [float(v) for v in self.box],
                "score": None if self.score is None else float(self.score),
                "angle_deg": round(math.degrees(float(self.angle)), 3),
                "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
                "confidence": [float(c) for c in self.confidence],
                "visible": [bool(v) for v in self.visible]}


def _is_single(images) -> bool:
    if isinstance(images, (str, bytes, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return False


class _LegacyHaar:
    """Haar boxes calibrated to crop boxes (only where ectfast.faces is not installed)."""

    name = "haar"

    def __call__(self, image_bgr):
        found = haar_faces(image_bgr)
        return np.stack([haar_to_box(b) for b in found]) if len(found) else np.zeros((0, 4))


def default_face_detector():
    """The face detector of ``face_detector="auto"``: ``ectfast.faces.default_detector()``
    (BlazeFace, with fallbacks), or the calibrated Haar cascade where ectfast.faces is missing."""
    faces = _faces_module()
    if faces is None:
        haar_cascade()
        return _LegacyHaar()
    return faces.default_detector()


def _make_named_detector(name: str):
    if name == "auto":
        return default_face_detector()
    faces = _faces_module()
    if faces is None:
        if name == "haar":
            haar_cascade()
            return _LegacyHaar()
        raise ValueError(f"face_detector: {name!r} needs ectfast.faces, which this installation lacks "
                         "(only 'haar' and 'auto' are available)")
    try:
        return faces.make_detector(name)
    except ValueError as e:
        raise ValueError(f"face_detector: {e}") from None


def _check_unit(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number in [0, 1], got {value!r}") from None
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


@dataclass
class _Prepared:
    """An image with its faces found and cropped, waiting for the network and the fit."""
    index: int
    path: str
    image: Optional[np.ndarray] = None
    scale: float = 1.0
    width: int = 0
    height: int = 0
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    angles: np.ndarray = field(default_factory=lambda: np.zeros(0))
    scores: list = field(default_factory=list)
    crops: list = field(default_factory=list)
    Ms: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 3)))
    note: str = ""
    error: Optional[str] = None


@dataclass
class ImageResult:
    """One image file through :meth:`Detector.detect_files`. ``faces`` are in the decoded
    image's pixels (``image``); ``original_faces()`` in the file's (``scale`` = decoded /
    original side, 1 unless a large JPEG was decoded reduced). ``error``: why the image could
    not be used (then ``faces`` is empty); ``note``: e.g. why no face could be searched."""
    path: str
    faces: List[Face]
    width: int = 0
    height: int = 0
    scale: float = 1.0
    image: Optional[np.ndarray] = None
    note: str = ""
    error: Optional[str] = None

    def original_faces(self) -> List[Face]:
        return [f.scaled(1.0 / self.scale) for f in self.faces]


class Detector:
    """Faces and their 68 landmarks in images: face boxes -> 256 x 256 crops -> network -> ECT fit.

    engine: the network's inference engine, 'auto' (ONNX Runtime on CPU where the ONNX file
        exists, else PyTorch), 'onnxruntime' or 'torch' (``ectfast.nets.engine``).
    device: where the network runs ('auto', 'cpu', 'cuda', 'cuda:N'; ValueError when a CUDA
        device is asked for and not usable).
    backend: ectfast.fit's backend ("auto", "reference", "cpu", "cuda").
    weights: the network (None: the one shipped with ectfast; a .onnx or .pt file).
        estimator: instead of the network, any callable mapping crops (B, 3, 256, 256) float32
        RGB in [0, 1] to response maps (B, 68, h, h), h dividing 256; NumPy or torch.
    face_detector: 'auto' (``ectfast.faces.default_detector()``: BlazeFace, falling back to
        Haar), a detector name of ``ectfast.faces.make_detector`` ('blazeface-short', 'haar', ...),
        a detector object (``detect(image) -> list[FaceBox]``), a callable image_bgr -> (k, 4)
        crop boxes (x0, y0, x1, y1) in the convention of ectfast.nets.data.box_from_landmarks (or a
        list of FaceBox), or None (then every detect() call must pass boxes).
    align: rotate each crop by the detector's eye line (``ectfast.faces.crop_angle``).
    method: the ectfast.fit method ("ect", or an ablation variant). batch_size: faces per network
        and fit batch (faces of all images of a detect() call are batched together).
    visibility_threshold: tau in [0, 1] (None: the network's own, ``meta["fit"]["visibility_threshold"]``
        in its weights, else ectfast.fit's 0.5); fit_options: more keyword arguments for ectfast.fit.
    threads: the engine's CPU threads (None: its default).
    """

    def __init__(self, device: str = "auto", backend: str = "auto", weights=None, estimator=None,
                 face_detector="auto", *, engine: str = "auto", align: bool = True, method: str = "ect",
                 pdm=None, batch_size: int = 16, visibility_threshold: Optional[float] = None,
                 fit_options: Optional[dict] = None, threads: Optional[int] = None):
        from ectfast.core import _dispatch
        from ectfast.core.pdm import PDM, default_pdm

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        tau = None if visibility_threshold is None else _check_unit(visibility_threshold, "visibility_threshold")
        if engine not in E.ENGINES:
            raise ValueError(f"engine: expected one of {E.ENGINES}, got {engine!r}")
        E.check_device(device)
        if backend != "auto":
            _dispatch.get_ops(backend, on_device=backend == "cuda")  # raises when not built here
        if pdm is not None and not isinstance(pdm, PDM):
            raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
        if estimator is not None and not callable(estimator):
            raise TypeError(f"estimator: expected a callable (crops -> response maps), got {type(estimator).__name__}")
        _data()  # a clear ImportError now if the cropping module is missing
        self._name = None
        if face_detector is None:
            self.face_detector = None
        elif isinstance(face_detector, str):
            self.face_detector = _make_named_detector(face_detector)
            self._name = face_detector if face_detector != "auto" else None
        elif callable(face_detector) or callable(getattr(face_detector, "detect", None)):
            self.face_detector = face_detector
        else:
            raise ValueError(f"face_detector: expected 'auto', a detector name, a detector, a callable or "
                             f"None, got {face_detector!r}")
        self._local = threading.local()
        self._local.detector = self.face_detector
        self.align = bool(align)
        self.method = method
        self.backend = backend
        self.batch_size = int(batch_size)
        self.pdm = pdm if pdm is not None else default_pdm()
        self.fit_options = dict(fit_options or {})
        if tau is not None:
            self.fit_options["visibility_threshold"] = tau
        self.estimator = estimator if estimator is not None else make_estimator(weights, device, engine, threads)

    # -- names for reports
    @property
    def visibility_threshold(self) -> float:
        """The tau in effect: this Detector's, else the network's (its fit options), else 0.5."""
        for opts in (self.fit_options, getattr(self.estimator, "fit_options", None) or {}):
            if opts.get("visibility_threshold") is not None:
                return float(opts["visibility_threshold"])
        return 0.5

    @property
    def engine(self) -> str:
        return getattr(self.estimator, "engine", "custom")

    @property
    def face_detector_name(self) -> Optional[str]:
        d = self.face_detector
        if d is None:
            return None
        return getattr(d, "name", None) or getattr(d, "__name__", None) or type(d).__name__

    # -- face boxes
    def _thread_detector(self):
        """The face detector for this thread: detectors of ectfast.faces (OpenCV DNN nets and
        cascades) are not safe to share across threads, so each thread builds its own."""
        det = getattr(self._local, "detector", None)
        if det is None:
            base = self.face_detector
            name = getattr(base, "name", None)
            faces = _faces_module()
            det = base
            if faces is not None and isinstance(name, str) and hasattr(base, "detect"):
                try:
                    det = faces.make_detector(name)
                except Exception:
                    det = base
            self._local.detector = det
        return det

    def find_faces(self, image_bgr: np.ndarray) -> np.ndarray:
        """(k, 4) crop boxes of the faces in one BGR image (empty when none is found)."""
        return self.find_faces_full(image_bgr)[0]

    def find_faces_full(self, image_bgr: np.ndarray):
        """(boxes (k, 4) crop boxes, angles (k,) radians, scores list) of the faces in one BGR image."""
        import cv2

        if self.face_detector is None:
            raise ValueError("boxes: this Detector has no face_detector; pass the face boxes to detect()")
        h, w = image_bgr.shape[:2]
        if min(h, w) < MIN_IMAGE_SIDE:
            raise ValueError(f"image of {w}x{h} px is too small to find a face in (at least "
                             f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px); pass boxes= for a known face")
        det = self._thread_detector()
        img, f = image_bgr, 1.0
        named = hasattr(det, "detect") or isinstance(det, _LegacyHaar)
        if named and max(h, w) > DETECT_MAX_SIDE:  # detectors see a downscaled copy
            f = DETECT_MAX_SIDE / max(h, w)
            img = cv2.resize(image_bgr, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        found = det.detect(img) if hasattr(det, "detect") else det(img)
        boxes, angles, scores = self._normalise(found, det)
        if f != 1.0:
            boxes = boxes / f
        return boxes, angles, scores

    def _normalise(self, found, det):
        items = list(found) if not isinstance(found, np.ndarray) else None
        if items is not None and items and hasattr(items[0], "box"):
            faces = _faces_module()
            calib = getattr(det, "calibration_name", None) or getattr(det, "name", None)
            boxes, angles, scores = [], [], []
            for fb in items:
                name = getattr(fb, "detector", "") or calib
                boxes.append(faces.crop_box(fb, name) if faces is not None else fb.box)
                angles.append(faces.crop_angle(fb) if (faces is not None and self.align) else 0.0)
                scores.append(float(getattr(fb, "score", 0.0)))
            b = check_boxes(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "face_detector's boxes")
            return b, np.asarray(angles, dtype=np.float64), scores
        b = check_boxes(found if items is None or items else np.zeros((0, 4)), "face_detector's boxes").reshape(-1, 4)
        return b, np.zeros(len(b)), [None] * len(b)

    # -- the main entry
    def detect(self, images, boxes=None, *, rgb: bool = False):
        """Landmarks of the faces in one image or a batch.

        images: one image (array or path) or a list of them / an (N, H, W, C) array. Arrays are
            BGR as OpenCV gives them; ``rgb=True`` says they are RGB (RGBA for 4 channels).
        boxes: optional face boxes (x0, y0, x1, y1) in the convention of
            ectfast.nets.data.box_from_landmarks: for one image a (k, 4) array; for a batch a list with
            one (k, 4) array or None (= detect the faces) per image. Passed boxes are not rotated.
        Returns a list of :class:`Face` for one image, a list of such lists for a batch (an
        image without a face gives an empty list). Raises ValueError/TypeError naming the image
        for unreadable files, bad arrays, or images under 24 x 24 px without boxes.
        """
        single = _is_single(images)
        batch = [images] if single else list(images) if isinstance(images, (list, tuple, np.ndarray)) else None
        if batch is None:
            raise TypeError(f"images: expected an image (array or path) or a list of them, got {type(images).__name__}")
        if single:
            per_image_boxes = [boxes]
        elif boxes is None:
            per_image_boxes = [None] * len(batch)
        else:
            per_image_boxes = list(boxes)
            if len(per_image_boxes) != len(batch):
                raise ValueError(f"boxes: expected one entry (array or None) per image, got "
                                 f"{len(per_image_boxes)} for {len(batch)} images")
        bgr = [to_bgr(im, rgb=rgb, name=f"images[{i}]" if not single else "image") for i, im in enumerate(batch)]
        all_boxes, all_angles, all_scores, owner = [], [], [], []
        for i, (im, b) in enumerate(zip(bgr, per_image_boxes)):
            name = "image" if single else f"images[{i}]"
            try:
                if b is None:
                    found, angles, scores = self.find_faces_full(im)
                else:
                    found = check_boxes(b, "boxes" if single else f"boxes[{i}]")
                    angles, scores = np.zeros(len(found)), [None] * len(found)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            all_boxes.extend(found)
            all_angles.extend(angles)
            all_scores.extend(scores)
            owner.extend([i] * len(found))
        results: List[List[Face]] = [[] for _ in bgr]
        if all_boxes:
            boxes_arr = np.asarray(all_boxes, dtype=np.float64)
            crops, Ms = crop_faces(bgr, owner, boxes_arr, all_angles)
            res = self._fit(crops, Ms)
            for k, i in enumerate(owner):
                results[i].append(Face(box=boxes_arr[k], landmarks=res["landmarks"][k], confidence=res["confidence"][k],
                                       visible=res["visible"][k], score=all_scores[k], angle=float(all_angles[k])))
        return results[0] if single else results

    __call__ = detect

    def _fit(self, crops, Ms) -> dict:
        return run_pipeline(self.estimator, crops, Ms, [self.method], pdm=self.pdm, backend=self.backend,
                            batch_size=self.batch_size, fit_options=self.fit_options)[self.method]

    # -- files in bulk
    def _prepare(self, index: int, path: str, max_pixels: int, keep_image: bool) -> _Prepared:
        """Worker-thread part: read, find faces, crop. Never raises for a bad image."""
        p = _Prepared(index, path)
        try:
            loaded = read_image(path, max_pixels)
            img = loaded.image
            p.scale, p.width, p.height = loaded.scale, loaded.width, loaded.height
            h, w = img.shape[:2]
            if min(h, w) < MIN_IMAGE_SIDE:
                p.note = (f"image of {loaded.width}x{loaded.height} px is too small to contain a face "
                          f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px)")
            else:
                p.boxes, p.angles, p.scores = self.find_faces_full(img)
                if len(p.boxes):
                    p.crops, p.Ms = crop_faces([img], [0] * len(p.boxes), p.boxes, p.angles)
            p.image = img if keep_image else None
        except ImageError as e:
            p.error = str(e)
        except MemoryError:
            p.error = f"{path}: out of memory while reading or searching this image"
        except Exception as e:  # any other failure of this image: named, and the batch goes on
            p.error = f"{path}: {type(e).__name__}: {e}"
        return p

    def detect_files(self, paths: Sequence[str], *, max_pixels: int = MAX_PIXELS, workers: int = 2,
                     keep_images: bool = True, max_group_bytes: int = 256 * 2**20) -> Iterable[ImageResult]:
        """Landmarks of the faces in image files, as a generator of :class:`ImageResult` in input
        order. ``workers`` threads read, decode, search and crop the images ahead of the main
        thread, which runs the network and the fit on batches of ``batch_size`` faces from
        several images. A file that cannot be used gives an ImageResult with ``error`` set; the
        others go on. ``keep_images``: keep each decoded image in its result (for drawing)."""
        from concurrent.futures import ThreadPoolExecutor

        if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
            raise ValueError(f"workers: expected an integer >= 1, got {workers!r}")
        paths = [os.fspath(p) for p in paths]
        pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="ectfast-read")
        todo = iter(enumerate(paths))
        pending: deque = deque()
        ahead = int(workers) + 2

        def fill():
            while len(pending) < ahead:
                nxt = next(todo, None)
                if nxt is None:
                    return
                pending.append(pool.submit(self._prepare, nxt[0], nxt[1], max_pixels, True))

        try:
            fill()
            group, n_faces, n_bytes = [], 0, 0
            while pending:
                prep = pending.popleft().result()
                fill()
                group.append(prep)
                n_faces += len(prep.crops)
                n_bytes += prep.image.nbytes if prep.image is not None else 0
                if n_faces >= self.batch_size or n_bytes >= max_group_bytes or not pending:
                    yield from self._finish(group, keep_images)
                    group, n_faces, n_bytes = [], 0, 0
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self, group: List[_Prepared], keep_images: bool):
        crops = [c for p in group if p.error is None for c in p.crops]
        res = None
        if crops:
            Ms = np.concatenate([p.Ms for p in group if p.error is None and len(p.crops)])
            try:
                res = self._fit(crops, Ms)
            except Exception as e:  # should not happen: report it on every image of the group
                for p in group:
                    if p.error is None and len(p.crops):
                        p.error = f"{p.path}: the network or the fit failed ({type(e).__name__}: {e})"
        k = 0
        for p in group:
            if p.error is not None:
                yield ImageResult(p.path, [], p.width, p.height, p.scale, None, p.note, p.error)
                continue
            faces = []
            for j in range(len(p.crops)):
                faces.append(Face(box=p.boxes[j], landmarks=res["landmarks"][k], confidence=res["confidence"][k],
                                  visible=res["visible"][k], score=p.scores[j], angle=float(p.angles[j])))
                k += 1
            yield ImageResult(p.path, faces, p.width, p.height, p.scale, p.image if keep_images else None, p.note)


# ------------------------------------------------------------------ drawing


def draw_faces(image_bgr: np.ndarray, faces: Sequence[Face]) -> np.ndarray:
    """A copy of the image with every face's box and landmarks drawn: each point coloured from
    red (confidence 0) to green (confidence 1); points predicted occluded get a cross instead of
    a dot."""
    import cv2

    out = image_bgr.copy()
    for f in faces:
        side = float(f.box[2] - f.box[0])
        r = max(1, int(round(side / 160)))
        th = max(1, r // 2)
        if f.angle:  # the rotated crop's square
            c = (f.box[:2] + f.box[2:]) / 2
            corners = cv2.boxPoints(((float(c[0]), float(c[1])), (side, side), math.degrees(f.angle)))
            cv2.polylines(out, [np.round(corners).astype(np.int32)], True, (255, 160, 0), th, cv2.LINE_AA)
        else:
            x0, y0, x1, y1 = (int(round(v)) for v in f.box)
            cv2.rectangle(out, (x0, y0), (x1, y1), (255, 160, 0), th, cv2.LINE_AA)
        for (x, y), c, v in zip(f.landmarks, f.confidence, f.visible):
            c = float(np.clip(c, 0.0, 1.0))
            colour = (0, int(round(255 * c)), int(round(255 * (1 - c))))
            p = (int(round(x)), int(round(y)))
            if v:
                cv2.circle(out, p, r + 1, colour, -1, cv2.LINE_AA)
            else:
                cv2.drawMarker(out, p, colour, cv2.MARKER_TILTED_CROSS, 4 * r + 4, th + 1, cv2.LINE_AA)
    return out


# ------------------------------------------------------------------ ectfast detect

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_INTERRUPTED = 130
EXAMPLE_IMAGE = asset("einstein.jpg")
EXAMPLE_OUT = "ectfast-example"
DEFAULT_OUT = "ectfast-detect"

EPILOG = f"""\
outputs:
  For each image, NAME.json (image size, engine, method, threshold, and per face: crop box,
  detector score, eye-line angle, 68 landmarks in the file's pixels, confidences, visibility)
  next to NAME_landmarks.EXT (the image with boxes and landmarks drawn; --no-draw skips it), in
  --out DIR. Images found in a folder keep their sub-folders under DIR. With --jsonl FILE, one
  JSON object per line goes to FILE (or stdout for '-') instead of the per-image JSON files
  (annotated images then only with --out). Files are written as each batch finishes, atomically,
  so a crash or Ctrl-C loses nothing already written; a rerun of the same command skips the
  images already done (--overwrite redoes them). An image without a face is a result: its JSON
  has "faces": [].

bad input:
  An unreadable, empty, truncated or corrupt file, a non-image, an image over --max-megapixels
  (large JPEGs are decoded reduced instead) gets one line 'ectfast detect: PATH: reason' on
  stderr and the rest goes on. A summary line ends the run.

exit status:
  {EXIT_OK}    every image was processed (with or without faces)
  {EXIT_FAILED}    some images could not be processed (each named on stderr); the others were written
  {EXIT_USAGE}    usage or setup error: bad option, no input images, no network weights, engine or
       device not available (e.g. --device cuda without CUDA)
  {EXIT_OUTPUT}    the output cannot be written (folder not creatable/writable, disk full): stops at once
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); what was written is kept, rerun to continue
"""


def _megapixels(text: str) -> float:
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
        return E.check_device(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("images", nargs="*", metavar="PATH",
                   help="image files, or folders searched recursively for "
                        f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS[:6])}, ... files")
    p.add_argument("--example", action="store_true",
                   help="run on the photograph shipped with ectfast (einstein.jpg: two faces), "
                        f"writing to --out (default {EXAMPLE_OUT}/)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"folder for NAME.json and NAME_landmarks.EXT (default: {DEFAULT_OUT}/)")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help="write one JSON line per image to FILE ('-': stdout) instead of NAME.json files")
    p.add_argument("--no-draw", action="store_true", help="do not write the annotated images")
    p.add_argument("--overwrite", action="store_true", help="redo images already done by an earlier run")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # always on now; kept for old scripts
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the network: a .onnx (ectfast export-onnx) or .pt file (default: the shipped one)")
    p.add_argument("--engine", default="auto", choices=E.ENGINES,
                   help="inference engine: auto (ONNX Runtime on CPU when an ONNX file is there, "
                        "measured faster; else PyTorch), onnxruntime, torch (default: auto)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="where the network runs: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="the engine's CPU threads (default: its own)")
    p.add_argument("--face-detector", default="auto", metavar="NAME",
                   help="auto (BlazeFace, falling back to Haar), blazeface-short, blazeface-full, haar, "
                        "dlib-hog (default: auto)")
    p.add_argument("--no-align", action="store_true", help="do not rotate crops by the detector's eye line")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda"),
                   help="ectfast.fit backend (default: auto)")
    p.add_argument("--method", default="ect", choices=METHODS, help="fitting method (default: ect)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="faces per network/fit batch (default: 16)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="threads reading and searching images ahead of the network (default: 2)")
    p.add_argument("--threshold", type=unit_float, default=None,
                   help="visibility threshold tau in [0, 1] on the landmark confidence (default: the "
                        "network's own, stored with its weights, else 0.5)")
    p.add_argument("--max-megapixels", type=_megapixels, default=MAX_PIXELS / 1e6,
                   help="largest image decoded in full; larger JPEGs are decoded at 1/2, 1/4 or 1/8, "
                        "other formats refused (default: %(default)g)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per finished image on stdout")
    p.epilog = EPILOG


class _Reporter:
    """stdout/stderr lines that keep the progress bar intact, all through the lock that the
    image decoder takes while it captures the C libraries' stderr."""

    class _Locked:
        def __init__(self, stream):
            self.stream = stream

        def write(self, s):
            with _STDERR_LOCK:
                n = self.stream.write(s)
                self.stream.flush()
                return n

        def flush(self):
            with _STDERR_LOCK:
                self.stream.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def __init__(self, total: int, progress: bool):
        self.err_stream = self._Locked(sys.stderr)
        self.stdout_closed = False
        self.bar = None
        if progress and total > 1:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", file=self.err_stream, dynamic_ncols=True,
                            disable=None, desc="detect")

    def _write(self, msg, stream):
        with _STDERR_LOCK:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg, file=stream)
            else:
                print(msg, file=stream, flush=True)

    def err(self, msg):
        self._write(f"ectfast detect: {msg}", self.err_stream)

    def out(self, msg):
        if self.stdout_closed:
            return
        try:
            self._write(msg, sys.stdout)
        except BrokenPipeError:  # e.g. `ectfast detect ... | head`: the work goes on, unprinted
            self.stdout_closed = True

    def step(self, n=1):
        if self.bar is not None:
            with _STDERR_LOCK:
                self.bar.update(n)

    def close(self):
        if self.bar is not None:
            with _STDERR_LOCK:
                self.bar.close()


class OutputError(OSError):
    """The output cannot be written (exit status 3)."""


def discover_inputs(args_paths: Sequence[str], exclude: Optional[str] = None):
    """(path, relative stem) of every image to process: files as given (stem = their name),
    folders searched recursively for IMAGE_EXTENSIONS (stem = the path inside the folder),
    sorted; ``exclude`` (the output folder) is never searched. Missing paths are returned too
    (they fail with 'no such file')."""
    ex = os.path.realpath(exclude) if exclude else None
    found = []
    for a in args_paths:
        if os.path.isdir(a):
            for root, dirs, files in os.walk(a):
                dirs[:] = sorted(d for d in dirs if not (ex and os.path.realpath(os.path.join(root, d)) == ex))
                for f in sorted(files):
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        full = os.path.join(root, f)
                        found.append((full, os.path.splitext(os.path.relpath(full, a))[0]))
        else:
            found.append((a, os.path.splitext(os.path.basename(a))[0] or "image"))
    used, out = set(), []
    for path, stem in found:
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        out.append((path, name))
    return out


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OutputError(e.errno, f"cannot write {path}: {e.strerror or e}") from None


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(e.errno, f"cannot create the output folder {folder}: {e.strerror or e}") from None
    probe = os.path.join(folder, f".ectfast-write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise OutputError(e.errno, f"the output folder {folder} is not writable: {e.strerror or e}") from None


def _json_done(json_path: str, image_path: str) -> bool:
    try:
        with open(json_path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("image") == image_path and "faces" in doc


def _jsonl_done(path: str) -> set:
    done = set()
    if not os.path.isfile(path):  # a new file, or a device/pipe (never read those back)
        return done
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and "error" not in rec and "image" in rec:
                    done.add(rec["image"])
    except FileNotFoundError:
        pass
    return done


def _record(det: Detector, r: ImageResult, annotated: Optional[str]) -> dict:
    from ectfast import __version__

    doc = {"image": r.path, "width": int(r.width), "height": int(r.height)}
    if r.scale != 1.0:
        doc["decoded_scale"] = r.scale
    doc.update({"ectfast": __version__, "engine": det.engine, "face_detector": det.face_detector_name,
                "method": det.method, "visibility_threshold": det.visibility_threshold,
                "faces": [f.to_dict() for f in r.original_faces()]})
    if r.note:
        doc["note"] = r.note
    doc["annotated"] = annotated
    return doc


def run(args, *, estimator=None) -> int:
    """``ectfast detect``; ``estimator`` (Python callers and tests only) replaces the network."""
    import cv2

    t0 = time.perf_counter()
    stdout_stream = args.jsonl == "-"
    if args.example:
        if args.images:
            print("ectfast detect: --example takes no PATH (it runs on the shipped photograph)", file=sys.stderr)
            return EXIT_USAGE
        if not os.path.isfile(EXAMPLE_IMAGE):
            print(f"ectfast detect: the example photograph {EXAMPLE_IMAGE} is missing from this installation",
                  file=sys.stderr)
            return EXIT_USAGE
        paths_in = [EXAMPLE_IMAGE]
        out_dir = args.out or EXAMPLE_OUT
    else:
        if not args.images:
            print("ectfast detect: no PATH given (image files or folders; or --example)", file=sys.stderr)
            return EXIT_USAGE
        paths_in = list(args.images)
        out_dir = args.out if args.out is not None else (None if args.jsonl else DEFAULT_OUT)
    draw = out_dir is not None and not args.no_draw
    inputs = discover_inputs(paths_in, exclude=out_dir)
    if not inputs:
        print(f"ectfast detect: no image files found in {', '.join(paths_in)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        det = Detector(device=args.device, backend=args.backend, weights=args.weights, estimator=estimator,
                       face_detector=args.face_detector, engine=args.engine, align=not args.no_align,
                       method=args.method, batch_size=args.batch_size, visibility_threshold=args.threshold,
                       threads=args.threads)
    except (FileNotFoundError, ImportError, ValueError, TypeError, RuntimeError) as e:
        print(f"ectfast detect: {e}", file=sys.stderr)
        return EXIT_USAGE
    overwrite = args.overwrite or args.example
    try:
        if out_dir is not None:
            _check_writable(out_dir)
        jsonl_fh = None
        done_jsonl = set()
        if args.jsonl and not stdout_stream:
            if not overwrite:
                done_jsonl = _jsonl_done(args.jsonl)
            d = os.path.dirname(os.path.abspath(args.jsonl))
            if not os.path.isdir(d):
                _check_writable(d)
            try:
                jsonl_fh = open(args.jsonl, "w" if overwrite else "a", encoding="utf-8")
                if os.path.isfile(args.jsonl) and jsonl_fh.tell() > 0:
                    with open(args.jsonl, "rb") as fh:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            jsonl_fh.write("\n")  # end a line cut by a crash
            except OSError as e:
                raise OutputError(e.errno, f"cannot write {args.jsonl}: {e.strerror or e}") from None
        elif stdout_stream:
            jsonl_fh = sys.stdout
    except OutputError as e:
        print(f"ectfast detect: {e.strerror}", file=sys.stderr)
        return EXIT_OUTPUT

    todo, skipped = [], 0
    for path, stem in inputs:
        json_path = os.path.join(out_dir, stem + ".json") if out_dir is not None else None
        if not overwrite and ((args.jsonl and path in done_jsonl) or
                              (not args.jsonl and json_path and _json_done(json_path, path))):
            skipped += 1
            continue
        todo.append((path, stem))
    rep = _Reporter(len(todo), progress=not args.no_progress)
    if skipped:
        rep.err(f"skipping {skipped} image(s) already done by an earlier run (--overwrite redoes them)")
    n_ok = n_empty = n_faces = 0
    failed: List[str] = []
    status = None
    example_written: List[str] = []
    results = det.detect_files([p for p, _ in todo], max_pixels=int(args.max_megapixels * 1e6),
                               workers=args.workers, keep_images=draw)
    try:
        for (_, stem), r in zip(todo, results):  # results come in input order
            rep.step()
            if r.error is not None:
                failed.append(r.path)
                rep.err(r.error)
                if jsonl_fh is not None:
                    jsonl_fh.write(json.dumps({"image": r.path, "error": r.error}) + "\n")
                    jsonl_fh.flush()
                continue
            annotated = None
            if draw:
                ext = os.path.splitext(r.path)[1].lower()
                ext = ext if ext in (".jpg", ".jpeg", ".png") else ".png"
                annotated = os.path.join(out_dir, f"{stem}_landmarks{ext}")
                ok, buf = cv2.imencode(ext, draw_faces(r.image, r.faces))
                if not ok:
                    raise OutputError(0, f"cannot encode {annotated}")
                _atomic_write(annotated, buf.tobytes())
            doc = _record(det, r, annotated)
            written = [annotated] if annotated else []
            if jsonl_fh is not None:
                try:
                    jsonl_fh.write(json.dumps(doc) + "\n")
                    jsonl_fh.flush()
                except OSError as e:
                    raise OutputError(e.errno, f"cannot write {args.jsonl}: {e.strerror or e}") from None
            else:
                json_path = os.path.join(out_dir, stem + ".json")
                _atomic_write(json_path, json.dumps(doc, indent=1).encode("utf-8"))
                written.insert(0, json_path)
            n_faces += len(r.faces)
            if args.example:
                example_written = written
            if r.faces:
                n_ok += 1
                if not args.quiet and not stdout_stream:
                    rep.out(f"{r.path}: {len(r.faces)} face(s) -> {', '.join(written) or args.jsonl}")
            else:
                n_empty += 1
                rep.err(f"{r.path}: {r.note or 'no face found'}")
    except OutputError as e:
        rep.close()
        print(f"ectfast detect: {e.strerror}; stopped (outputs written so far are kept)", file=sys.stderr)
        status = EXIT_OUTPUT
    except KeyboardInterrupt:
        rep.close()
        print("ectfast detect: interrupted; outputs written so far are kept, rerun the same command to "
              "continue", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        results.close()
        if jsonl_fh is not None and jsonl_fh is not sys.stdout:
            try:
                jsonl_fh.close()
            except OSError as e:  # the last flush failed
                if status is None:
                    print(f"ectfast detect: cannot write {args.jsonl}: {e.strerror or e}", file=sys.stderr)
                    status = EXIT_OUTPUT
    rep.close()
    dt = time.perf_counter() - t0
    done = n_ok + n_empty
    where = out_dir if out_dir is not None else args.jsonl
    summary = (f"{done} image(s) processed ({n_ok} with faces, {n_empty} without; {n_faces} faces), "
               f"{len(failed)} failed, {skipped} skipped as already done; {dt:.1f} s"
               + (f", {done / dt:.1f} images/s" if dt > 0 and done else "")
               + (f"; results in {where}" if where and where != "-" else ""))
    print(f"ectfast detect: {summary}", file=sys.stderr)
    if args.example and status is None and example_written:
        print(f"example: wrote {' and '.join(example_written)}")
    if status is not None:
        return status
    return EXIT_FAILED if failed else EXIT_OK
