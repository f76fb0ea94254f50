"""``ectfast.Detector``: images -> faces with 68 landmarks.

The pipeline, for a batch of images:

1. faces: the face-detector layer :mod:`ectfast.faces` (BlazeFace by default, Haar as a
   fallback), a callable, or boxes the caller passes. Each detection becomes a crop box in the
   convention of :func:`ectfast.nets.data.box_from_landmarks` (``faces.crop_box``) and, where the
   detector gives eye keypoints, an eye-line angle (``faces.crop_angle``);
2. crops (:mod:`ectfast.app.crops`): every face of every image cropped to 256 x 256 by one 2x3
   affine (image -> crop) that scales the box to the crop and rotates the eye line level;
3. estimation: the network (``ectfast.nets.engine``: ONNX Runtime or PyTorch) on batches of crops ->
   68 response maps each;
4. :func:`ectfast.fit` (ECT by default) on the same batches -> landmarks, confidence,
   visibility, in crop pixels;
5. landmarks mapped back to image pixels with the inverse affine (``crops.crop_to_image``), plus
   the network's ``landmark_offset`` (``ectfast.nets.engine.landmark_offset``).

Images are NumPy arrays as OpenCV gives them (H x W x 3 uint8, **BGR**; pass ``rgb=True`` for
RGB arrays), grey H x W, H x W x 1 or 4-channel (BGRA / RGBA) arrays (converted), float arrays
in [0, 1], or paths to image files.

Image files are read by :func:`ectfast.io.images.read_image`; the ``ectfast detect`` command is
:mod:`ectfast.cli.detect`, drawing :mod:`ectfast.app.draw`.
"""
from __future__ import annotations

import math
import numbers
import os
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from ectfast.nets import engine as E
from ectfast.core.arrays import on_cuda, to_numpy
from ectfast.core.fit import METHODS
from ectfast import faces as face_layer
from ectfast.faces import MIN_IMAGE_SIDE
from ectfast.io.images import MAX_PIXELS, ImageError, read_image, to_bgr
from ectfast.app.crops import CROP_SIZE, check_boxes, crop_faces, crop_to_image, crops_to_input

#: the face detectors see images downscaled to this longer side at most (crops come from the
#: decoded image)
DETECT_MAX_SIDE = 2560


# ------------------------------------------------------------------ the estimator (network)

def upsample_factor(maps_size: int, crop_size: int = CROP_SIZE) -> int:
    if maps_size <= 0 or crop_size % maps_size:
        raise ValueError(f"estimator: response maps of {maps_size} px do not divide the {crop_size} px crop")
    f = crop_size // maps_size
    if f > 1 and f % 2:
        raise ValueError(f"estimator: maps of {maps_size} px need an odd x{f} upsampling (use 1 or an even factor)")
    return f


def run_pipeline(estimator: Callable, crops_bgr: Sequence[np.ndarray], Ms: np.ndarray, methods: Sequence[str],
                 *, pdm=None, backend: str = "auto", batch_size: int = 16, fit_options: Optional[dict] = None,
                 progress=None) -> dict:
    """Estimator once per crop, then ectfast.fit for each method on the same maps, in batches of
    ``batch_size``; landmarks mapped back to image pixels with the inverse of each crop's M, plus
    the estimator's ``landmark_offset`` (image pixels; ``ectfast.nets.engine.landmark_offset``)
    where it has one.

    Returns {method: {"landmarks": (k, n, 2) image px, "crop_landmarks": (k, n, 2),
    "confidence": (k, n), "visible": (k, n) bool}}."""
    from ectfast.core import _dispatch
    from ectfast.core.fit import fit

    offset = getattr(estimator, "landmark_offset", None)
    offset = np.zeros(2) if offset is None else E.check_offset(offset, "estimator: landmark_offset")
    k = len(crops_bgr)
    out = {m: {"crop_landmarks": [], "confidence": [], "visible": []} for m in methods}
    keep_on_device = backend == "cuda" or (backend == "auto" and "cuda" in _dispatch.backends())
    net_size = getattr(estimator, "input_size", None)
    for s in range(0, k, batch_size):
        crop_side = int(np.asarray(crops_bgr[s]).shape[0])
        x = crops_to_input(crops_bgr[s:s + batch_size], net_size if isinstance(net_size, int) else None)
        maps = estimator(x)
        if not on_cuda(maps) or not keep_on_device:
            maps = to_numpy(maps)
            if maps.dtype.kind != "f":
                raise TypeError(f"estimator: expected float response maps, got dtype {maps.dtype}")
        shape = tuple(maps.shape)
        if len(shape) != 4 or shape[0] != len(x) or shape[2] != shape[3]:
            raise ValueError(f"estimator: expected ({len(x)}, n, h, h) response maps for {len(x)} crops, got {shape}")
        factor = upsample_factor(shape[-1], crop_side)  # the fit's frame is the crop's
        opts = {**(getattr(estimator, "fit_options", None) or {}), **(fit_options or {})}
        for m in methods:
            r = fit(maps, pdm, method=m, upsample=factor, backend=backend, **opts)
            out[m]["crop_landmarks"].append(to_numpy(r.landmarks).astype(np.float64))
            out[m]["confidence"].append(to_numpy(r.confidence).astype(np.float64))
            out[m]["visible"].append(to_numpy(r.visible).astype(bool))
        if progress is not None:
            progress.update(len(x))
    for m in methods:
        res = out[m]
        for key in ("crop_landmarks", "confidence", "visible"):
            res[key] = np.concatenate(res[key]) if res[key] else np.zeros((0,))
        res["landmarks"] = crop_to_image(res["crop_landmarks"], Ms) + offset if k else np.zeros((0, 0, 2))
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


def default_face_detector():
    """The face detector of ``face_detector="auto"``: ``ectfast.faces.default_detector()``
    (BlazeFace, with fallbacks)."""
    return face_layer.default_detector()


def _make_named_detector(name: str):
    if name == "auto":
        return default_face_detector()
    try:
        return face_layer.make_detector(name)
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
    flip: test-time flip of the network (``ectfast.nets.engine.flip_average``; default off): twice the
        network's time. Ignored with ``estimator``.
    precision: 'fp32' (default) or 'int8' (the int8 ONNX network on ONNX Runtime:
        as accurate, meant for CPUs with VNNI; ``ectfast.nets.engine``). Ignored with ``estimator``.
    """

    def __init__(self, device: str = "auto", backend: str = "auto", weights=None, estimator=None,
                 face_detector="auto", *, engine: str = "auto", align: bool = True, method: str = "ect",
                 pdm=None, batch_size: int = 16, visibility_threshold: Optional[float] = None,
                 fit_options: Optional[dict] = None, threads: Optional[int] = None, flip: bool = E.DEFAULT_FLIP,
                 precision: str = E.DEFAULT_PRECISION):
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
        E.check_precision(precision)
        if backend != "auto":
            _dispatch.get_ops(backend, on_device=backend == "cuda")  # raises when not built here
        if pdm is not None and not isinstance(pdm, PDM):
            raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
        if estimator is not None and not callable(estimator):
            raise TypeError(f"estimator: expected a callable (crops -> response maps), got {type(estimator).__name__}")
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
        self.estimator = estimator if estimator is not None else E.make_estimator(weights, device, engine, threads, flip,
                                                                                        precision)

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
            det = base
            if isinstance(name, str) and hasattr(base, "detect"):
                try:
                    det = face_layer.make_detector(name)
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
        if hasattr(det, "detect") and max(h, w) > DETECT_MAX_SIDE:  # detectors see a downscaled copy
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
            calib = getattr(det, "calibration_name", None) or getattr(det, "name", None)
            boxes, angles, scores = [], [], []
            for fb in items:
                name = getattr(fb, "detector", "") or calib
                boxes.append(face_layer.crop_box(fb, name))
                angles.append(face_layer.crop_angle(fb) if self.align else 0.0)
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
