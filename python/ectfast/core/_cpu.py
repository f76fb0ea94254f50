"""The ``cpu`` backend: the batched ops of :class:`ectfast.core._reference.ReferenceOps` computed by the
compiled C++/Eigen core (``ectfast.core._core.cpu_*``, threaded with std::thread).

Same names, signatures and results (to ~1e-12 px) as the reference. Two differences in *how*:

* ``prepare`` does not scan the maps for NaN/inf; ``argmax`` (always the first op of
  ``ectfast.fit``) checks finiteness in the same pass that finds the peaks and raises the
  reference's ``ValueError``, so a fit reads the maps once.
* ``prepare(maps, factor > 1)`` returns an :class:`UpsampledMaps` (shape, dtype, ``np.asarray``
  materialises it) instead of the materialised maps: the ops sample the bilinear upsampling on
  the fly, exactly as ``_reference.upsample`` would store it, so 64x64 FCN maps are fitted at
  256x256 without ever writing 256x256 maps. ``CpuOps(lazy_upsample=False)`` materialises instead.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np

from ectfast.core import _core
from ectfast.core._reference import ReferenceOps


class UpsampledMaps:
    """(B, n, H*f, W*f) maps defined as the bilinear x f upsampling of ``small`` (B, n, H, W),
    sampled on demand by the cpu ops. ``np.asarray(obj)`` materialises them."""

    __slots__ = ("small", "factor", "_num_threads")

    def __init__(self, small: np.ndarray, factor: int, num_threads: int = 0):
        self.small = small
        self.factor = int(factor)
        self._num_threads = num_threads

    @property
    def shape(self):
        B, n, H, W = self.small.shape
        return (B, n, H * self.factor, W * self.factor)

    @property
    def dtype(self):
        return self.small.dtype

    @property
    def ndim(self):
        return 4

    def __len__(self):
        return self.small.shape[0]

    def __array__(self, dtype=None, copy=None):
        out = _core.cpu_upsample(self.small, self.factor, self._num_threads)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self):
        return f"UpsampledMaps(shape={self.shape}, dtype={self.dtype}, factor={self.factor})"


def _source(maps):
    """(array the core reads, upsampling factor) of prepared maps."""
    if isinstance(maps, UpsampledMaps):
        return maps.small, maps.factor
    return maps, 1


def _f64(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _patch(r) -> int:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 0:
        raise ValueError(f"r: expected a patch size (integer >= 0), got {r!r}")
    return int(r)


class CpuOps(ReferenceOps):
    """The ops interface of :class:`ReferenceOps` on the compiled C++ core.
    ``num_threads``: worker threads (None: all cores)."""

    name = "cpu"

    def __init__(self, num_threads: Optional[int] = None, lazy_upsample: bool = True):
        from ectfast.core.fit import check_num_threads  # the one check of fit's num_threads argument

        num_threads = check_num_threads(num_threads)
        self.num_threads = 0 if num_threads is None else num_threads
        self.lazy_upsample = bool(lazy_upsample)

    # ---------------------------------------------------------------- maps
    def prepare(self, maps: np.ndarray, factor: int):
        if not isinstance(maps, np.ndarray):
            raise TypeError(f"response_maps: expected a NumPy array, got {type(maps).__name__}")
        if factor <= 1:
            return maps  # finiteness: checked by argmax, in the same pass
        if self.lazy_upsample:
            return UpsampledMaps(maps, factor, self.num_threads)
        return _core.cpu_upsample(maps, int(factor), self.num_threads)

    def faces(self, maps, start, stop):
        """Faces start..stop-1 of prepared maps, as a view (lazily upsampled maps stay lazy)."""
        if isinstance(maps, UpsampledMaps):
            return UpsampledMaps(maps.small[start:stop], maps.factor, maps._num_threads)
        return maps[start:stop]

    def argmax(self, maps):
        src, factor = _source(maps)
        peaks, n_bad = _core.cpu_argmax(src, factor, self.num_threads)
        if n_bad:
            raise ValueError("response_maps: contains NaN or infinite values")
        return peaks

    def weights(self, maps, shape, r, a, b):
        src, factor = _source(maps)
        return _core.cpu_weights(src, _f64(shape), _patch(r), float(a), float(b), factor,
                                 self.num_threads)

    def mean_shift(self, maps, shape, r, a, b, rho, weighted):
        """(w, t): weights (Eq. 15; ones when unweighted) and targets t = shape + v (Eq. 9)."""
        src, factor = _source(maps)
        return _core.cpu_mean_shift(src, _f64(shape), _patch(r), float(a), float(b), float(rho),
                                    bool(weighted), factor, self.num_threads)

    # ---------------------------------------------------------------- model
    def project(self, pdm, w, target, lam, x0, eps):
        target = _f64(target)
        B = target.shape[0]
        n2 = 2 * pdm.n_landmarks
        wf = None if w is None else _f64(w).reshape(B, n2)
        return _core.cpu_project(_f64(pdm.basis), _f64(pdm.mean).reshape(-1), _f64(pdm.prior_inverse),
                                 float(lam), wf, target.reshape(B, n2), _f64(x0), float(eps),
                                 self.num_threads)
