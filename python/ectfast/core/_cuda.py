"""The cuda backend: ``ectfast.fit``'s batched operations as device kernels (src/cuda).

``CudaOps`` implements the same operations as :class:`ectfast.core._reference.ReferenceOps`, on the
caller's device arrays: a torch CUDA tensor, a CuPy array, or any other ``__dlpack__`` producer
on a CUDA device (imported zero-copy through torch, else CuPy). Every kernel is queued on the
caller's *current stream* (``torch.cuda.current_stream()`` / CuPy's current stream) and the
results are arrays of the same framework on the same device (torch tensors for torch input and
for other DLPack producers when torch is installed). Intermediate and result arrays are float64,
like the reference.

The compiled extension never links libtorch: arrays reach it as descriptors
``(data_ptr, shape, strides_in_elements, dtype_name, device_index)`` and it validates every one
(dtype, shape, contiguity, alignment, that the pointer is device memory on that device) before a
kernel is launched.

Maps are read in their own dtype (float32, float16, bfloat16 or float64; the 16-bit ones are
widened to float32 on load, exactly as the reference widens them), and ``upsample`` > 1 samples
the FCN's bilinear upsampling on the fly inside the kernels, so the upsampled maps never exist.

Synchronisation: the kernels never wait for the host. ``visible`` (the last operation of
``fit``) reads two device flags back, once per fit, and raises ValueError when a map held NaN/inf
or a system was not positive definite. Set ``ECTFAST_CUDA_SOLVER=host`` (or
``CudaOps(solver="host")``) to solve the (4+m)x(4+m) systems with Eigen on the host instead of
the device Cholesky (for comparison; it synchronises at every projection).

``fit_fused`` runs the same kernels in the same order from one call into the extension (no
Python between the steps; scratch from CUDA's stream-ordered allocator): identical results,
less per-fit overhead for small batches.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from ectfast.core._reference import ReferenceOps
from ectfast.core.arrays import is_torch

MAP_DTYPES = ("float32", "float16", "bfloat16", "float64")
MAX_UPSAMPLE = 16
_MODE_CONFIDENCE, _MODE_WEIGHTED, _MODE_UNWEIGHTED = 0, 1, 2


def _core():
    from ectfast.core import _core

    if not getattr(_core, "cuda_built", False):
        raise ValueError("backend: 'cuda' is not available here: ectfast was built without CUDA")
    return _core


def _module_of(x) -> str:
    return type(x).__module__.split(".")[0]


# ------------------------------------------------------------------ framework adaptors


class _Torch:
    name = "torch"

    def __init__(self, device_index: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.index = device_index

    def stream(self) -> int:
        return int(self.torch.cuda.current_stream(self.device).cuda_stream)

    def empty(self, shape, dtype="float64"):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def zeros(self, shape, dtype="float64"):
        return self.torch.zeros(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def ones_bool(self, n):
        return self.torch.ones(n, dtype=self.torch.bool, device=self.device)

    def upload(self, a: np.ndarray):
        return self.torch.as_tensor(np.ascontiguousarray(a), device=self.device)

    def expand_rows(self, row, batch):
        return row.reshape(1, -1).expand(batch, row.shape[-1]).contiguous()

    def to_host(self, t) -> np.ndarray:
        return t.detach().cpu().numpy()

    @staticmethod
    def dtype_name(t) -> str:
        return str(t.dtype).rsplit(".", 1)[-1]

    def desc(self, t, name="array"):
        if not is_torch(t):
            raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
        return (int(t.data_ptr()), tuple(int(s) for s in t.shape), tuple(int(s) for s in t.stride()),
                self.dtype_name(t), int(t.device.index))


class _CuPy:
    name = "cupy"

    def __init__(self, device_index: int):
        import cupy

        self.cupy = cupy
        self.index = device_index

    def _dev(self):
        return self.cupy.cuda.Device(self.index)

    def stream(self) -> int:
        with self._dev():
            return int(self.cupy.cuda.get_current_stream().ptr)

    def empty(self, shape, dtype="float64"):
        with self._dev():
            return self.cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype="float64"):
        with self._dev():
            return self.cupy.zeros(shape, dtype=dtype)

    def ones_bool(self, n):
        with self._dev():
            return self.cupy.ones(n, dtype=bool)

    def upload(self, a: np.ndarray):
        with self._dev():
            return self.cupy.asarray(np.ascontiguousarray(a))

    def expand_rows(self, row, batch):
        with self._dev():
            return self.cupy.ascontiguousarray(self.cupy.broadcast_to(row.reshape(1, -1), (batch, row.shape[-1])))

    def to_host(self, a) -> np.ndarray:
        return self.cupy.asnumpy(a)

    @staticmethod
    def dtype_name(a) -> str:
        return str(a.dtype)

    def desc(self, a, name="array"):
        if not isinstance(a, self.cupy.ndarray):
            raise TypeError(f"{name}: expected a CuPy array, got {type(a).__name__}")
        item = a.dtype.itemsize
        if any(s % item for s in a.strides):
            raise ValueError(f"{name}: strides are not a multiple of the element size")
        return (int(a.data.ptr), tuple(int(s) for s in a.shape), tuple(int(s) // item for s in a.strides),
                self.dtype_name(a), int(a.device.id))


def _adopt(maps):
    """(framework adaptor, array of that framework) for a device array; raises for host arrays."""
    mod = _module_of(maps)
    if mod == "torch":
        if maps.device.type != "cuda":
            raise ValueError(f"response_maps: backend='cuda' needs the maps on a CUDA device, got a "
                             f"tensor on {maps.device} (move it with .cuda() or use another backend)")
        return _Torch(int(maps.device.index if maps.device.index is not None else 0)), maps.detach()
    if mod == "cupy":
        return _CuPy(int(maps.device.id)), maps
    if isinstance(maps, np.ndarray):
        raise ValueError("response_maps: backend='cuda' needs the maps on a CUDA device; got a NumPy "
                         "array (use torch.as_tensor(maps, device='cuda'), or backend='cpu')")
    dl = getattr(maps, "__dlpack_device__", None)
    if dl is None:
        raise TypeError(f"response_maps: expected a torch CUDA tensor, a CuPy array or a DLPack producer "
                        f"on a CUDA device, got {type(maps).__name__}")
    kind, index = (int(v) for v in dl())
    if kind not in (2, 13):  # kDLCUDA, kDLCUDAManaged
        raise ValueError(f"response_maps: backend='cuda' needs CUDA device memory, got DLPack device type {kind}")
    try:
        import torch

        t = torch.from_dlpack(maps)
        return _Torch(int(t.device.index)), t
    except ImportError:
        pass
    try:
        import cupy

        a = cupy.from_dlpack(maps)
        return _CuPy(int(a.device.id)), a
    except ImportError:
        raise TypeError("response_maps: importing a DLPack producer needs torch or CuPy installed") from None


class DeviceMaps:
    """Prepared response maps: the caller's array (kept alive), its descriptor, and the fitted
    size (after upsampling), device and stream."""

    def __init__(self, fw, array, desc, factor, stream):
        self.fw, self.array, self.desc, self.factor, self.stream = fw, array, desc, factor, stream
        B, n, Hs, Ws = desc[1]
        self.shape = (B, n, Hs * factor, Ws * factor)
        self.device = desc[4]

    def __repr__(self):
        return f"DeviceMaps(shape={self.shape}, dtype={self.desc[3]}, factor={self.factor}, cuda:{self.device})"


# the PDM on the device, per (pdm object, device, framework); bounded, holds the PDM alive so
# that its id() stays unique
_PDM_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_PDM_CACHE_SIZE = 8


class CudaOps:
    """ReferenceOps' interface on CUDA device arrays (see the module docstring)."""

    name = "cuda"

    def __init__(self, solver: Optional[str] = None):
        solver = solver if solver is not None else os.environ.get("ECTFAST_CUDA_SOLVER", "device")
        if solver not in ("device", "host"):
            raise ValueError(f"solver: expected 'device' or 'host', got {solver!r}")
        self.solver = solver
        self.core = _core()
        if self.core.cuda_device_count() < 1:
            raise ValueError("backend: 'cuda' was built into this ectfast, but no CUDA device is "
                             "visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES)")
        self._fw = None
        self._stream = 0
        self._flags = None
        self._ref = ReferenceOps()

    # ---------------------------------------------------------------- maps
    def prepare(self, maps, factor: int = 1, n_landmarks: Optional[int] = None) -> DeviceMaps:
        if (isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1
                or (factor > 1 and factor % 2) or factor > MAX_UPSAMPLE):
            raise ValueError(f"upsample: the cuda backend takes 1 or an even integer up to {MAX_UPSAMPLE}, "
                             f"got {factor!r}")
        fw, arr = _adopt(maps)
        dtype = fw.dtype_name(arr)
        if dtype not in MAP_DTYPES:
            raise TypeError(f"response_maps: expected float32, float16, bfloat16 or float64 values, got dtype {dtype}")
        if arr.ndim != 4:
            hint = " (a single face's (n, H, W) maps need a batch axis: maps[None])" if arr.ndim == 3 else ""
            raise ValueError(f"response_maps: expected 4 dimensions (B, n, H, W), got shape {tuple(arr.shape)}{hint}")
        B, n, Hs, Ws = (int(s) for s in arr.shape)
        if B < 1:
            raise ValueError("response_maps: the batch is empty (B = 0)")
        if n_landmarks is not None and n != n_landmarks:
            raise ValueError(f"response_maps: {n} maps per face but the PDM has {n_landmarks} landmarks")
        if Hs * factor < 3 or Ws * factor < 3:
            raise ValueError(f"response_maps: maps must be at least 3x3, got {Hs * factor}x{Ws * factor}")
        desc = fw.desc(arr, "response_maps")
        expect, ok = 1, True
        for size, stride in zip(reversed(desc[1]), reversed(desc[2])):
            ok = ok and (size == 1 or stride == expect)
            expect *= size
        if not ok:
            raise ValueError(f"response_maps: must be C-contiguous (call .contiguous()), got strides {desc[2]} "
                             f"for shape {desc[1]}")
        count = self.core.cuda_device_count()
        if not 0 <= desc[4] < count:
            raise ValueError(f"response_maps: on cuda:{desc[4]}, but only {count} CUDA device(s) are usable")
        self._fw = fw
        self._stream = fw.stream()
        self._flags = fw.zeros((2,), "int32")
        return DeviceMaps(fw, arr, desc, int(factor), self._stream)

    def dims(self, maps: DeviceMaps):
        return maps.shape

    def _maps(self, maps) -> DeviceMaps:
        if not isinstance(maps, DeviceMaps):
            raise TypeError(f"maps: expected the DeviceMaps returned by CudaOps.prepare, got {type(maps).__name__}")
        if self._fw is None or maps.fw is not self._fw:
            self._fw, self._stream = maps.fw, maps.stream
            self._flags = maps.fw.zeros((2,), "int32")
        return maps

    def _d(self, a, name):
        return self._fw.desc(a, name)

    # ---------------------------------------------------------------- Estimation
    def argmax(self, maps):
        m = self._maps(maps)
        B, n = m.shape[:2]
        peaks = self._fw.empty((B, n, 2))
        self.core.cuda_argmax(m.desc, m.factor, self._d(peaks, "peaks"), self._d(self._flags, "flags"), self._stream)
        return peaks

    # ---------------------------------------------------------------- Eqs. 15 and 9
    def weights(self, maps, shape, r, a, b):
        m = self._maps(maps)
        B, n = m.shape[:2]
        w = self._fw.empty((B, n, 2))
        self.core.cuda_patch(m.desc, m.factor, self._d(shape, "shape"), int(r), float(a), float(b), 1.0,
                             _MODE_CONFIDENCE, self._d(w, "w"), None, self._stream)
        return w

    def mean_shift(self, maps, shape, r, a, b, rho, weighted):
        m = self._maps(maps)
        B, n = m.shape[:2]
        w = self._fw.empty((B, n, 2))
        t = self._fw.empty((B, n, 2))
        mode = _MODE_WEIGHTED if weighted else _MODE_UNWEIGHTED
        self.core.cuda_patch(m.desc, m.factor, self._d(shape, "shape"), int(r), float(a), float(b), float(rho),
                             mode, self._d(w, "w"), self._d(t, "target"), self._stream)
        return w, t

    # ---------------------------------------------------------------- the PDM
    def _pdm(self, pdm):
        key = (id(pdm), self._fw.index, self._fw.name)
        hit = _PDM_CACHE.get(key)
        if hit is not None and hit[0] is pdm:
            _PDM_CACHE.move_to_end(key)
            return hit[1:]
        entry = (pdm, self._fw.upload(np.ascontiguousarray(pdm.basis, dtype=np.float64)),
                 self._fw.upload(np.ascontiguousarray(pdm.mean.reshape(-1), dtype=np.float64)),
                 self._fw.upload(np.ascontiguousarray(pdm.prior_inverse, dtype=np.float64)))
        _PDM_CACHE[key] = entry
        while len(_PDM_CACHE) > _PDM_CACHE_SIZE:
            _PDM_CACHE.popitem(last=False)
        return entry[1:]

    def project(self, pdm, w, target, lam, x0, eps):
        basis, mean, prior = self._pdm(pdm)
        B = int(target.shape[0])
        p = self._fw.empty((B, pdm.n_params))
        host = self.solver == "host"
        A = self._fw.empty((B, pdm.n_params, pdm.n_params)) if host else None
        rhs = self._fw.empty((B, pdm.n_params)) if host else None
        self.core.cuda_project(self._d(basis, "basis"), self._d(mean, "mean"), self._d(prior, "prior_inv"),
                               None if w is None else self._d(w, "w"), self._d(target, "target"),
                               self._d(x0, "x0"), float(lam), float(eps), self._d(p, "p"),
                               self._d(self._flags, "flags"), None if A is None else self._d(A, "scratch_A"),
                               None if rhs is None else self._d(rhs, "scratch_rhs"), self._stream, host)
        return p

    def shape(self, pdm, params):
        basis, mean, _ = self._pdm(pdm)
        B = int(params.shape[0])
        s = self._fw.empty((B, pdm.n_landmarks, 2))
        self.core.cuda_shape(self._d(basis, "basis"), self._d(mean, "mean"), self._d(params, "params"),
                             self._d(s, "shape"), self._stream)
        return s

    def clamp(self, shape, height, width):
        out = self._fw.empty(tuple(int(v) for v in shape.shape))
        self.core.cuda_clamp(self._d(shape, "shape"), self._d(out, "out"), int(height), int(width), self._stream)
        return out

    def prior_params(self, pdm, batch, height, width):
        row = self._fw.upload(self._ref.prior_params(pdm, 1, height, width)[0])
        return self._fw.expand_rows(row, batch)

    def freeze(self, p_old, p_new, active, tol):
        B, k = (int(v) for v in p_old.shape)
        p = self._fw.empty((B, k))
        act = self._fw.empty((B,), "bool")
        self.core.cuda_freeze(self._d(p_old, "p_old"), self._d(p_new, "p_new"), self._d(active, "active"),
                              float(tol), self._d(p, "p_out"), self._d(act, "active_out"), self._stream)
        return p, act

    def all_true(self, batch):
        return self._fw.ones_bool(batch)

    def confidence_of(self, w):
        return w.mean(-1)

    def check(self):
        """Read the device flags (one synchronisation) and raise for non-finite maps or a
        system that was not positive definite."""
        if self._flags is None:
            return
        flags = self._fw.to_host(self._flags)
        if flags[0]:
            raise ValueError("response_maps: contains NaN or infinite values")
        if flags[1]:
            raise ValueError("the (4+m)x(4+m) system of a face is not positive definite "
                             "(gamma = 0 with zero confidence weights?)")

    def visible(self, conf, tau):
        self.check()
        return conf >= tau


# ------------------------------------------------------------------ the fused path

_METHOD_CODES = {"crm": 0, "crm-pdm": 1, "crm-clm": 2, "crm-clm-c": 3, "ect": 4}


def fit_fused(response_maps, pdm=None, *, method: str = "ect", iterations: int = 5,
              patch_sizes=None, correction_patch_size: int = 30, a: float = 0.25, b: float = 25.0,
              gamma: float = 20.0, rho: float = 20.0, early_stop: Optional[float] = None,
              visibility_threshold: float = 0.5, upsample: int = 1):
    """``ectfast.fit(..., backend="cuda")`` in one call into the extension: the same kernels in
    the same order (identical results), without Python between the steps (one binding call, the
    scratch from CUDA's stream-ordered allocator). Same arguments and result as ``ectfast.fit``.
    """
    import sys

    from ectfast.core.pdm import PDM, default_pdm

    _fit = sys.modules[__package__ + ".fit"]  # the module (ectfast.fit is also the function's name)

    if pdm is None:
        pdm = default_pdm()
    if not isinstance(pdm, PDM):
        raise TypeError(f"pdm: expected an ectfast.PDM, got {type(pdm).__name__}")
    if method not in _fit.METHODS:
        raise ValueError(f"method: expected one of {_fit.METHODS}, got {method!r}")
    sizes = _fit.schedule(iterations, _fit.DEFAULT_PATCH_SIZES if patch_sizes is None else patch_sizes)
    r0 = _fit._positive_int("correction_patch_size", correction_patch_size, minimum=2)
    a = _fit._real("a", a, positive=True)
    b = _fit._real("b", b)
    gamma = _fit._real("gamma", gamma, nonneg=True)
    rho = _fit._real("rho", rho, positive=True)
    tol = 0.0 if early_stop is None else _fit._real("early_stop", early_stop, positive=True)
    tau = _fit._real("visibility_threshold", visibility_threshold)
    factor = _fit._positive_int("upsample", upsample)

    ops = CudaOps()
    maps = ops.prepare(response_maps, factor, pdm.n_landmarks)
    B, n, H, W = maps.shape
    fw = ops._fw
    basis, mean, prior = ops._pdm(pdm)
    x0 = ops.prior_params(pdm, B, H, W)
    peaks, initial, landmarks, w_final = (fw.empty((B, n, 2)) for _ in range(4))
    params = None if method == "crm" else fw.empty((B, pdm.n_params))
    d = ops._d
    ops.core.cuda_fit(maps.desc, maps.factor, d(basis, "basis"), d(mean, "mean"), d(prior, "prior_inv"),
                      _METHOD_CODES[method], list(sizes), r0, a, b, gamma, rho, float(pdm.noise_variance),
                      tol, float(_fit.SIMILARITY_EPS), d(x0, "x0"), d(peaks, "peaks"), d(initial, "initial"),
                      d(landmarks, "landmarks"), None if params is None else d(params, "params"),
                      d(w_final, "w_final"), d(ops._flags, "flags"), ops._stream)
    confidence = ops.confidence_of(w_final)
    return _fit.FitResult(landmarks=landmarks, confidence=confidence, visible=ops.visible(confidence, tau),
                          initial=initial, peaks=peaks, params=params, method=method, backend="cuda")
