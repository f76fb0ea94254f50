"""The cuda backend against the NumPy reference.

Tests marked ``cuda`` need the CUDA build and a GPU (conftest skips them elsewhere). The others
run everywhere: the package must import, report no cuda backend and refuse backend="cuda" with a
clear error on a machine without a GPU.
"""
import numpy as np
import pytest

import ectfast
from ectfast.core import _reference as R
from ectfast.core.synthetic import gaussian_maps, make_maps, random_pdm_shapes

torch = pytest.importorskip("torch")

PX = 1e-3  # parity tolerance in pixels (float32 maps)


def _core():
    from ectfast.core import _core

    return _core


# ------------------------------------------------------------------ CPU-only machines


def _gpu_usable():
    try:
        return _core().cuda_device_count() > 0
    except ImportError:
        return False


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present")
def test_backends_exclude_cuda_without_gpu():
    # the extension imports and answers 0 devices (no driver/GPU here) without raising
    try:
        core = _core()
    except ImportError:
        pytest.skip("compiled extension not built")
    assert core.cuda_device_count() == 0
    assert isinstance(core.cuda_built, bool)
    assert "cuda" not in ectfast.backends()
    assert ectfast.cuda_available() is False


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present")
def test_fit_backend_cuda_without_gpu_raises_value_error(pdm):
    maps = make_maps(random_pdm_shapes(pdm, 1, seed=0), seed=0).maps
    # not built: "is not available"; built without a visible device: says that (issue 11)
    msg = r"backend: 'cuda' (is not available|was built into this ectfast, but no CUDA device is visible)"
    with pytest.raises(ValueError, match=msg):
        ectfast.fit(maps, pdm, backend="cuda")
    with pytest.raises(ValueError, match=msg):
        ectfast.fit(torch.from_numpy(maps), pdm, backend="cuda")


@pytest.mark.skipif(_gpu_usable(), reason="a GPU is present")
def test_cuda_bindings_refuse_missing_device():
    try:
        core = _core()
    except ImportError:
        pytest.skip("compiled extension not built")
    if not core.cuda_built:
        pytest.skip("built without CUDA")
    desc = (4096, (1, 68, 8, 8), (68 * 64, 64, 8, 1), "float32", 0)
    flags = (4096, (2,), (1,), "int32", 0)
    peaks = (4096, (1, 68, 2), (136, 2, 1), "float64", 0)
    with pytest.raises(ValueError, match="does not exist"):
        core.cuda_argmax(desc, 1, peaks, flags, 0)
    with pytest.raises(ValueError, match="does not exist"):
        core.cuda_device_info(0)


def test_cuda_ops_reject_host_arrays():
    from ectfast.core._cuda import _adopt

    with pytest.raises(ValueError, match="CUDA device"):
        _adopt(np.zeros((1, 68, 8, 8), np.float32))
    with pytest.raises(ValueError, match="CUDA device"):
        _adopt(torch.zeros((1, 68, 8, 8)))
    with pytest.raises(TypeError, match="response_maps"):
        _adopt([1, 2, 3])


# ------------------------------------------------------------------ helpers (GPU)


def _np(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _maps_for(pdm, B, size=256, seed=0, **kw):
    shapes = random_pdm_shapes(pdm, B, size=size, seed=seed)
    return make_maps(shapes, size=size, seed=seed + 1, **kw).maps


def _compare(res, ref, px=PX):
    np.testing.assert_array_equal(_np(res.peaks), ref.peaks)
    np.testing.assert_allclose(_np(res.initial), ref.initial, rtol=0, atol=px)
    np.testing.assert_allclose(_np(res.landmarks), ref.landmarks, rtol=0, atol=px)
    np.testing.assert_allclose(_np(res.confidence), ref.confidence, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(_np(res.visible), ref.visible)
    if ref.params is None:
        assert res.params is None
    else:
        np.testing.assert_allclose(_np(res.params), ref.params, rtol=0, atol=px * np.sqrt(ref.params.shape[1]))


def _fit_both(maps_np, pdm, maps_dev=None, **kw):
    maps_dev = torch.as_tensor(maps_np, device="cuda") if maps_dev is None else maps_dev
    res = ectfast.fit(maps_dev, pdm, backend="cuda", **kw)
    ref = ectfast.fit(maps_np, pdm, backend="reference", **kw)
    assert res.backend == "cuda" and isinstance(res.landmarks, torch.Tensor)
    assert res.landmarks.device == maps_dev.device
    return res, ref


# ------------------------------------------------------------------ parity (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("method", ectfast.METHODS)
def test_parity_every_method(pdm, method):
    maps = _maps_for(pdm, 3, outlier_fraction=0.15, occluded_fraction=0.1, noise=0.01, seed=3)
    res, ref = _fit_both(maps, pdm, method=method)
    _compare(res, ref)
    assert res.landmarks.dtype == torch.float64


@pytest.mark.cuda
def test_parity_single_face_and_early_stop(pdm):
    maps = _maps_for(pdm, 1, outlier_fraction=0.1, seed=7)
    res, ref = _fit_both(maps, pdm)
    _compare(res, ref)
    res, ref = _fit_both(maps, pdm, early_stop=0.05, iterations=8)
    _compare(res, ref)


@pytest.mark.cuda
def test_parity_odd_sizes_and_borders(pdm):
    # 67 x 93 maps; landmarks all over, some on and beyond the border (patches cut by the edge)
    rng = np.random.default_rng(11)
    H, W = 67, 93
    centres = np.stack([rng.uniform(-3, W + 2, (2, 68)), rng.uniform(-3, H + 2, (2, 68))], -1)
    centres[0, :6] = [[0, 0], [W - 1, H - 1], [0, H - 1], [W - 1, 0], [0.5, 30], [W - 1.5, 12]]
    maps = gaussian_maps(centres, H, W, sigma=3.0)
    for method in ("crm-pdm", "crm-clm", "ect"):
        res, ref = _fit_both(maps, pdm, method=method, patch_sizes=(21, 13, 7), iterations=3,
                             correction_patch_size=21)
        _compare(res, ref)


@pytest.mark.cuda
def test_parity_all_zero_maps(pdm):
    maps = np.zeros((2, 68, 64, 64), np.float32)
    for method in ectfast.METHODS:
        res, ref = _fit_both(maps, pdm, method=method)
        _compare(res, ref)
        assert np.all(_np(res.confidence) == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("torch_dtype", ["float16", "bfloat16", "float64"])
def test_parity_dtypes(pdm, torch_dtype):
    maps = _maps_for(pdm, 2, outlier_fraction=0.1, seed=5)
    dev = torch.as_tensor(maps, device="cuda").to(getattr(torch, torch_dtype))
    # the reference sees what fit.check_maps makes of these values: float32 (float64 stays)
    host = dev.cpu().double().numpy() if torch_dtype == "float64" else dev.float().cpu().numpy()
    res, ref = _fit_both(host, pdm, maps_dev=dev)
    _compare(res, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_upsample_on_the_fly_matches_explicit_upsampling(pdm, dtype):
    shapes = random_pdm_shapes(pdm, 2, seed=21)
    maps64 = gaussian_maps((shapes + 0.5) / 4.0 - 0.5, 64, 64, sigma=1.5)
    maps64[0, 3] = 0.0  # an occluded landmark
    dev = torch.as_tensor(maps64, device="cuda").to(getattr(torch, dtype))
    maps64 = dev.float().cpu().numpy()
    up = R.upsample(maps64, 4)  # (2, 68, 256, 256) float32, as the reference fits them
    for method in ("crm", "ect", "crm-clm"):
        fused = ectfast.fit(dev, pdm, backend="cuda", method=method, upsample=4)
        explicit = ectfast.fit(torch.as_tensor(up, device="cuda"), pdm, backend="cuda", method=method)
        ref = ectfast.fit(maps64, pdm, backend="reference", method=method, upsample=4)
        _compare(fused, ref)
        np.testing.assert_array_equal(_np(fused.peaks), _np(explicit.peaks))
        np.testing.assert_allclose(_np(fused.landmarks), _np(explicit.landmarks), rtol=0, atol=1e-9)


@pytest.mark.cuda
def test_host_solver_matches_device_cholesky(pdm, monkeypatch):
    maps = _maps_for(pdm, 4, outlier_fraction=0.2, seed=9)
    dev = torch.as_tensor(maps, device="cuda")
    device = ectfast.fit(dev, pdm, backend="cuda")
    monkeypatch.setenv("ECTFAST_CUDA_SOLVER", "host")
    host = ectfast.fit(dev, pdm, backend="cuda")
    np.testing.assert_allclose(_np(host.landmarks), _np(device.landmarks), rtol=0, atol=1e-8)
    np.testing.assert_allclose(_np(host.params), _np(device.params), rtol=0, atol=1e-8)


@pytest.mark.cuda
def test_runs_on_the_callers_stream(pdm):
    maps = _maps_for(pdm, 2, seed=13)
    dev = torch.as_tensor(maps, device="cuda")
    base = ectfast.fit(dev, pdm, backend="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        res = ectfast.fit(dev, pdm, backend="cuda")
        out = res.landmarks.clone()
    torch.cuda.current_stream().wait_stream(s)
    np.testing.assert_array_equal(_np(out), _np(base.landmarks))


@pytest.mark.cuda
def test_any_dlpack_producer_is_accepted(pdm):
    maps = _maps_for(pdm, 2, seed=17)
    t = torch.as_tensor(maps, device="cuda")

    class Producer:  # a foreign array type that only speaks DLPack
        def __dlpack__(self, **kwargs):
            return t.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return t.__dlpack_device__()

    res = ectfast.fit(Producer(), pdm)  # backend "auto" picks cuda for device memory
    assert res.backend == "cuda"
    np.testing.assert_array_equal(_np(res.landmarks), _np(ectfast.fit(t, pdm, backend="cuda").landmarks))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ectfast.METHODS)
def test_fused_fit_equals_per_op_path(pdm, method):
    from ectfast.core._cuda import fit_fused

    maps = _maps_for(pdm, 3, outlier_fraction=0.15, occluded_fraction=0.1, seed=23)
    dev = torch.as_tensor(maps, device="cuda")
    for kw in ({}, {"early_stop": 0.05, "iterations": 7}, {"patch_sizes": (45, 21, 7), "iterations": 3}):
        per_op = ectfast.fit(dev, pdm, backend="cuda", method=method, **kw)
        fused = fit_fused(dev, pdm, method=method, **kw)
        for name in ("peaks", "initial", "landmarks", "confidence", "visible"):
            np.testing.assert_array_equal(_np(getattr(fused, name)), _np(getattr(per_op, name)), err_msg=name)
        if method == "crm":
            assert fused.params is None
        else:
            np.testing.assert_array_equal(_np(fused.params), _np(per_op.params))
    small = torch.as_tensor(_maps_for(pdm, 1, size=64, seed=2)[:, :, ::4, ::4].copy(), device="cuda")
    np.testing.assert_array_equal(_np(fit_fused(small, pdm, method=method, upsample=4).landmarks),
                                  _np(ectfast.fit(small, pdm, backend="cuda", method=method, upsample=4).landmarks))
    bad = dev.clone()
    bad[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_fused(bad, pdm, method=method)


# ------------------------------------------------------------------ op-level parity (GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("r", [2, 7, 30, 45, 70])
@pytest.mark.parametrize("factor", [1, 4])
def test_patch_ops_match_reference(pdm, r, factor):
    from ectfast.core._cuda import CudaOps

    rng = np.random.default_rng(r * 10 + factor)
    size = 96 // factor
    shapes_src = rng.uniform(2, size - 3, (2, 68, 2))
    maps = gaussian_maps(shapes_src, size, size, sigma=2.0 if factor == 1 else 1.0)
    maps += rng.normal(0, 0.02, maps.shape).astype(np.float32)  # negatives to clamp
    maps[1, 5] = 0.0
    ops, ref = CudaOps(), R.ReferenceOps()
    dm = ops.prepare(torch.as_tensor(maps, device="cuda"), factor, 68)
    rm = ref.prepare(maps, factor)
    H = W = size * factor
    assert ops.dims(dm) == rm.shape
    np.testing.assert_array_equal(_np(ops.argmax(dm)), ref.argmax(rm))
    # points everywhere, including outside the map (clamped) and at exact half pixels
    pts = rng.uniform(-5, W + 4, (2, 68, 2))
    pts[0, :4] = [[0.5, 0.5], [W - 1.5, 7.5], [-10, H + 10], [W / 2, H / 2]]
    pts_d = torch.as_tensor(pts, device="cuda")
    # (upsampled noise can differ from the reference's float64 einsum by one float32 ulp)
    np.testing.assert_allclose(_np(ops.weights(dm, pts_d, r, 0.25, 25.0)), ref.weights(rm, pts, r, 0.25, 25.0),
                               rtol=0, atol=1e-7)
    for weighted in (True, False):
        w, t = ops.mean_shift(dm, pts_d, r, 0.25, 25.0, 20.0, weighted)
        w_r, t_r = ref.mean_shift(rm, pts, r, 0.25, 25.0, 20.0, weighted)
        np.testing.assert_allclose(_np(w), w_r, rtol=0, atol=1e-7)
        np.testing.assert_allclose(_np(t), t_r, rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_argmax_first_maximum_and_projection_ops(pdm):
    from ectfast.core._cuda import CudaOps

    maps = np.zeros((1, 68, 9, 11), np.float32)
    maps[0, :, 4, 7] = 2.0
    maps[0, :, 6, 2] = 2.0  # a later tie in row-major order
    maps[0, :, 1, 9] = 2.0  # the first one
    ops = CudaOps()
    dm = ops.prepare(torch.as_tensor(maps, device="cuda"), 1, 68)  # 9x11: plain loads
    assert np.all(_np(ops.argmax(dm)) == [9.0, 1.0])
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):  # 16-byte vector loads
        m8 = torch.zeros((2, 68, 8, 8), dtype=dtype, device="cuda")
        m8[:, :, 6, 1] = 3.0
        m8[:, :, 2, 5] = 3.0
        m8[1, :, 0, 7] = 3.0
        got = _np(ops.argmax(ops.prepare(m8, 1, 68)))
        assert np.all(got[0] == [5.0, 2.0]) and np.all(got[1] == [7.0, 0.0])
    # project / shape / clamp / freeze against the reference on random data
    rng = np.random.default_rng(2)
    ref = R.ReferenceOps()
    B = 5
    w = rng.uniform(0, 1, (B, 68, 2))
    w[0] = 0.0
    t = rng.uniform(0, 255, (B, 68, 2))
    x0 = ref.prior_params(pdm, B, 256, 256)
    for lam, ww in ((20.0, w), (pdm.noise_variance, None)):
        p = ops.project(pdm, None if ww is None else torch.as_tensor(ww, device="cuda"),
                        torch.as_tensor(t, device="cuda"), lam, torch.as_tensor(x0, device="cuda"), 1e-6)
        p_r = ref.project(pdm, ww, t, lam, x0, 1e-6)
        np.testing.assert_allclose(_np(p), p_r, rtol=1e-9, atol=1e-7)
    s = ops.shape(pdm, p)
    np.testing.assert_allclose(_np(s), ref.shape(pdm, p_r), rtol=0, atol=1e-7)
    np.testing.assert_allclose(_np(ops.clamp(s, 100, 120)), ref.clamp(_np(s), 100, 120), rtol=0, atol=0)
    np.testing.assert_allclose(_np(ops.prior_params(pdm, B, 256, 256)), x0, rtol=0, atol=1e-12)
    p_new = p + torch.as_tensor(rng.normal(0, 1e-3, p.shape), device="cuda")
    p_new[1] = p[1]
    active = torch.tensor([True, True, False, True, True], device="cuda")
    got_p, got_a = ops.freeze(p, p_new, active, 1e-4)
    exp_p, exp_a = ref.freeze(_np(p), _np(p_new), _np(active), 1e-4)
    np.testing.assert_array_equal(_np(got_p), exp_p)
    np.testing.assert_array_equal(_np(got_a), exp_a)


# ------------------------------------------------------------------ bad input (GPU)


@pytest.mark.cuda
def test_bad_inputs_raise_clear_errors(pdm):
    good = torch.as_tensor(_maps_for(pdm, 1, size=32, seed=1), device="cuda")
    with pytest.raises(TypeError, match="dtype"):
        ectfast.fit(good.to(torch.int32), pdm, backend="cuda")
    with pytest.raises(ValueError, match="4 dimensions"):
        ectfast.fit(good[0], pdm, backend="cuda")
    with pytest.raises(ValueError, match="landmarks"):
        ectfast.fit(good[:, :60], pdm, backend="cuda")
    with pytest.raises(ValueError, match="contiguous"):
        ectfast.fit(good.transpose(2, 3), pdm, backend="cuda")
    with pytest.raises(ValueError, match="at least 3x3"):
        ectfast.fit(good[:, :, :2, :2].contiguous(), pdm, backend="cuda")
    with pytest.raises(ValueError, match="empty"):
        ectfast.fit(good[:0], pdm, backend="cuda")
    for bad in (float("nan"), float("inf"), -float("inf")):
        m = good.clone()
        m[0, 17, 4, 8] = bad  # also in m[..., ::4, ::4]
        with pytest.raises(ValueError, match="NaN or infinite"):
            ectfast.fit(m, pdm, backend="cuda")
        with pytest.raises(ValueError, match="NaN or infinite"):
            ectfast.fit(m[:, :, ::4, ::4].contiguous(), pdm, backend="cuda", upsample=4)
    with pytest.raises(ValueError, match="upsample"):
        ectfast.fit(good, pdm, backend="cuda", upsample=3)
    with pytest.raises(ValueError, match="host arrays"):
        ectfast.fit(good, pdm, backend="cpu")
    # all-zero maps with gamma = 0: singular systems are reported, not returned as NaN
    with pytest.raises(ValueError, match="positive definite"):
        ectfast.fit(torch.zeros_like(good), pdm, backend="cuda", gamma=0.0, method="crm-clm-c")


@pytest.mark.cuda
def test_bindings_validate_descriptors(pdm):
    core = _core()
    maps = torch.zeros((1, 68, 16, 16), device="cuda")
    peaks = torch.empty((1, 68, 2), dtype=torch.float64, device="cuda")
    flags = torch.zeros(2, dtype=torch.int32, device="cuda")

    def d(t):
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype)[6:], t.device.index)

    host = np.zeros((1, 68, 16, 16), np.float32)
    host_desc = (host.ctypes.data, host.shape, (68 * 256, 256, 16, 1), "float32", 0)
    with pytest.raises(ValueError, match="not CUDA device memory"):
        core.cuda_argmax(host_desc, 1, d(peaks), d(flags), 0)
    with pytest.raises(ValueError, match="peaks: expected shape"):
        core.cuda_argmax(d(maps), 1, d(peaks[:, :10]), d(flags), 0)
    with pytest.raises(TypeError, match="peaks: expected dtype float64"):
        core.cuda_argmax(d(maps), 1, d(peaks.float()), d(flags), 0)
    with pytest.raises(ValueError, match="contiguous"):
        core.cuda_argmax(d(maps.transpose(2, 3)), 1, d(peaks), d(flags), 0)
    with pytest.raises(ValueError, match="null"):
        core.cuda_argmax((0,) + d(maps)[1:], 1, d(peaks), d(flags), 0)
    with pytest.raises(TypeError, match="descriptor"):
        core.cuda_argmax(maps, 1, d(peaks), d(flags), 0)
    with pytest.raises(ValueError, match="patch size"):
        core.cuda_patch(d(maps), 1, d(peaks), 1, 0.25, 25.0, 20.0, 0, d(peaks), None, 0)
    info = core.cuda_device_info(0)
    assert info["sm_count"] > 0 and info["major"] >= 7


@pytest.mark.cuda
def test_other_device_is_rejected(pdm):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from ectfast.core._cuda import CudaOps

    ops = CudaOps()
    dm = ops.prepare(torch.zeros((1, 68, 16, 16), device="cuda:0"), 1, 68)
    with pytest.raises(ValueError, match="cuda:1"):
        ops.weights(dm, torch.zeros((1, 68, 2), dtype=torch.float64, device="cuda:1"), 7, 0.25, 25.0)
