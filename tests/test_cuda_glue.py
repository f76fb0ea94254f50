"""The cuda backend's Python side (``ectfast.core._cuda``) on any machine: plumbing only.

The compiled CUDA entry points are replaced by a fake core and the device arrays by NumPy arrays
behind integer "pointers". The fake checks every descriptor it receives (dtype, shape) against
what the C++ bindings demand. This file tests the glue, not the kernels' arithmetic:

* ``ectfast.fit`` routed through ``CudaOps``: each binding is computed by the matching op of the
  NumPy reference, so the fit must reproduce the reference exactly. That checks which arrays and
  scalars reach which binding (argument order, shapes, dtypes), the flag check, the solver switch
  and fit's loop on device arrays. It cannot find an arithmetic error in a kernel.
* ``fit_fused``: the fake ``cuda_fit`` records the arguments it is given (checked against what
  ``fit`` would use) and writes distinct sentinel values to each output; the result must carry
  each sentinel to the right field.

The kernels themselves are tested against the reference in test_cuda.py (GPU only).
"""
import itertools
import sys

import numpy as np
import pytest

import ectfast
from ectfast.core import _cuda
from ectfast.core import _reference as R
from ectfast.core.synthetic import make_maps, random_pdm_shapes


class _Registry:
    def __init__(self):
        self.arrays, self.keys, self.ids = {}, {}, itertools.count(4096, 4096)

    def add(self, a):
        a = np.asarray(a)  # kept as given (the contiguity check must see strided inputs)
        key = next(self.ids)
        self.arrays[key] = a
        self.keys[id(a)] = key
        return a


class _FakeFramework:
    """CudaOps' framework adaptor over NumPy arrays."""

    name, index = "fake", 0

    def __init__(self, reg):
        self.reg = reg

    def stream(self):
        return 0

    def empty(self, shape, dtype="float64"):
        return self.reg.add(np.full(shape, np.nan if dtype == "float64" else 0, dtype=dtype))

    def zeros(self, shape, dtype="float64"):
        return self.reg.add(np.zeros(shape, dtype=dtype))

    def ones_bool(self, n):
        return self.reg.add(np.ones(n, bool))

    def upload(self, a):
        return self.reg.add(np.array(a))

    def expand_rows(self, row, batch):
        return self.reg.add(np.tile(row.reshape(1, -1), (batch, 1)))

    def to_host(self, a):
        return np.array(a)

    @staticmethod
    def dtype_name(a):
        return str(a.dtype)

    def desc(self, a, name="array"):
        assert id(a) in self.reg.keys, f"{name}: not a device array of this framework"
        return (self.reg.keys[id(a)], a.shape, tuple(s // a.itemsize for s in a.strides), str(a.dtype), 0)


class _FakeCore:
    """The bindings' signatures (src/cpp/cuda_bindings.cpp), computed by the reference."""

    cuda_built = True

    def __init__(self, reg, pdm):
        self.reg, self.pdm, self.ref, self.calls = reg, pdm, R.ReferenceOps(), []

    def cuda_device_count(self):
        return 1

    def _arr(self, d, dtypes, shape):
        a = self.reg.arrays[d[0]]
        assert tuple(a.shape) == tuple(d[1]) and str(a.dtype) == d[3] and d[4] == 0
        assert d[3] in dtypes, (d[3], dtypes)
        assert len(shape) == len(d[1]) and all(s < 0 or s == t for s, t in zip(shape, d[1])), (shape, d[1])
        return a

    def _maps(self, d, factor):
        m = self._arr(d, ("float32", "float16", "float64"), (-1, -1, -1, -1))
        m = m if m.dtype == np.float64 else m.astype(np.float32)
        return R.upsample(m, factor) if factor > 1 else m

    def cuda_argmax(self, maps, factor, peaks, flags, stream):
        self.calls.append("argmax")
        m = self._maps(maps, factor)
        self._arr(peaks, ("float64",), m.shape[:2] + (2,))[...] = self.ref.argmax(np.nan_to_num(m))
        if not np.isfinite(m).all():
            self._arr(flags, ("int32",), (2,))[0] = 1

    def cuda_patch(self, maps, factor, shape, r, a, b, rho, mode, w, target, stream):
        self.calls.append(f"patch{mode}")
        m = self._maps(maps, factor)
        pts = m.shape[:2] + (2,)
        s = self._arr(shape, ("float64",), pts)
        if mode == 0:
            assert target is None
            self._arr(w, ("float64",), pts)[...] = self.ref.weights(m, s, r, a, b)
        else:
            ww, t = self.ref.mean_shift(m, s, r, a, b, rho, mode == 1)
            self._arr(w, ("float64",), pts)[...] = ww
            self._arr(target, ("float64",), pts)[...] = t

    def cuda_project(self, basis, mean, prior_inv, w, target, x0, lam, eps, p, flags, scratch_A,
                     scratch_rhs, stream, host_solve):
        self.calls.append("project-host" if host_solve else "project")
        S = self._arr(basis, ("float64",), (-1, -1))
        n2, k = S.shape
        np.testing.assert_array_equal(S, self.pdm.basis)
        np.testing.assert_array_equal(self._arr(mean, ("float64",), (n2,)), self.pdm.mean.reshape(-1))
        np.testing.assert_array_equal(self._arr(prior_inv, ("float64",), (k,)), self.pdm.prior_inverse)
        t = self._arr(target, ("float64",), (-1, n2 // 2, 2))
        B = t.shape[0]
        ww = None if w is None else self._arr(w, ("float64",), (B, n2 // 2, 2))
        if host_solve:
            self._arr(scratch_A, ("float64",), (B, k, k))
            self._arr(scratch_rhs, ("float64",), (B, k))
        self._arr(flags, ("int32",), (2,))
        out = self.ref.project(self.pdm, ww, t, lam, self._arr(x0, ("float64",), (B, k)), eps)
        self._arr(p, ("float64",), (B, k))[...] = out

    def cuda_shape(self, basis, mean, p, s, stream):
        self.calls.append("shape")
        pp = self._arr(p, ("float64",), (-1, self.pdm.n_params))
        self._arr(s, ("float64",), (pp.shape[0], self.pdm.n_landmarks, 2))[...] = self.pdm.shape(pp)

    def cuda_clamp(self, shape, out, height, width, stream):
        self.calls.append("clamp")
        s = self._arr(shape, ("float64",), (-1, -1, 2))
        self._arr(out, ("float64",), s.shape)[...] = self.ref.clamp(s, height, width)

    def cuda_freeze(self, p_old, p_new, active, tol, p_out, active_out, stream):
        self.calls.append("freeze")
        po = self._arr(p_old, ("float64",), (-1, -1))
        p, act = self.ref.freeze(po, self._arr(p_new, ("float64",), po.shape),
                                 self._arr(active, ("uint8", "bool"), po.shape[:1]), tol)
        self._arr(p_out, ("float64",), po.shape)[...] = p
        self._arr(active_out, ("uint8", "bool"), po.shape[:1])[...] = act

    def cuda_fit(self, maps, factor, basis, mean, prior_inv, method, sizes, r0, a, b, gamma, rho,
                 rho_tilde, tol, eps, x0, peaks, initial, landmarks, params, w_final, flags, stream):
        """Plumbing only: record the scalars, check the arrays, write sentinels to the outputs."""
        self.calls.append("fit")
        m = self._arr(maps, ("float32", "float16", "float64"), (-1, self.pdm.n_landmarks, -1, -1))
        B, n, H, W = m.shape[0], m.shape[1], m.shape[2] * factor, m.shape[3] * factor
        k = self.pdm.n_params
        np.testing.assert_array_equal(self._arr(basis, ("float64",), (2 * n, k)), self.pdm.basis)
        np.testing.assert_array_equal(self._arr(mean, ("float64",), (2 * n,)), self.pdm.mean.reshape(-1))
        np.testing.assert_array_equal(self._arr(prior_inv, ("float64",), (k,)), self.pdm.prior_inverse)
        np.testing.assert_array_equal(self._arr(x0, ("float64",), (B, k)), self.ref.prior_params(self.pdm, B, H, W))
        if not np.isfinite(m).all():  # the fused argmax flags non-finite maps, read back by visible()
            self._arr(flags, ("int32",), (2,))[0] = 1
        self.fit_args = dict(factor=factor, method=method, sizes=list(sizes), r0=r0, a=a, b=b, gamma=gamma,
                             rho=rho, rho_tilde=rho_tilde, tol=tol, eps=eps)
        pts = (B, n, 2)
        self.sentinels = {}
        for i, (name, d) in enumerate((("peaks", peaks), ("initial", initial), ("landmarks", landmarks))):
            v = 1000.0 * (i + 1) + np.arange(B * n * 2, dtype=np.float64).reshape(pts)
            self._arr(d, ("float64",), pts)[...] = v
            self.sentinels[name] = v
        if params is None:
            self.sentinels["params"] = None
        else:
            v = -np.arange(B * k, dtype=np.float64).reshape(B, k)
            self._arr(params, ("float64",), (B, k))[...] = v
            self.sentinels["params"] = v
        v = (np.arange(B * n * 2, dtype=np.float64).reshape(pts) % 7) / 6.0
        self._arr(w_final, ("float64",), pts)[...] = v
        self.sentinels["w_final"] = v


@pytest.fixture
def emulated(monkeypatch, pdm):
    reg = _Registry()
    core = _FakeCore(reg, pdm)
    fw = _FakeFramework(reg)
    monkeypatch.setattr(_cuda, "_core", lambda: core)
    monkeypatch.setattr(_cuda, "_adopt", lambda maps: (fw, reg.add(maps)))
    monkeypatch.setattr(_cuda, "_PDM_CACHE", type(_cuda._PDM_CACHE)())
    from ectfast.core import _dispatch

    monkeypatch.setattr(_dispatch, "get_ops", lambda name="auto", on_device=False, num_threads=None:
                        R.ReferenceOps() if name == "reference" else _cuda.CudaOps())
    return core


@pytest.mark.parametrize("method", ectfast.METHODS)
def test_cuda_ops_glue_reproduces_reference(emulated, pdm, method):
    maps = make_maps(random_pdm_shapes(pdm, 2, size=48, seed=0), size=48, outlier_fraction=0.1, seed=1).maps
    cases = (({}, maps), ({"early_stop": 0.05, "iterations": 6, "patch_sizes": (9, 5)}, maps),
             ({"upsample": 2}, np.ascontiguousarray(maps[:, :, ::2, ::2])),
             ({}, np.ascontiguousarray(maps[:, :, 6:39, :])))  # 33 x 48: height != width
    for kw, m in cases:
        want = ectfast.fit(m, pdm, method=method, backend="reference", **kw)
        got = ectfast.fit(m, pdm, method=method, **kw)
        assert got.backend == "cuda" and got.method == method
        for name in ("peaks", "initial", "landmarks", "confidence", "visible"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        if method == "crm":
            assert got.params is None
        else:
            np.testing.assert_array_equal(got.params, want.params)
    assert "fit" not in emulated.calls
    if method in ("crm-clm", "crm-clm-c", "ect"):
        assert "freeze" in emulated.calls  # the early-stop run went through ops.freeze


@pytest.mark.parametrize("method", ectfast.METHODS)
@pytest.mark.parametrize("kw", [
    {},
    {"early_stop": 0.05, "iterations": 7, "patch_sizes": (9, 5), "correction_patch_size": 11, "a": 0.3,
     "b": 20.0, "gamma": 5.0, "rho": 9.0, "visibility_threshold": 0.4},
    {"upsample": 2, "iterations": 0},
])
def test_fit_fused_plumbing(emulated, pdm, method, kw):
    from ectfast.core.fit import DEFAULT_PATCH_SIZES, SIMILARITY_EPS, schedule

    maps = make_maps(random_pdm_shapes(pdm, 3, size=40, seed=0), size=40, seed=1).maps[:, :, :, :36]
    maps = np.ascontiguousarray(maps[:, :, ::2, ::2]) if kw.get("upsample") else np.ascontiguousarray(maps)
    got = _cuda.fit_fused(maps, pdm, method=method, **kw)
    args = emulated.fit_args
    assert args == dict(factor=kw.get("upsample", 1), method=ectfast.METHODS.index(method),
                        sizes=list(schedule(kw.get("iterations", 5), kw.get("patch_sizes", DEFAULT_PATCH_SIZES))),
                        r0=kw.get("correction_patch_size", 30), a=kw.get("a", 0.25), b=kw.get("b", 25.0),
                        gamma=kw.get("gamma", 20.0), rho=kw.get("rho", 20.0), rho_tilde=pdm.noise_variance,
                        tol=kw.get("early_stop", 0.0), eps=SIMILARITY_EPS)
    sent = emulated.sentinels
    assert got.backend == "cuda" and got.method == method
    for name in ("peaks", "initial", "landmarks"):
        np.testing.assert_array_equal(getattr(got, name), sent[name], err_msg=name)
    if method == "crm":
        assert got.params is None and sent["params"] is None
    else:
        np.testing.assert_array_equal(got.params, sent["params"])
    np.testing.assert_array_equal(got.confidence, sent["w_final"].mean(-1))
    np.testing.assert_array_equal(got.visible, sent["w_final"].mean(-1) >= kw.get("visibility_threshold", 0.5))
    assert 0 < got.visible.sum() < got.visible.size


def test_fit_fused_shares_fits_argument_domains(emulated, pdm):
    maps = np.zeros((1, 68, 8, 8), np.float32)
    for kw, msg in ((dict(iterations=10**9), "^iterations: expected an integer in \\[0, 1000\\]"),
                    (dict(patch_sizes=(4000,)), "^patch_sizes: expected an integer in \\[2, 1024\\]"),
                    (dict(correction_patch_size=4000), "^correction_patch_size: expected an integer in"),
                    (dict(upsample=32), "^upsample: expected an integer in \\[1, 16\\]"),
                    (dict(a=float("nan")), "^a: expected a finite number")):
        with pytest.raises(ValueError, match=msg):
            _cuda.fit_fused(maps, pdm, **kw)
    assert "fit" not in emulated.calls


class _NoDeviceCore:
    cuda_built = True

    @staticmethod
    def cuda_device_count():
        return 0


def test_cuda_built_without_a_device_says_so(monkeypatch, pdm):
    """It used to say "'cuda' is not available here (built: ['reference', 'cpu'])"."""
    from ectfast.core import _dispatch

    monkeypatch.setattr(_dispatch, "_core", lambda: _NoDeviceCore)
    monkeypatch.setattr(_cuda, "_core", lambda: _NoDeviceCore)
    assert _dispatch.backends() == ["reference", "cpu"]
    msg = r"^backend: 'cuda' was built into this ectfast, but no CUDA device is visible"
    with pytest.raises(ValueError, match=msg):
        ectfast.fit(np.zeros((1, 68, 8, 8), np.float32), pdm, backend="cuda")
    with pytest.raises(ValueError, match=msg):
        _cuda.CudaOps()
    with pytest.raises(ValueError, match=msg):
        _cuda.fit_fused(np.zeros((1, 68, 8, 8), np.float32), pdm)


def test_cuda_not_built_says_so(monkeypatch, pdm):
    from ectfast.core import _dispatch

    class NoCuda:
        cuda_built = False

    monkeypatch.setattr(_dispatch, "_core", lambda: NoCuda)
    with pytest.raises(ValueError, match=r"^backend: 'cuda' is not available here \(usable: \['reference', 'cpu'\]\)$"):
        ectfast.fit(np.zeros((1, 68, 8, 8), np.float32), pdm, backend="cuda")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the emulation sees the inf values
def test_cuda_glue_solver_switch_and_flags(emulated, pdm, monkeypatch):
    maps = make_maps(random_pdm_shapes(pdm, 1, size=32, seed=3), size=32, seed=4).maps
    monkeypatch.setenv("ECTFAST_CUDA_SOLVER", "host")
    ectfast.fit(maps, pdm, iterations=1)
    assert "project-host" in emulated.calls and "project" not in emulated.calls
    monkeypatch.setenv("ECTFAST_CUDA_SOLVER", "gpu")
    with pytest.raises(ValueError, match="solver"):
        ectfast.fit(maps, pdm)
    monkeypatch.delenv("ECTFAST_CUDA_SOLVER")
    bad = maps.copy()
    bad[0, 7, 3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        ectfast.fit(bad, pdm)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _cuda.fit_fused(bad, pdm)
    with pytest.raises(ValueError, match="upsample"):
        _cuda.CudaOps().prepare(maps, 18, 68)
    with pytest.raises(ValueError, match="landmarks"):
        _cuda.CudaOps().prepare(maps[:, :30].copy(), 1, 68)
    with pytest.raises(TypeError, match="dtype"):
        _cuda.CudaOps().prepare(maps.astype(np.int32), 1, 68)
    with pytest.raises(ValueError, match="contiguous"):
        _cuda.CudaOps().prepare(np.ascontiguousarray(maps.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2), 1, 68)
