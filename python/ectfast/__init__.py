"""ectfast: robust 68-point facial landmark detection by ECT (Estimation by an FCN, Correction
by a point distribution model, Tuning by weighted regularized landmark mean shift).

``import ectfast`` and ``ectfast.fit`` need only NumPy (and the compiled core); the FCN, the
Detector and training import torch when they are used.
"""
from ectfast.core._dispatch import backends, cuda_available
from ectfast.core.fit import METHODS, FitResult, fit
from ectfast.core.pdm import PDM, default_pdm
from ectfast.io.pts import read_pts, write_pts

__version__ = "0.1.0"
__all__ = ["fit", "FitResult", "METHODS", "PDM", "default_pdm", "backends", "cuda_available",
           "read_pts", "write_pts", "Detector", "__version__"]


def __getattr__(name):  # lazy: the Detector imports torch and OpenCV
    if name == "Detector":
        from ectfast.app.detector import Detector

        return Detector
    raise AttributeError(f"module 'ectfast' has no attribute {name!r}")
