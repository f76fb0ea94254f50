"""ectfast.fit on synthetic response maps: the method works, defined results, bad input.

Runs on every host backend that is built (reference always, cpu when compiled)."""
import numpy as np
import pytest

import ectfast
from ectfast.core import synthetic as sy

HOST_BACKENDS = [b for b in ectfast.backends() if b != "cuda"]


@pytest.fixture(params=HOST_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def pdm_batch():
    pdm = ectfast.default_pdm()
    shapes = sy.random_pdm_shapes(pdm, 12, seed=0)
    return pdm, shapes


def _err(a, b):
    return np.linalg.norm(a - b, axis=-1).mean()


def test_ect_recovers_representable_shapes(pdm_batch, backend):
    pdm, shapes = pdm_batch
    maps = sy.make_maps(shapes, seed=1).maps
    res = ectfast.fit(maps, pdm, backend=backend)
    # measured: 0.46 px mean (5 iterations); the argmax alone is limited by the pixel grid
    assert _err(res.landmarks, shapes) < 0.5
    assert res.confidence.min() > 0.9 and res.visible.all()
    assert res.landmarks.shape == (12, 68, 2) and res.confidence.shape == (12, 68)
    assert res.params.shape == (12, pdm.n_params) and res.backend == backend


def test_more_iterations_converge_further(pdm_batch, backend):
    pdm, shapes = pdm_batch
    maps = sy.make_maps(shapes[:4], seed=1).maps
    e = [_err(ectfast.fit(maps, pdm, iterations=k, backend=backend).landmarks, shapes[:4])
         for k in (0, 2, 5, 10)]
    assert e[0] > e[1] > e[2] > e[3]


def test_ect_resists_false_peaks(pdm_batch, backend):
    pdm, shapes = pdm_batch
    maps = sy.make_maps(shapes, outlier_fraction=0.2, seed=2).maps
    err = {m: _err(ectfast.fit(maps, pdm, method=m, backend=backend).landmarks, shapes)
           for m in ectfast.METHODS}
    # measured: crm ~27 px, crm-pdm ~23, crm-clm ~11, ect ~1.6
    assert err["ect"] < 3.0
    assert err["ect"] < 0.2 * err["crm-clm"] < err["crm-pdm"] < err["crm"]


def test_outliers_get_low_confidence(pdm_batch, backend):
    pdm, shapes = pdm_batch
    batch = sy.make_maps(shapes[:6], outlier_fraction=0.2, occluded_fraction=0.1, seed=4)
    res = ectfast.fit(batch.maps, pdm, backend=backend)
    good = ~(batch.outliers | batch.occluded)
    assert res.confidence[good].mean() > 0.9
    assert res.confidence[batch.occluded].max() == 0.0
    assert not res.visible[batch.occluded].any()
    # a false peak far away leaves the landmark's patch empty at the fitted position
    assert res.confidence[batch.outliers].mean() < 0.2


def test_crm_is_the_argmax(pdm_batch, backend):
    pdm, shapes = pdm_batch
    batch = sy.make_maps(shapes[:3], seed=5)
    res = ectfast.fit(batch.maps, pdm, method="crm", backend=backend)
    np.testing.assert_array_equal(res.landmarks, np.floor(batch.peaks + 0.5))
    assert res.params is None


def test_all_zero_maps_give_the_prior(pdm, backend):
    maps = np.zeros((2, 68, 64, 80), np.float32)
    for m in ectfast.METHODS[1:]:
        res = ectfast.fit(maps, pdm, method=m, backend=backend)
        assert np.isfinite(res.landmarks).all()
        np.testing.assert_array_equal(res.confidence, 0)
        assert not res.visible.any()
    res = ectfast.fit(maps, pdm, backend=backend)
    # the mean shape at the map centre (clamped to the map)
    expect = np.clip(pdm.mean + [(80 - 1) / 2, (64 - 1) / 2], 1, [78, 62])
    np.testing.assert_allclose(res.landmarks[0], expect, atol=1e-3)


def test_partial_zero_maps_are_finite(pdm, backend, rng):
    maps = sy.make_maps(sy.random_pdm_shapes(pdm, 2, seed=1), seed=2).maps
    maps[:, 5:] = 0  # only 5 landmarks have a response
    res = ectfast.fit(maps, pdm, backend=backend)
    assert np.isfinite(res.landmarks).all() and np.isfinite(res.params).all()


def test_empty_batch(pdm, backend):
    res = ectfast.fit(np.zeros((0, 68, 32, 32), np.float32), pdm, backend=backend)
    assert res.landmarks.shape == (0, 68, 2) and res.confidence.shape == (0, 68)


def test_upsample_equals_explicit_upsampling(pdm, backend):
    from ectfast.core._reference import upsample

    shapes = sy.random_pdm_shapes(pdm, 2, size=64, seed=3)
    small = sy.make_maps(shapes, size=64, seed=4).maps
    a = ectfast.fit(small, pdm, upsample=4, backend=backend)
    b = ectfast.fit(upsample(small, 4), pdm, backend=backend)
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-6)


def test_dtypes_and_layouts_agree(pdm, backend):
    maps64 = sy.make_maps(sy.random_pdm_shapes(pdm, 2, seed=6), seed=7, dtype=np.float64).maps
    ref = ectfast.fit(maps64, pdm, backend=backend).landmarks
    f32 = ectfast.fit(maps64.astype(np.float32), pdm, backend=backend).landmarks
    np.testing.assert_allclose(f32, ref, atol=1e-3)
    # non-contiguous input (a strided view) gives the same result as its contiguous copy
    big = np.zeros((2, 68, 256, 512), np.float32)
    big[..., ::2] = maps64
    view = big[..., ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_allclose(ectfast.fit(view, pdm, backend=backend).landmarks, f32, atol=1e-9)
    f16 = ectfast.fit(maps64.astype(np.float16), pdm, backend=backend).landmarks
    np.testing.assert_allclose(f16, ref, atol=0.05)


def test_torch_cpu_tensors(pdm, backend):
    torch = pytest.importorskip("torch")
    maps = sy.make_maps(sy.random_pdm_shapes(pdm, 2, seed=8), seed=9).maps
    ref = ectfast.fit(maps, pdm, backend=backend).landmarks
    np.testing.assert_allclose(ectfast.fit(torch.from_numpy(maps), pdm, backend=backend).landmarks, ref)
    bf = ectfast.fit(torch.from_numpy(maps).bfloat16(), pdm, backend=backend).landmarks
    np.testing.assert_allclose(bf, ref, atol=0.1)


def test_early_stop_freezes_converged_faces(pdm, backend):
    maps = sy.make_maps(sy.random_pdm_shapes(pdm, 3, seed=10), seed=11).maps
    full = ectfast.fit(maps, pdm, iterations=8, backend=backend)
    stopped = ectfast.fit(maps, pdm, iterations=8, early_stop=1e3, backend=backend)
    one = ectfast.fit(maps, pdm, iterations=1, backend=backend)
    # a huge tolerance stops every face after its first step
    np.testing.assert_allclose(stopped.landmarks, one.landmarks, atol=1e-9)
    assert not np.allclose(full.landmarks, one.landmarks)
    tiny = ectfast.fit(maps, pdm, iterations=8, early_stop=1e-12, backend=backend)
    np.testing.assert_allclose(tiny.landmarks, full.landmarks, atol=1e-9)


def test_results_do_not_depend_on_the_batch(pdm, backend):
    maps = sy.make_maps(sy.random_pdm_shapes(pdm, 3, seed=12), outlier_fraction=0.1, seed=13).maps
    together = ectfast.fit(maps, pdm, backend=backend, early_stop=1e-2)
    for f in range(3):
        alone = ectfast.fit(maps[f:f + 1], pdm, backend=backend, early_stop=1e-2)
        np.testing.assert_allclose(alone.landmarks[0], together.landmarks[f], atol=1e-9)


def test_visibility_threshold(pdm, backend):
    batch = sy.make_maps(sy.random_pdm_shapes(pdm, 2, seed=14), occluded_fraction=0.25, seed=15)
    res = ectfast.fit(batch.maps, pdm, visibility_threshold=0.5, backend=backend)
    np.testing.assert_array_equal(res.visible, res.confidence >= 0.5)
    np.testing.assert_array_equal(res.visible, ~batch.occluded)
    assert ectfast.fit(batch.maps, pdm, visibility_threshold=1.01, backend=backend).visible.sum() == 0


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("maps, err, msg", [
    (np.zeros((68, 64, 64), np.float32), ValueError, r"4 dimensions.*maps\[None\]"),
    (np.zeros((1, 67, 64, 64), np.float32), ValueError, "67 maps per face but the PDM has 68"),
    (np.zeros((1, 68, 2, 64), np.float32), ValueError, "at least 3x3"),
    (np.zeros((1, 68, 8, 8), np.int32), TypeError, "float32 or float64"),
    (np.zeros((1, 68, 8, 8), bool), TypeError, "float32 or float64"),
    (np.zeros((1, 68, 8, 8), np.complex64), TypeError, "float32 or float64"),
    ([[1.0]], TypeError, "NumPy array or a torch tensor"),
    ("maps", TypeError, "NumPy array or a torch tensor"),
])
def test_bad_maps(pdm, backend, maps, err, msg):
    with pytest.raises(err, match=msg):
        ectfast.fit(maps, pdm, backend=backend)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_maps(pdm, backend, value):
    maps = np.zeros((2, 68, 16, 16), np.float32)
    maps[1, 40, 3, 7] = value
    with pytest.raises(ValueError, match="NaN or infinite"):
        ectfast.fit(maps, pdm, backend=backend)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(method="ECT!"), "method"),
    (dict(iterations=-1), "iterations"),
    (dict(iterations=2.5), "iterations"),
    (dict(patch_sizes=()), "patch_sizes"),
    (dict(patch_sizes=(30, 1)), "patch_sizes"),
    (dict(patch_sizes="30"), "patch_sizes"),
    (dict(correction_patch_size=0), "correction_patch_size"),
    (dict(a=0), "a"),
    (dict(b=np.nan), "b"),
    (dict(gamma=-1), "gamma"),
    (dict(rho=0), "rho"),
    (dict(early_stop=0), "early_stop"),
    (dict(visibility_threshold="high"), "visibility_threshold"),
    (dict(upsample=3), "upsample"),
    (dict(upsample=0), "upsample"),
    (dict(upsample=18), "upsample"),
    (dict(iterations=10**9), "iterations"),
    (dict(patch_sizes=(30, 2000)), "patch_sizes"),
    (dict(correction_patch_size=2000), "correction_patch_size"),
    (dict(num_threads=0), "num_threads"),
    (dict(a="0.25"), "a"),
    (dict(b=None), "b"),
    (dict(backend="tpu"), "backend"),
    (dict(pdm="default"), "pdm"),
])
def test_bad_parameters(pdm, kwargs, msg):
    """The message must begin with the argument's name (``match="a"`` used to accept any message
    containing the letter a)."""
    kwargs.setdefault("pdm", pdm)
    with pytest.raises((ValueError, TypeError), match=rf"^{msg}: "):
        ectfast.fit(np.zeros((1, 68, 16, 16), np.float32), **kwargs)


def test_cuda_backend_without_gpu_is_a_clear_error(pdm):
    from ectfast.core import _dispatch

    if "cuda" in ectfast.backends():
        pytest.skip("a GPU is present")
    core = _dispatch._core()
    if core is not None and getattr(core, "cuda_built", False):
        # built with CUDA, no device: say so (it used to say "not available (built: [...])")
        msg = r"^backend: 'cuda' was built into this ectfast, but no CUDA device is visible"
    else:
        msg = r"^backend: 'cuda' is not available here"
    with pytest.raises(ValueError, match=msg):
        ectfast.fit(np.zeros((1, 68, 16, 16), np.float32), pdm, backend="cuda")


def test_iterations_beyond_patch_sizes_repeat_the_last():
    from ectfast.core.fit import schedule

    assert schedule(7, (30, 30, 30, 20, 20)) == (30, 30, 30, 20, 20, 20, 20)
    assert schedule(2, (30, 20, 10)) == (30, 20)
    assert schedule(0, (30,)) == ()


def test_fit_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, numpy as np, ectfast; "
            "r = ectfast.fit(np.zeros((1, 68, 16, 16), np.float32)); "
            "assert 'torch' not in sys.modules, 'fit imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
