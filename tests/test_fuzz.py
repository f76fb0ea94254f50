"""Property-based fuzzing of ectfast.fit and the PDM loader: random shapes, dtypes and values
must give a finite, well-shaped result or a ValueError/TypeError, never a crash or a NaN.

A few hundred examples by default; >= 10,000 with ``pytest -m fuzz_long --run-long-fuzz``."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ectfast
from ectfast.pdm import PDM

PDM_ = ectfast.default_pdm()
BACKENDS = [b for b in ectfast.backends() if b != "cuda"]
DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint8, bool, np.complex64])
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.floats(-1e6, 1e6, width=32),
    st.just(0.0),
)


@st.composite
def map_arrays(draw):
    ndim = draw(st.sampled_from([4, 4, 4, 3, 5, 2]))
    if ndim == 4:
        shape = (draw(st.integers(0, 2)), draw(st.sampled_from([68, 68, 68, 5])),
                 draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    else:
        shape = tuple(draw(st.integers(0, 6)) for _ in range(ndim))
    dtype = draw(DTYPES)
    kind = draw(st.sampled_from(["random", "fill", "peaks"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "fill":
        arr = np.full(shape, draw(VALUES), dtype=np.float64)
    else:
        arr = rng.normal(0, draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e4])), shape)
        if kind == "peaks" and arr.size:
            arr[..., rng.integers(0, shape[-2] or 1), rng.integers(0, shape[-1] or 1)] = 1.06
        if draw(st.booleans()) and arr.size:
            arr.flat[rng.integers(0, arr.size)] = draw(VALUES)
    with np.errstate(all="ignore"):
        arr = arr.astype(dtype)
    if draw(st.booleans()) and ndim == 4 and shape[-1] > 1:
        arr = arr[..., ::-1]  # non-contiguous
    return arr


def _check_fit(maps, kwargs):
    try:
        res = ectfast.fit(maps, PDM_, **kwargs)
    except (ValueError, TypeError) as e:
        assert str(e)
        return
    B = maps.shape[0]
    assert res.landmarks.shape == (B, 68, 2)
    assert np.isfinite(res.landmarks).all()
    assert np.isfinite(res.confidence).all()
    assert ((res.confidence >= 0) & (res.confidence <= 1)).all()
    H, W = maps.shape[2] * kwargs.get("upsample", 1), maps.shape[3] * kwargs.get("upsample", 1)
    if res.method != "crm":
        assert (res.landmarks[..., 0] >= 1).all() and (res.landmarks[..., 0] <= W - 2).all()
        assert (res.landmarks[..., 1] >= 1).all() and (res.landmarks[..., 1] <= H - 2).all()


FIT_KWARGS = st.fixed_dictionaries({
    "method": st.sampled_from(ectfast.METHODS),
    "iterations": st.integers(0, 3),
    "patch_sizes": st.sampled_from([(30, 30, 20), (2,), (5, 64)]),
    "rho": st.sampled_from([20.0, 1e-3, 1e6]),
    "upsample": st.sampled_from([1, 1, 2]),
    "backend": st.sampled_from(BACKENDS),
})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(map_arrays(), FIT_KWARGS)
def test_fit_fuzz(maps, kwargs):
    _check_fit(maps, kwargs)


@pytest.mark.fuzz_long
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(map_arrays(), FIT_KWARGS)
def test_fit_fuzz_long(maps, kwargs):
    _check_fit(maps, kwargs)


with open(ectfast.pdm.DEFAULT_PDM_PATH, "rb") as _f:
    GOOD = _f.read()


@st.composite
def corrupted_files(draw):
    data = bytearray(GOOD)
    kind = draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 20))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "random":
        data = bytearray(draw(st.binary(max_size=2000)))
    else:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytearray(draw(st.binary(max_size=200))) + data[i:]
    return bytes(data)


def _check_load(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("pdm") / "f.npz"
    p.write_bytes(data)
    try:
        pdm = PDM.load(p)
    except ValueError as e:
        assert str(e)
        return
    # a file that still loads must be a valid model
    assert np.isfinite(pdm.basis).all() and pdm.n_landmarks >= 3


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=corrupted_files())
def test_pdm_loader_fuzz(tmp_path_factory, data):
    _check_load(tmp_path_factory, data)


@pytest.mark.fuzz_long
@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=corrupted_files())
def test_pdm_loader_fuzz_long(tmp_path_factory, data):
    _check_load(tmp_path_factory, data)
