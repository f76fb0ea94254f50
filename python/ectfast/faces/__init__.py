"""Face detectors: image in, face boxes (with scores and, where the detector has them, keypoints) out.

One small interface over several backends::

    from ectfast.faces import detect_faces, crop_box, crop_angle
    faces = detect_faces(image_bgr)               # list[FaceBox], best score first
    box = crop_box(faces[0])                      # the crop box ectfast.nets.data.box_from_landmarks gives
    angle = crop_angle(faces[0])                  # eye-line angle (radians), 0 without keypoints

Backends (each a class with ``name`` and ``detect(image_bgr) -> list[FaceBox]``):

* :class:`BlazeFaceDetector` -- MediaPipe's BlazeFace, short range (128 x 128 input) or full range
  (192 x 192), shipped as .tflite files in ``ectfast/assets`` (Apache-2.0, see
  ``assets/BLAZEFACE_LICENSE.txt``) and run by OpenCV's DNN module. Anchors, box/keypoint
  decoding, scores and the weighted non-maximum suppression are implemented here. Gives 6
  keypoints per face: right eye, left eye, nose tip, mouth centre, right ear, left ear (the
  subject's right/left: the right eye is on the image's left in an upright frontal face).
  Large images are letterboxed to the model input and, with ``tiles`` (default), also searched
  in overlapping tiles so that small faces in big photographs are found.
* :class:`HaarDetector` -- OpenCV's frontal-face Haar cascade (opencv 4.x ships it in cv2.data).
* :class:`DlibHogDetector` -- dlib's HOG detector, only where ``import dlib`` works (dlib is not
  a dependency of ectfast).

:class:`BlazeFaceComboDetector` ("blazeface") combines them: short range on the whole image, full
range on tiles of large images (small faces in big photographs). :func:`default_detector` picks
the first backend that loads in the order measured best (bench/faces.py, bench/RESULTS.md "face
detectors (issue 10)"): "blazeface", BlazeFace short range alone, full range alone, Haar.
Nothing is downloaded at run time.

:func:`crop_box` maps a detector's box to the training crop convention with per-detector
constants (CROP_CALIBRATION) fitted on the 300-W training faces (bench/calibrate_faces.py).

Modules: ``base`` (FaceBox, image checks, IoU), ``blazeface``, ``classic`` (Haar, dlib HOG),
``crop`` (box -> crop box, eye-line angle); this file chooses among them. The layer needs NumPy
and OpenCV and imports nothing else of ectfast (``ectfast.assets`` for the model files).
"""
from __future__ import annotations

from typing import List

from ectfast.assets import ASSETS  # where the BlazeFace models and their licence lie
from ectfast.faces.base import MIN_IMAGE_SIDE, FaceBox, box_iou, check_image
from ectfast.faces.blazeface import (BLAZEFACE_KEYPOINTS, BLAZEFACE_MODELS, BlazeFaceComboDetector,
                                     BlazeFaceDetector, blazeface_anchors, decode_blazeface, weighted_nms)
from ectfast.faces.classic import DlibHogDetector, HaarDetector, haar_cascade, haar_cascade_path
from ectfast.faces.crop import (CROP_CALIBRATION, MATCH_IOU, crop_angle, crop_box,
                                fit_crop_calibration)

__all__ = ["ASSETS", "MIN_IMAGE_SIDE", "FaceBox", "box_iou", "check_image", "BLAZEFACE_KEYPOINTS",
           "BLAZEFACE_MODELS", "BlazeFaceComboDetector", "BlazeFaceDetector", "blazeface_anchors",
           "decode_blazeface", "weighted_nms", "DlibHogDetector", "HaarDetector", "haar_cascade",
           "haar_cascade_path", "CROP_CALIBRATION", "MATCH_IOU", "crop_angle", "crop_box",
           "fit_crop_calibration", "DEFAULT_ORDER", "make_detector", "default_detector", "detect_faces"]

# ------------------------------------------------------------------ choice of detector

#: backends in the order default_detector tries them (measured best first)
DEFAULT_ORDER = ("blazeface", "blazeface-short-notiles", "blazeface-full", "haar")
_DEFAULT = None


def make_detector(name: str):
    """A detector by name: blazeface-short, blazeface-full (tiles on), blazeface-short-notiles,
    blazeface-full-notiles, haar, dlib-hog."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a detector name, got {type(name).__name__}")
    if name == "blazeface":
        return BlazeFaceComboDetector()
    if name.startswith("blazeface-"):
        rest = name[len("blazeface-"):]
        tiles = not rest.endswith("-notiles")
        variant = rest[:-len("-notiles")] if not tiles else rest
        return BlazeFaceDetector(variant, tiles=tiles)
    if name == "haar":
        return HaarDetector()
    if name == "dlib-hog":
        return DlibHogDetector()
    raise ValueError(f"name: unknown face detector {name!r} (blazeface-short, blazeface-full, "
                     "blazeface-short-notiles, blazeface-full-notiles, haar, dlib-hog)")


def default_detector():
    """The best backend that loads here (cached), in the order DEFAULT_ORDER: "blazeface"
    (short range on the whole image + full range on tiles of large images), else BlazeFace short
    range alone, else full range alone, else Haar. RuntimeError naming every failure when none
    loads. The instance is shared: detectors hold OpenCV nets/cascades that must not be used by
    two threads at once, so threads should each call ``make_detector(default_detector().name)``."""
    global _DEFAULT
    if _DEFAULT is None:
        errors = []
        for name in DEFAULT_ORDER:
            try:
                _DEFAULT = make_detector(name)
                break
            except Exception as e:  # any backend failure: try the next one
                errors.append(f"{name}: {e}")
        else:
            raise RuntimeError("no face detector could be loaded: " + "; ".join(errors))
    return _DEFAULT


def detect_faces(image, detector=None) -> List[FaceBox]:
    """Faces in ``image`` (H x W x 3 uint8 BGR or H x W grey), best score first. ``detector``: a
    detector object, a name for :func:`make_detector`, or None for :func:`default_detector`."""
    if detector is None:
        det = default_detector()
    elif isinstance(detector, str):
        det = make_detector(detector)
    else:
        det = detector
    faces = list(det.detect(image))
    return sorted(faces, key=lambda f: -f.score)
