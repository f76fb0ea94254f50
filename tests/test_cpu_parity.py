"""The cpu backend (C++/Eigen, ectfast.core._core) against the NumPy reference, op by op and through
ectfast.fit for every method; and the compiled functions' own argument checks.

The core is required (a failed import fails this module) unless ECTFAST_ALLOW_NO_CORE=1.
Every case has a fixed seed, so a failure reproduces."""
import os

import numpy as np
import pytest

import ectfast
from ectfast.core import _reference as ref
from ectfast.core.peaks import argmax_peaks
from ectfast.core import synthetic

if os.environ.get("ECTFAST_ALLOW_NO_CORE") == "1":  # a deliberate pure-Python run only
    _core = pytest.importorskip("ectfast.core._core")
else:  # CI: a core that does not build or load must fail here, not skip
    import ectfast.core._core as _core  # noqa: E402
from ectfast.core._cpu import CpuOps, UpsampledMaps  # noqa: E402

TOL = 1e-8  # px; the two agree to ~1e-12 (float64 accumulation in both)


def _maps_for(pdm, B, H, W, *, dtype, seed, factor=1, outliers=0.1, occluded=0.1, noise=0.02,
              border=False):
    """Synthetic (B, n, H, W) maps (H, W: the size given to fit, before upsampling) and their
    true shapes in fitted pixels. border=True pushes some landmarks onto/over the map edge."""
    rng = np.random.default_rng(seed)
    Hf, Wf = H * factor, W * factor
    shapes = synthetic.random_pdm_shapes(pdm, B, size=min(Hf, Wf), seed=seed)
    shapes[..., 0] *= Wf / min(Hf, Wf)
    shapes[..., 1] *= Hf / min(Hf, Wf)
    if border:
        idx = rng.choice(pdm.n_landmarks, 12, replace=False)
        shapes[:, idx[:4], 0] = rng.uniform(-3, 1, (B, 4))
        shapes[:, idx[4:8], 1] = rng.uniform(Hf - 2, Hf + 3, (B, 4))
        shapes[:, idx[8:], 0] = Wf - 1
    sigma = synthetic.TARGET_SIGMA_256 * min(H, W) / 256.0 * 4
    maps = synthetic.gaussian_maps(shapes / factor, H, W, sigma, dtype=np.float64)
    k = pdm.n_landmarks
    for f in range(B):
        perm = rng.permutation(k)
        n_out, n_occ = int(outliers * k), int(occluded * k)
        for i in perm[:n_out]:  # a false peak somewhere else
            c = rng.uniform([0, 0], [W - 1, H - 1])
            maps[f, i] = synthetic.gaussian_maps(c[None, None], H, W, sigma, dtype=np.float64)[0, 0]
        maps[f, perm[n_out:n_out + n_occ]] = 0.0
    if noise:
        maps += rng.normal(0, noise, maps.shape)
    return maps.astype(dtype), shapes


def _assert_same_fit(r, c, tol=TOL):
    assert c.backend == "cpu" and r.backend == "reference"
    np.testing.assert_allclose(c.peaks, r.peaks, atol=0, rtol=0)
    np.testing.assert_allclose(c.initial, r.initial, atol=tol, rtol=0)
    np.testing.assert_allclose(c.landmarks, r.landmarks, atol=tol, rtol=0)
    np.testing.assert_allclose(c.confidence, r.confidence, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(c.visible, r.visible)
    if r.params is None:
        assert c.params is None
    else:
        np.testing.assert_allclose(c.params, r.params, atol=tol, rtol=0)


CASES = {
    # name: (seed, B, H, W, dtype, upsample, extra fit kwargs, map kwargs). Fixed seeds: the
    # cases used to be seeded with hash(name), which is salted per process (not reproducible).
    "B1-f32": (101, 1, 64, 64, np.float32, 1, {}, {}),
    "odd-37x53-f64": (102, 3, 37, 53, np.float64, 1, {}, {}),
    "border-f32": (103, 2, 48, 48, np.float32, 1, {}, {"border": True}),
    "upsample4-f32": (104, 2, 16, 16, np.float32, 4, {}, {}),
    "upsample4-odd-f64": (105, 2, 13, 17, np.float64, 4, {}, {"border": True}),
    "upsample8-f32": (108, 2, 8, 8, np.float32, 8, {}, {}),  # the lite network's 32x32 -> 256 (scaled down)
    "early-stop-f64": (106, 3, 64, 64, np.float64, 1, {"early_stop": 0.05, "iterations": 7}, {}),
    "early-stop-mixed-f32": (109, 5, 48, 48, np.float32, 1, {"early_stop": 0.5, "iterations": 12}, {"occluded": 0.5}),
    "clean-f64": (107, 2, 40, 40, np.float64, 1, {}, {"outliers": 0.0, "occluded": 0.0, "noise": 0.0}),
}


def test_case_seeds_are_fixed_and_distinct():
    seeds = [c[0] for c in CASES.values()]
    assert len(set(seeds)) == len(seeds) and all(isinstance(s, int) for s in seeds)


@pytest.mark.parametrize("method", ectfast.METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_matches_reference(pdm, method, case):
    seed, B, H, W, dtype, up, kw, mkw = CASES[case]
    maps, _ = _maps_for(pdm, B, H, W, dtype=dtype, seed=seed, factor=up, **mkw)
    r = ectfast.fit(maps, pdm, method=method, backend="reference", upsample=up, **kw)
    c = ectfast.fit(maps, pdm, method=method, backend="cpu", upsample=up, **kw)
    _assert_same_fit(r, c)
    assert c.landmarks.shape == (B, pdm.n_landmarks, 2)


def test_early_stop_actually_freezes_faces(pdm):
    maps, _ = _maps_for(pdm, 4, 64, 64, dtype=np.float64, seed=5, outliers=0, occluded=0, noise=0)
    ops = CpuOps()
    # a tolerance so large that every face stops after the first step: p must then stay put
    r = ectfast.fit(maps, pdm, backend="reference", early_stop=1e6, iterations=5)
    c = ectfast.fit(maps, pdm, backend="cpu", early_stop=1e6, iterations=5)
    one = ectfast.fit(maps, pdm, backend="cpu", iterations=1)
    _assert_same_fit(r, c)
    np.testing.assert_allclose(c.params, one.params, atol=1e-12)
    assert ops.name == "cpu"


@pytest.mark.parametrize("method", ectfast.METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_zero_maps(pdm, method, dtype):
    maps = np.zeros((2, pdm.n_landmarks, 32, 40), dtype)
    r = ectfast.fit(maps, pdm, method=method, backend="reference")
    c = ectfast.fit(maps, pdm, method=method, backend="cpu")
    _assert_same_fit(r, c)
    assert np.all(c.peaks == 0) and np.all(c.confidence == 0) and not c.visible.any()
    if method in ("crm-clm-c", "ect"):  # zero weights: the prior's placement, centred in the map
        ops = CpuOps()
        prior = ops.clamp(ops.shape(pdm, ops.prior_params(pdm, 2, 32, 40)), 32, 40)
        np.testing.assert_allclose(c.landmarks, prior, atol=1e-6)


def test_all_zero_maps_upsampled(pdm):
    maps = np.zeros((1, pdm.n_landmarks, 8, 8), np.float32)
    r = ectfast.fit(maps, pdm, backend="reference", upsample=4)
    c = ectfast.fit(maps, pdm, backend="cpu", upsample=4)
    _assert_same_fit(r, c)


def test_threads_give_identical_results(pdm):
    maps, _ = _maps_for(pdm, 5, 48, 48, dtype=np.float32, seed=9)
    base = ectfast.fit(maps, pdm, backend="cpu", num_threads=1)
    for t in (2, 3, 64):
        other = ectfast.fit(maps, pdm, backend="cpu", num_threads=t)
        np.testing.assert_array_equal(other.landmarks, base.landmarks)
        np.testing.assert_array_equal(other.confidence, base.confidence)
    assert _core.cpu_default_threads() >= 1


@pytest.mark.parametrize("nt", [0, -1, 1.5, True, "2"])
def test_bad_num_threads(nt):
    with pytest.raises(ValueError, match="num_threads"):
        CpuOps(num_threads=nt)


# ------------------------------------------------------------------ per op


@pytest.mark.parametrize("shape", [(2, 3, 3, 3), (1, 4, 37, 53), (2, 2, 256, 256), (1, 2, 1, 1),
                                   (1, 3, 1, 4099)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_argmax_first_maximum(rng, shape, dtype):
    # small integers: many ties, so the first maximum in row-major order is really tested
    maps = rng.integers(-5, 6, shape).astype(dtype)
    maps[0, 0] = -7.0  # all-negative map
    maps[0, 0].flat[-1] = -1.0  # its maximum in the very last element
    got = CpuOps().argmax(maps)
    np.testing.assert_array_equal(got, argmax_peaks(maps))
    assert got.dtype == np.float64 and got.shape == shape[:2] + (2,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("where", [0, 1, 2047, 2048, -1])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_argmax_reports_non_finite(dtype, where, bad):
    maps = np.zeros((2, 3, 50, 41), dtype)
    maps[1, 2].flat[where] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        CpuOps().argmax(maps)
    peaks, n_bad = _core.cpu_argmax(maps)
    assert n_bad == 1


@pytest.mark.parametrize("upsample", [1, 4])
def test_fit_rejects_non_finite(pdm, upsample):
    maps = np.zeros((2, pdm.n_landmarks, 16, 16), np.float32)
    maps[1, 30, 15, 15] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        ectfast.fit(maps, pdm, backend="cpu", upsample=upsample)


@pytest.mark.parametrize("factor", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_upsampling_on_the_fly(rng, factor, dtype):
    small = rng.normal(0, 1, (2, 6, 9, 7)).astype(dtype)
    small[0, 0] = 1.0  # constant: every interior upsampled value ties
    small[0, 1] = 0.0
    small[0, 2] = -2.0  # all negative: the maximum is on the (zero-padded) border
    small[0, 3] = 0.0
    small[0, 3, 2, 2] = 1.0  # a spike loses to a plateau elsewhere
    small[0, 3, 5:7, 3:5] = 0.9
    up = ref.upsample(small, factor)
    mine = _core.cpu_upsample(small, factor)
    assert mine.dtype == dtype and mine.shape == up.shape
    np.testing.assert_allclose(mine, up, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)
    want = argmax_peaks(up)
    got = _core.cpu_argmax(small, factor)[0]
    np.testing.assert_array_equal(_core.cpu_argmax(mine)[0], got)
    if dtype == np.float32:
        np.testing.assert_array_equal(got, want)
    else:
        # float64: where the upsampled map has exact ties in exact arithmetic (the plateau), the
        # reference's einsum and the core round differently in the last bit, so either tied
        # pixel may win; the value at the peak must still be the maximum up to that rounding.
        gi = got.astype(int)
        at = up[np.arange(2)[:, None], np.arange(6), gi[..., 1], gi[..., 0]]
        np.testing.assert_allclose(at, up.max((2, 3)), rtol=1e-15, atol=0)
        assert (got == want).all(-1).sum() >= 11  # only the plateau map may differ
    lazy = CpuOps().prepare(small, factor)
    assert isinstance(lazy, UpsampledMaps) and lazy.shape == up.shape and lazy.dtype == dtype
    np.testing.assert_array_equal(np.asarray(lazy), mine)
    shape = rng.uniform(-5, 60, (2, 6, 2))
    R = ref.ReferenceOps()
    for ops in (CpuOps(), CpuOps(lazy_upsample=False)):
        maps = ops.prepare(small, factor)
        for r in (2, 9, 10, 30):
            np.testing.assert_allclose(ops.weights(maps, shape, r, 0.25, 2.0),
                                       R.weights(up, shape, r, 0.25, 2.0), atol=1e-9)
            for want, got in zip(R.mean_shift(up, shape, r, 0.25, 2.0, 3.0, True),
                                 ops.mean_shift(maps, shape, r, 0.25, 2.0, 3.0, True)):
                np.testing.assert_allclose(got, want, atol=1e-9)


@pytest.mark.parametrize("factor", [2, 4])
def test_upsampled_argmax_many_candidates(rng, factor):
    """Maps with several separated near-maximal pixels (and long runs below them), so the
    on-the-fly search must visit and compare several candidate regions."""
    small = rng.uniform(-1, 0.5, (3, 8, 40, 37)).astype(np.float32)
    for m in range(8):
        idx = rng.choice(40 * 37, 5, replace=False)
        small[:, m].reshape(3, -1)[:, idx] = rng.uniform(0.95, 1.0, (3, 5)).astype(np.float32)
    small[1, 3, 20:22, 10:12] = 0.99  # a plateau next to a higher lone spike
    small[1, 3, 2, 30] = 1.0
    want = argmax_peaks(ref.upsample(small, factor))
    np.testing.assert_array_equal(_core.cpu_argmax(small, factor)[0], want)


def _random_points(rng, B, n, H, W):
    pts = np.stack([rng.uniform(-10, W + 10, (B, n)), rng.uniform(-10, H + 10, (B, n))], -1)
    pts[:, 0] = [0.5, 0.5]  # exactly half-way: rounds up
    pts[:, 1] = [W - 1.5, H - 1.49]
    return pts


@pytest.mark.parametrize("r", [0, 2, 3, 20, 30, 31, 400])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weights_match(rng, r, dtype):
    maps, _ = _maps_for(ectfast.default_pdm(), 2, 37, 53, dtype=dtype, seed=r)
    maps[0, 5] = 0.0
    shape = _random_points(rng, 2, maps.shape[1], 37, 53)
    want = ref.ReferenceOps().weights(maps, shape, r, 0.25, 25.0)
    got = CpuOps().weights(maps, shape, r, 0.25, 25.0)
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=0)
    # also a sigmoid that is not saturated (the default b = 25 pushes noisy patches to ~0)
    np.testing.assert_allclose(CpuOps().weights(maps, shape, r, 0.3, 0.5),
                               ref.ReferenceOps().weights(maps, shape, r, 0.3, 0.5), atol=1e-10)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("r", [2, 20, 30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_shift_matches(rng, weighted, r, dtype):
    maps, truth = _maps_for(ectfast.default_pdm(), 3, 64, 64, dtype=dtype, seed=r + weighted)
    maps[1, :10] = 0.0
    shape = truth + rng.normal(0, 4, truth.shape)
    shape[0, :5] = _random_points(rng, 1, 5, 64, 64)[0]
    for a, b, rho in ((0.25, 25.0, 20.0), (0.3, 1.0, 3.0), (0.25, 0.0, 0.5)):
        w0, t0 = ref.ReferenceOps().mean_shift(maps, shape, r, a, b, rho, weighted)
        w1, t1 = CpuOps().mean_shift(maps, shape, r, a, b, rho, weighted)
        np.testing.assert_allclose(w1, w0, atol=1e-10, rtol=0)
        np.testing.assert_allclose(t1, t0, atol=1e-9, rtol=0)
    assert np.abs(t1 - shape).max() > 0.1  # the mean shift really moved points


@pytest.mark.parametrize("weighted", [True, False])
def test_project_matches(pdm, rng, weighted):
    B, k = 6, pdm.n_params
    target = pdm.shape(rng.normal(0, 1, (B, k)) * 5) + rng.normal(0, 3, (B, pdm.n_landmarks, 2))
    w = rng.uniform(0, 1, (B, pdm.n_landmarks, 2)) if weighted else None
    if weighted:
        w[0] = 0.0  # no information at all: the prior + eps decide
        w[1, :30] = 0.0
    x0 = rng.normal(0, 10, (B, k))
    for lam, eps in ((20.0, 1e-6), (pdm.noise_variance, 1e-6), (0.0, 1e-3)):
        if lam == 0.0 and weighted:
            w[0] = 1.0  # lam = 0 needs weights everywhere for a regular system
        want = ref.ReferenceOps().project(pdm, w, target, lam, x0, eps)
        got = CpuOps().project(pdm, w, target, lam, x0, eps)
        np.testing.assert_allclose(got, want, atol=1e-8, rtol=1e-10)
        assert got.shape == (B, k)


# ------------------------------------------------------------------ the extension's own checks


def _good():
    maps = np.zeros((2, 3, 8, 9), np.float32)
    shape = np.full((2, 3, 2), 4.0)
    return maps, shape


@pytest.mark.parametrize("bad, exc", [
    (np.zeros((3, 8, 9), np.float32), ValueError),  # wrong ndim
    (np.zeros((2, 3, 8, 9), np.int32), TypeError),  # wrong dtype
    (np.zeros((2, 3, 8, 9), np.float16), TypeError),
    (np.zeros((2, 3, 8, 9), ">f4"), TypeError),  # non-native byte order
    (np.zeros((2, 3, 8, 18), np.float32)[..., ::2], ValueError),  # non-contiguous
    (np.zeros((2, 3, 9, 8), np.float32).transpose(0, 1, 3, 2), ValueError),  # Fortran-ish
    ([[[[0.0]]]], TypeError),  # not an array
    (None, TypeError),
    (np.zeros((2, 3, 0, 9), np.float32), ValueError),  # empty maps
])
def test_core_rejects_bad_maps(bad, exc):
    _, shape = _good()
    for call in (lambda: _core.cpu_argmax(bad),
                 lambda: _core.cpu_weights(bad, shape, 4, 0.25, 25.0),
                 lambda: _core.cpu_mean_shift(bad, shape, 4, 0.25, 25.0, 20.0, True),
                 lambda: _core.cpu_upsample(bad, 4)):
        with pytest.raises(exc, match="maps"):
            call()


def test_core_rejects_unaligned():
    buf = bytearray(2 * 3 * 8 * 9 * 4 + 1)
    maps = np.ndarray((2, 3, 8, 9), np.float32, buffer=buf, offset=1)
    assert not maps.flags.aligned
    with pytest.raises(ValueError, match="aligned"):
        _core.cpu_argmax(maps)


@pytest.mark.parametrize("bad, exc", [
    (np.full((2, 3, 3), 4.0), ValueError),
    (np.full((1, 3, 2), 4.0), ValueError),
    (np.full((2, 4, 2), 4.0), ValueError),
    (np.full((2, 3, 2), 4.0, np.float32), TypeError),
    (np.full((2, 3, 4), 4.0)[..., ::2], ValueError),
    (np.full((2, 3, 2), np.nan), ValueError),
    (np.full((2, 3, 2), np.inf), ValueError),
    (np.full((6, 2), 4.0), ValueError),
])
def test_core_rejects_bad_shapes(bad, exc):
    maps, _ = _good()
    with pytest.raises(exc, match="shape"):
        _core.cpu_weights(maps, bad, 4, 0.25, 25.0)
    with pytest.raises(exc, match="shape"):
        _core.cpu_mean_shift(maps, bad, 4, 0.25, 25.0, 20.0, False)


def test_core_rejects_bad_scalars():
    maps, shape = _good()
    with pytest.raises(ValueError, match="r:"):
        _core.cpu_weights(maps, shape, -1, 0.25, 25.0)
    with pytest.raises(ValueError, match="a:"):
        _core.cpu_weights(maps, shape, 4, np.nan, 25.0)
    with pytest.raises(ValueError, match="rho"):
        _core.cpu_mean_shift(maps, shape, 4, 0.25, 25.0, 0.0, True)
    with pytest.raises(ValueError, match="num_threads"):
        _core.cpu_argmax(maps, 1, -2)
    with pytest.raises(ValueError, match="factor"):
        _core.cpu_argmax(maps, 0)
    with pytest.raises(ValueError, match="factor"):
        _core.cpu_upsample(maps, 1000)
    with pytest.raises(TypeError):
        _core.cpu_weights(maps, shape, "4", 0.25, 25.0)


def test_core_project_checks(pdm):
    B, n2, k = 3, 2 * pdm.n_landmarks, pdm.n_params
    S, mean, pinv = pdm.basis, pdm.mean.reshape(-1), pdm.prior_inverse
    t, x0, w = np.zeros((B, n2)), np.zeros((B, k)), np.ones((B, n2))
    ok = _core.cpu_project(S, mean, pinv, 20.0, w, t, x0, 1e-6)
    assert ok.shape == (B, k) and np.isfinite(ok).all()
    cases = [
        ((S.T, mean, pinv, 20.0, w, t, x0, 1e-6), ValueError, "basis"),
        ((np.ascontiguousarray(S[:-2]), mean, pinv, 20.0, w, t, x0, 1e-6), ValueError, "mean"),
        ((S, mean[:-2], pinv, 20.0, w, t, x0, 1e-6), ValueError, "mean"),
        ((S, mean, pinv[:-1], 20.0, w, t, x0, 1e-6), ValueError, "prior_inv"),
        ((S, mean, -pinv, 20.0, w, t, x0, 1e-6), ValueError, "prior_inv"),
        ((S, mean, pinv, 20.0, w[:2], t, x0, 1e-6), ValueError, "w"),
        ((S, mean, pinv, 20.0, -w, t, x0, 1e-6), ValueError, "w"),
        ((S, mean, pinv, 20.0, w, t[:, :-1], x0, 1e-6), ValueError, "target"),
        ((S, mean, pinv, 20.0, w, t, x0[:, :-1], 1e-6), ValueError, "x0"),
        ((S, mean, pinv, 20.0, w, t.astype(np.float32), x0, 1e-6), TypeError, "target"),
        ((S, mean, pinv, 20.0, w, t + np.nan, x0, 1e-6), ValueError, "target"),
        ((np.asfortranarray(S), mean, pinv, 20.0, w, t, x0, 1e-6), ValueError, "basis"),
        ((S, mean, pinv, -1.0, w, t, x0, 1e-6), ValueError, "lam"),
        ((S, mean, pinv, 20.0, w, t, x0, -1.0), ValueError, "eps"),
        ((S, mean, pinv, 20.0, w, "t", x0, 1e-6), TypeError, "target"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=match):
            _core.cpu_project(*args)
    # no weight and no eps leave the similarity part undetermined (a singular system): LDLT's
    # zero pivots give those parameters 0, never NaN
    p = _core.cpu_project(S, mean, pinv, 20.0, np.zeros((B, n2)), t + 7.0, x0 + 3.0, 0.0)
    assert np.isfinite(p).all() and np.all(p[:, :4] == 0)


def test_single_column_patch_has_zero_sigma():
    """Eq. 15's guard: a patch whose mass lies in one column has sigma_x = 0 exactly -> w_x = 0
    (through mu, rounding could leave sigma ~1e-15 and flip w_x to 1)."""
    maps = np.zeros((1, 2, 20, 20))
    maps[0, 0, 3:9, 7] = [0.08052529, 0.08600001, 0.03732904, 0.3, 0.2, 0.1]
    maps[0, 1, 5, 2:12] = np.linspace(0.01, 0.7, 10) ** 3 / 3
    shape = np.array([[[5.0, 5.0], [6.0, 6.0]]])
    for a, b in ((0.25, 2.0), (0.25, 25.0)):
        want = ref.ReferenceOps().weights(maps, shape, 10, a, b)
        got = CpuOps().weights(maps, shape, 10, a, b)
        np.testing.assert_allclose(got, want, atol=1e-12)
        assert got[0, 0, 0] == 0 and got[0, 0, 1] > 0 and got[0, 1, 1] == 0 and got[0, 1, 0] > 0


# ------------------------------------------------------------------ property test (quick)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=int(__import__("os").environ.get("ECTFAST_FUZZ_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), H=st.integers(3, 40), W=st.integers(3, 40),
       r=st.integers(0, 45), f64=st.booleans(), weighted=st.booleans(),
       sparse=st.floats(0.0, 0.98), factor=st.sampled_from([1, 1, 2, 4]))
def test_ops_match_reference_on_random_maps(seed, H, W, r, f64, weighted, sparse, factor):
    """Random maps (with many exact zeros / negatives, so patches with a single positive
    pixel, row or column occur), random points in and around the map, every op.
    ECTFAST_FUZZ_EXAMPLES=3000 runs a longer search (passed when this was written)."""
    rng = np.random.default_rng(seed)
    dtype = np.float64 if f64 else np.float32
    small = rng.normal(0, 1, (2, 3, H, W))
    small[rng.uniform(size=small.shape) < sparse] = 0.0
    small = small.astype(dtype)
    R, C = ref.ReferenceOps(), CpuOps()
    up = ref.upsample(small, factor) if factor > 1 else small
    maps = C.prepare(small, factor)
    Hf, Wf = H * factor, W * factor
    shape = np.stack([rng.uniform(-3, Wf + 3, (2, 3)), rng.uniform(-3, Hf + 3, (2, 3))], -1)
    shape[0, 0] = np.round(shape[0, 0]) + 0.5  # exact half-pixel positions
    if dtype == np.float32 or factor == 1:
        np.testing.assert_array_equal(C.argmax(maps), R.argmax(up))
    np.testing.assert_allclose(C.weights(maps, shape, r, 0.25, 1.0), R.weights(up, shape, r, 0.25, 1.0),
                               atol=1e-9)
    w0, t0 = R.mean_shift(up, shape, r, 0.25, 1.0, 2.0, weighted)
    w1, t1 = C.mean_shift(maps, shape, r, 0.25, 1.0, 2.0, weighted)
    np.testing.assert_allclose(w1, w0, atol=1e-9)
    np.testing.assert_allclose(t1, t0, atol=1e-8)
