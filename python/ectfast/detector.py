"""``ectfast.Detector`` (images -> faces with 68 landmarks) and the ``ectfast detect`` command.

The pipeline, for a batch of images:

1. faces: OpenCV's frontal-face Haar cascade (or a callable, or boxes the caller passes), each
   face turned into a crop box in the convention of :func:`ectfast.data.box_from_landmarks`
   (the square box, 1.3 x the landmark box, that training crops use);
2. crops: every face of every image cropped to 256 x 256 (:func:`ectfast.data.crop_face`);
3. estimation: the FCN (``ectfast.model``) on batches of crops -> 68 response maps each;
4. :func:`ectfast.fit` (ECT by default) on the same batches -> landmarks, confidence,
   visibility, in crop pixels;
5. landmarks mapped back to image pixels with the inverse of each crop's affine transform.

Images are NumPy arrays as OpenCV gives them (H x W x 3 uint8, **BGR**; pass ``rgb=True`` for
RGB arrays), grey H x W, H x W x 1 or 4-channel (BGRA / RGBA) arrays (converted), float arrays
in [0, 1], or paths to image files.

Command line: ``ectfast detect IMAGE... [--out DIR] [--json] [--weights PATH]`` writes
``DIR/NAME_landmarks.EXT`` (the image with the face box and landmarks drawn, each point coloured
red -> green by confidence, points predicted occluded drawn as a cross) and, with ``--json``,
``DIR/NAME.json`` (image size, method, visibility threshold and per face: box, 68 landmarks,
confidences, visibility). Images are processed independently: an unreadable/corrupt file, an
image under 24 x 24 px or an image without a face gets a one-line message and the rest of the
batch goes on; outputs already written are kept. Exit status: 0 when at least one image gave a
face, 1 when every image failed, 2 for a setup error (no weights, bad option) -- a message,
never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from .fit import METHODS

CROP_SIZE = 256
#: the smallest window the Haar cascade scans; smaller images cannot contain a detectable face
MIN_IMAGE_SIDE = 24
HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
#: images larger than this (longer side, px) are downscaled for the Haar search only
HAAR_MAX_SIDE = 1280

#: Haar box (x, y, w, h) -> landmark box, in units of the Haar width w: the landmark box's centre
#: is (x + w/2 + HAAR_DX w, y + h/2 + HAAR_DY w), its size (HAAR_SW w, HAAR_SH w). Medians measured
#: by bench/calibrate_haar.py on ../shared/data/faces (4 photographs; Haar finds the annotated
#: face in 2: lenna, takeo) and ../shared/data/300w/lfpw/testset (224 faces, 221 found): 223
#: matched faces, 10%..90% spread dx -0.089..+0.091, dy +0.116..+0.203, sw 0.770..0.942,
#: sh 0.769..0.948 (recorded in bench/RESULTS.md, "pipeline (issue 6)").
HAAR_DX = 0.0061
HAAR_DY = 0.1601
HAAR_SW = 0.8525
HAAR_SH = 0.8396

_DATA_NAMES = ("box_from_landmarks", "crop_face")


def _data():
    """ectfast.data (face boxes and crops), checked for the functions the pipeline needs."""
    mod = importlib.import_module("ectfast.data")
    missing = [n for n in _DATA_NAMES if not hasattr(mod, n)]
    if missing:
        raise ImportError(f"ectfast.data does not provide {', '.join(missing)} (the face-cropping "
                          "module is missing from this installation)")
    return mod


# ------------------------------------------------------------------ images


def load_image(path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 BGR (grey and RGBA files are converted)."""
    import cv2

    p = os.fspath(path)
    if not os.path.exists(p):
        raise ValueError(f"{p}: no such file")
    if os.path.isdir(p):
        raise ValueError(f"{p}: is a directory, not an image")
    img = cv2.imread(p, cv2.IMREAD_COLOR)
    if img is None or img.size == 0:
        raise ValueError(f"{p}: cannot read the image (not an image format OpenCV reads, or corrupt)")
    return img


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


# ------------------------------------------------------------------ face boxes

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
    """A Haar box (x, y, w, h) -> the crop box (x0, y0, x1, y1) of ectfast.data.box_from_landmarks,
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
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (k, 4) of (x0, y0, x1, y1), got {b.shape}")
    if not np.isfinite(b).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any():
        raise ValueError(f"{name}: every box needs x1 > x0 and y1 > y0 (x0, y0, x1, y1), got {b.tolist()}")
    return b


# ------------------------------------------------------------------ the estimator (FCN)


def resolve_device(device: str) -> str:
    if not isinstance(device, str) or not device:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class NetEstimator:
    """The FCN as an estimator: crops (B, 3, 256, 256) float32 RGB in [0, 1] -> the FusionNet's
    (B, 68, 64, 64) maps (the final 256 x 256 maps are their fixed bilinear x4 upsampling, which
    ectfast.fit reproduces with ``upsample=4``). Maps stay on the GPU when the model runs there."""

    def __init__(self, weights=None, device: str = "auto"):
        try:
            import torch
        except ImportError:
            raise ImportError("the FCN needs PyTorch: pip install 'ectfast[torch]'") from None
        try:
            model = importlib.import_module("ectfast.model")
        except ModuleNotFoundError as e:
            if e.name not in ("ectfast.model", "ectfast"):
                raise
            raise ImportError("the FCN module ectfast.model is missing from this installation, so no "
                              "trained weights can be loaded") from None
        self.torch = torch
        self.device = resolve_device(device)
        net = model.load_pretrained(None if weights is None else os.fspath(weights), device=self.device)
        self.net = net.eval() if hasattr(net, "eval") else net
        #: the network's input side: 256 crops are averaged down to it (the lite net takes 128)
        self.input_size = int(getattr(net, "input_size", CROP_SIZE))
        #: fit parameters chosen for this network's maps (stored with its weights)
        self.fit_options = dict((getattr(net, "meta", None) or {}).get("fit", {}))

    def __call__(self, crops: np.ndarray):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32)).to(self.device)
            if x.shape[-1] > self.input_size:  # 2x2 averaging = the training crops' resize
                x = torch.nn.functional.avg_pool2d(x, x.shape[-1] // self.input_size)
            out = self.net(x)
            return out[1] if isinstance(out, (tuple, list)) else out


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


def crops_to_input(crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
    """Crops (H x W x 3 BGR, uint8 or float 0..255) -> (B, 3, H, W) float32 RGB in [0, 1]."""
    x = np.stack([np.asarray(c) for c in crops_bgr]).astype(np.float32)
    x = x[..., ::-1].transpose(0, 3, 1, 2) / 255.0
    return np.ascontiguousarray(np.clip(x, 0.0, 1.0))


def crop_faces(images_bgr: Sequence[np.ndarray], image_index: Sequence[int], boxes: np.ndarray):
    """Crop face k (box ``boxes[k]``, in image ``image_index[k]``) of every face: returns the
    crops (list of 256 x 256 x 3) and their (k, 2, 3) image -> crop affine transforms."""
    data = _data()
    crops, Ms = [], []
    for i, box in zip(image_index, boxes):
        crop, M = data.crop_face(images_bgr[i], tuple(float(v) for v in box), size=CROP_SIZE)
        crops.append(crop)
        Ms.append(np.asarray(M, dtype=np.float64).reshape(2, 3))
    return crops, np.stack(Ms) if Ms else np.zeros((0, 2, 3))


def crop_to_image(points: np.ndarray, Ms: np.ndarray) -> np.ndarray:
    """Map (k, n, 2) crop points back to image pixels with the inverses of the (k, 2, 3)
    image -> crop affines M (x_crop = M[:, :2] x_image + M[:, 2])."""
    A = np.asarray(Ms, dtype=np.float64)[:, :, :2]
    t = np.asarray(Ms, dtype=np.float64)[:, :, 2]
    if (np.abs(np.linalg.det(A)) < 1e-12).any():
        raise ValueError("crop transform: singular affine (an empty face box?)")
    Ainv = np.linalg.inv(A)
    return np.einsum("kij,knj->kni", Ainv, np.asarray(points, dtype=np.float64) - t[:, None, :])


def run_pipeline(estimator: Callable, crops_bgr: Sequence[np.ndarray], Ms: np.ndarray, methods: Sequence[str],
                 *, pdm=None, backend: str = "auto", batch_size: int = 16, fit_options: Optional[dict] = None,
                 progress=None) -> dict:
    """Estimator once per crop, then ectfast.fit for each method on the same maps, in batches of
    ``batch_size``; landmarks mapped back to image pixels with the inverse of each crop's M.

    Returns {method: {"landmarks": (k, n, 2) image px, "crop_landmarks": (k, n, 2),
    "confidence": (k, n), "visible": (k, n) bool}}."""
    from . import _dispatch
    from .fit import fit

    k = len(crops_bgr)
    out = {m: {"crop_landmarks": [], "confidence": [], "visible": []} for m in methods}
    keep_on_device = backend == "cuda" or (backend == "auto" and "cuda" in _dispatch.backends())
    for s in range(0, k, batch_size):
        x = crops_to_input(crops_bgr[s:s + batch_size])
        maps = estimator(x)
        if not _on_device(maps) or not keep_on_device:
            maps = _host(maps)
            if maps.dtype.kind != "f":
                raise TypeError(f"estimator: expected float response maps, got dtype {maps.dtype}")
        shape = tuple(maps.shape)
        if len(shape) != 4 or shape[0] != len(x) or shape[2] != shape[3]:
            raise ValueError(f"estimator: expected ({len(x)}, n, h, h) response maps for {len(x)} crops, got {shape}")
        factor = upsample_factor(shape[-1], x.shape[-1])
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

    box: np.ndarray  #: (4,) crop box (x0, y0, x1, y1), the convention of ectfast.data.box_from_landmarks
    landmarks: np.ndarray  #: (68, 2)
    confidence: np.ndarray  #: (68,) in [0, 1]
    visible: np.ndarray  #: (68,) bool: confidence >= the visibility threshold

    def to_dict(self) -> dict:
        return {"box": [float(v) for v in self.box],
                "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
                "confidence": [float(c) for c in self.confidence],
                "visible": [bool(v) for v in self.visible]}


def _is_single(images) -> bool:
    if isinstance(images, (str, bytes, os.PathLike)):
        return True
    if isinstance(images, np.ndarray):
        return images.ndim in (2, 3)
    return False


class Detector:
    """Faces and their 68 landmarks in images: face boxes -> 256 x 256 crops -> FCN -> ECT fit.

    device: where the FCN runs ("auto": CUDA when torch sees a GPU, else "cpu").
    backend: ectfast.fit's backend ("auto", "reference", "cpu", "cuda").
    weights: a checkpoint of the FCN (None: the weights shipped with ectfast; FileNotFoundError
        when there are none). estimator: instead of the FCN, any callable mapping crops
        (B, 3, 256, 256) float32 RGB in [0, 1] to response maps (B, 68, h, h), h dividing 256
        (64 -> fitted with x4 upsampling, 256 -> as is); NumPy or torch.
    face_detector: "haar" (OpenCV's frontal-face cascade, boxes calibrated to the landmark-box
        convention), a callable image_bgr -> (k, 4) boxes (x0, y0, x1, y1) in the convention of
        ectfast.data.box_from_landmarks, or None (then every detect() call must pass boxes).
    method: the ectfast.fit method ("ect", or an ablation variant). batch_size: faces per FCN and
        fit batch (faces of all images of a detect() call are batched together).
    visibility_threshold: tau; fit_options: more keyword arguments for ectfast.fit.
    """

    def __init__(self, device: str = "auto", backend: str = "auto", weights=None, estimator=None,
                 face_detector="haar", *, method: str = "ect", pdm=None, batch_size: int = 16,
                 visibility_threshold: float = 0.5, fit_options: Optional[dict] = None):
        from . import _dispatch
        from .pdm import PDM, default_pdm

        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
        if backend != "auto":
            _dispatch.get_ops(backend, on_device=backend == "cuda")  # raises when not built here
        if pdm is not None and not isinstance(pdm, PDM):
            raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
        if not (face_detector is None or face_detector == "haar" or callable(face_detector)):
            raise ValueError(f"face_detector: expected 'haar', a callable or None, got {face_detector!r}")
        if face_detector == "haar":
            haar_cascade()  # a clear error now if the cascade file is missing
        if estimator is not None and not callable(estimator):
            raise TypeError(f"estimator: expected a callable (crops -> response maps), got {type(estimator).__name__}")
        _data()  # a clear ImportError now if the cropping module is missing
        self.method = method
        self.backend = backend
        self.batch_size = int(batch_size)
        self.face_detector = face_detector
        self.pdm = pdm if pdm is not None else default_pdm()
        self.fit_options = dict(fit_options or {})
        self.fit_options["visibility_threshold"] = float(visibility_threshold)
        self.estimator = estimator if estimator is not None else NetEstimator(weights, device)

    # -- face boxes
    def find_faces(self, image_bgr: np.ndarray) -> np.ndarray:
        """(k, 4) crop boxes of the faces in one BGR image (empty when none is found)."""
        if self.face_detector is None:
            raise ValueError("boxes: this Detector has no face_detector; pass the face boxes to detect()")
        if self.face_detector == "haar":
            h, w = image_bgr.shape[:2]
            if min(h, w) < MIN_IMAGE_SIDE:
                raise ValueError(f"image of {w}x{h} px is too small to find a face in (at least "
                                 f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px); pass boxes= for a known face")
            found = haar_faces(image_bgr)
            return np.stack([haar_to_box(b) for b in found]) if len(found) else np.zeros((0, 4))
        return check_boxes(self.face_detector(image_bgr), "face_detector's boxes").reshape(-1, 4)

    # -- the main entry
    def detect(self, images, boxes=None, *, rgb: bool = False):
        """Landmarks of the faces in one image or a batch.

        images: one image (array or path) or a list of them / an (N, H, W, C) array. Arrays are
            BGR as OpenCV gives them; ``rgb=True`` says they are RGB (RGBA for 4 channels).
        boxes: optional face boxes (x0, y0, x1, y1) in the convention of
            ectfast.data.box_from_landmarks: for one image a (k, 4) array; for a batch a list with
            one (k, 4) array or None (= detect the faces) per image.
        Returns a list of :class:`Face` for one image, a list of such lists for a batch (an
        image without a face gives an empty list). Raises ValueError/TypeError naming the image
        for unreadable files, bad arrays, or (with the Haar detector) images under 24 x 24 px.
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
        all_boxes, owner = [], []
        for i, (im, b) in enumerate(zip(bgr, per_image_boxes)):
            name = "image" if single else f"images[{i}]"
            try:
                found = self.find_faces(im) if b is None else check_boxes(b, "boxes" if single else f"boxes[{i}]")
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            all_boxes.extend(found)
            owner.extend([i] * len(found))
        results: List[List[Face]] = [[] for _ in bgr]
        if all_boxes:
            boxes_arr = np.asarray(all_boxes, dtype=np.float64)
            crops, Ms = crop_faces(bgr, owner, boxes_arr)
            res = run_pipeline(self.estimator, crops, Ms, [self.method], pdm=self.pdm, backend=self.backend,
                               batch_size=self.batch_size, fit_options=self.fit_options)[self.method]
            for k, i in enumerate(owner):
                results[i].append(Face(box=boxes_arr[k], landmarks=res["landmarks"][k],
                                       confidence=res["confidence"][k], visible=res["visible"][k]))
        return results[0] if single else results

    __call__ = detect


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

NO_WEIGHTS_MESSAGE = ("no trained FCN weights are available: this installation of ectfast ships "
                      "none. Train them with `ectfast train` and pass --weights PATH.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format OpenCV reads)")
    p.add_argument("--out", default="ectfast-detect", metavar="DIR",
                   help="folder for the drawn images NAME_landmarks.EXT (and NAME.json) (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="also write NAME.json per image: boxes, landmarks, confidences, visibility")
    p.add_argument("--weights", default=None, metavar="PATH", help="FCN checkpoint (default: the shipped weights)")
    p.add_argument("--device", default="auto", help="where the FCN runs: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda"),
                   help="ectfast.fit backend (default: auto)")
    p.add_argument("--method", default="ect", choices=METHODS, help="fitting method (default: ect)")
    p.add_argument("--batch-size", type=int, default=16, help="faces per FCN/fit batch (default: 16)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="visibility threshold tau on the landmark confidence (default: 0.5)")
    p.epilog = ("Every image is processed independently: an unreadable file, an image too small or "
                "without a face gets a message and the others go on. Exit status: 0 when at least "
                "one image gave a face, 1 when every image failed, 2 for a usage/setup error "
                "(e.g. no weights).")


def _output_names(paths: Sequence[str]) -> List[str]:
    used, names = set(), []
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0] or "image"
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        names.append(name)
    return names


def run(args, *, estimator=None) -> int:
    """``ectfast detect``; ``estimator`` (Python callers and tests only) replaces the FCN."""
    import cv2

    def say(msg):
        print(msg, file=sys.stderr)

    if args.batch_size < 1:
        say(f"ectfast detect: --batch-size must be >= 1, got {args.batch_size}")
        return 2
    try:
        det = Detector(device=args.device, backend=args.backend, weights=args.weights, estimator=estimator,
                       method=args.method, batch_size=args.batch_size, visibility_threshold=args.threshold)
    except FileNotFoundError as e:
        say(f"ectfast detect: {NO_WEIGHTS_MESSAGE if args.weights is None and 'Haar' not in str(e) else e}")
        return 2
    except (ImportError, ValueError, TypeError, RuntimeError) as e:
        say(f"ectfast detect: {e}")
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        say(f"ectfast detect: cannot create the output folder {args.out}: {e}")
        return 2
    names = _output_names(args.images)
    ok = 0
    chunk = max(1, args.batch_size)
    for s in range(0, len(args.images), chunk):
        loaded = []
        for path, name in zip(args.images[s:s + chunk], names[s:s + chunk]):
            try:
                img = load_image(path)
                h, w = img.shape[:2]
                if min(h, w) < MIN_IMAGE_SIDE:
                    raise ValueError(f"{path}: image of {w}x{h} px is too small to find a face in "
                                     f"(at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} px)")
                loaded.append((path, name, img))
            except (ValueError, OSError) as e:
                say(f"ectfast detect: {e}")
        if not loaded:
            continue
        try:
            batch_faces = det.detect([im for _, _, im in loaded])
        except (ValueError, TypeError, RuntimeError) as e:  # isolate the image at fault
            batch_faces = []
            for path, _, im in loaded:
                try:
                    batch_faces.append(det.detect(im))
                except (ValueError, TypeError, RuntimeError) as e1:
                    say(f"ectfast detect: {path}: {e1}")
                    batch_faces.append(None)
        for (path, name, img), faces in zip(loaded, batch_faces):
            if faces is None:
                continue
            if not faces:
                say(f"ectfast detect: {path}: no face found")
                continue
            ext = os.path.splitext(path)[1].lower()
            ext = ext if ext in (".jpg", ".jpeg", ".png") else ".png"
            drawn_path = os.path.join(args.out, f"{name}_landmarks{ext}")
            if not cv2.imwrite(drawn_path, draw_faces(img, faces)):
                say(f"ectfast detect: {path}: could not write {drawn_path}")
                continue
            written = [drawn_path]
            if args.json:
                json_path = os.path.join(args.out, f"{name}.json")
                doc = {"image": os.fspath(path), "width": int(img.shape[1]), "height": int(img.shape[0]),
                       "method": det.method, "visibility_threshold": det.fit_options["visibility_threshold"],
                       "faces": [f.to_dict() for f in faces]}
                try:
                    with open(json_path, "w", encoding="utf-8") as fh:
                        json.dump(doc, fh, indent=1)
                except OSError as e:
                    say(f"ectfast detect: {path}: could not write {json_path}: {e}")
                    continue
                written.append(json_path)
            ok += 1
            print(f"{path}: {len(faces)} face(s) -> {', '.join(written)}")
    if ok == 0:
        say("ectfast detect: no image gave a face")
        return 1
    return 0
