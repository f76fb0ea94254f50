"""Property-based fuzzing of the public entry points: ``ectfast.fit`` (every host backend),
``PDM.load``, ``read_pts`` / ``write_pts`` and the command-line parsers.

Properties, per example (each one time-bounded: a hang is a failure):

* fit: the arguments' validity is decided here, independently of ectfast (the documented domains);
  any invalid argument -> ValueError/TypeError whose message begins with the name of an invalid
  argument; invalid maps only -> one that begins with ``response_maps:``; all valid -> a finite,
  well-shaped result inside the map, confidence in [0, 1].
* PDM.load: ValueError/TypeError/OSError naming the file, never a hint to unpickle; a file that
  loads is a valid model (orthonormal basis, descending eigenvalues).
* read_pts: (n, 2) finite float64, or ValueError/OSError beginning with the path; write_pts
  round-trips every finite array and names ``points`` or the path otherwise.
* ectfast bench's parser: a Namespace of the declared types, or SystemExit (usage error);
  the detect/eval/train parsers never raise anything but SystemExit.

A few hundred examples in all by default; >= 10,000 per entry point with
``pytest -m fuzz_long --run-long-fuzz tests/test_fuzz.py`` (bench/RESULTS.md has the figures)."""
import contextlib
import io
import math
import os
import signal
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ectfast
from ectfast.core.fit import MapScaleWarning
from ectfast.core.pdm import PDM
from ectfast.io.pts import read_pts, write_pts

PDM_ = ectfast.default_pdm()
BACKENDS = [b for b in ectfast.backends() if b != "cuda"]
#: seconds one example may take before it counts as a hang
EXAMPLE_LIMIT_S = float(os.environ.get("ECTFAST_FUZZ_EXAMPLE_LIMIT", 60))
LONG = int(os.environ.get("ECTFAST_FUZZ_LONG_EXAMPLES", 10_000))


@contextlib.contextmanager
def time_bound(seconds=EXAMPLE_LIMIT_S):
    """Fail an example that runs longer than ``seconds`` (SIGALRM; main thread, POSIX)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"example ran longer than {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _settings(n):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------ fit

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


def _int_like(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _finite_real(v):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


#: The documented domain of every argument (README / fit's docstring), decided without ectfast.
VALID = {
    "method": lambda v: isinstance(v, str) and v in ectfast.METHODS,
    "iterations": lambda v: _int_like(v) and 0 <= v <= 1000,
    "patch_sizes": lambda v: (isinstance(v, (tuple, list)) and 1 <= len(v) <= 1000
                              and all(_int_like(r) and 2 <= r <= 1024 for r in v)),
    "correction_patch_size": lambda v: _int_like(v) and 2 <= v <= 1024,
    "a": lambda v: _finite_real(v) and v > 0,
    "b": _finite_real,
    "gamma": lambda v: _finite_real(v) and v >= 1e-6,
    "rho": lambda v: _finite_real(v) and v > 0,
    "early_stop": lambda v: v is None or (_finite_real(v) and v > 0),
    "visibility_threshold": _finite_real,
    "upsample": lambda v: _int_like(v) and (v == 1 or (2 <= v <= 16 and v % 2 == 0)),
    "backend": lambda v: v in ("auto",) + tuple(BACKENDS),
    "num_threads": lambda v: v is None or (_int_like(v) and 1 <= v <= 1024),
}


def _valid_maps(m):
    return (isinstance(m, np.ndarray) and m.dtype in (np.float16, np.float32, np.float64) and m.ndim == 4
            and m.shape[1] == 68 and m.shape[2] >= 3 and m.shape[3] >= 3 and bool(np.isfinite(m).all()))


@st.composite
def valid_maps(draw):
    """Maps fit must accept: (B, 68, H, W) finite float, peaks, noise, zero (occluded) maps."""
    B, H, W = draw(st.integers(0, 2)), draw(st.integers(3, 24)), draw(st.integers(3, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    yy, xx = np.mgrid[0:H, 0:W]
    c = rng.uniform([-2, -2], [W + 1, H + 1], (B, 68, 1, 1, 2))
    sigma = draw(st.sampled_from([0.3, 1.0, 2.0, 6.0]))
    maps = 1.064 * np.exp(-((xx - c[..., 0]) ** 2 + (yy - c[..., 1]) ** 2) / (2 * sigma**2))
    maps += rng.normal(0, draw(st.sampled_from([0.0, 0.01, 0.3])), maps.shape)
    maps[rng.uniform(size=(B, 68)) < draw(st.sampled_from([0.0, 0.2, 1.0]))] = 0.0
    maps *= draw(st.sampled_from([1.0, 1e-30, 1e4, -1.0]))
    return maps.astype(draw(st.sampled_from([np.float32, np.float64, np.float16])))


MAPS = st.one_of(map_arrays(), valid_maps(), valid_maps())


def _mostly(valid, invalid):
    """Valid values three times in four, so that examples with every argument valid are common."""
    return st.one_of(valid, valid, valid, invalid)


_BIG_INTS = [1000, 1001, 1024, 1025, 2**31, 2**63, 10**30, -1, 0]
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
FIT_KWARGS = st.fixed_dictionaries({}, optional={
    "method": _mostly(st.sampled_from(ectfast.METHODS), st.sampled_from(["ECT", "", None, 4, ("ect",)])),
    "iterations": _mostly(st.integers(0, 6), st.one_of(st.integers(-2, -1),
                                                       st.sampled_from(_BIG_INTS + [2.0, "5", None, True]))),
    "patch_sizes": _mostly(
        st.lists(st.integers(2, 40), min_size=1, max_size=4).map(tuple),
        st.one_of(st.lists(st.one_of(st.integers(-1, 40), st.sampled_from(_BIG_INTS)), max_size=4).map(tuple),
                  st.sampled_from([(5, 64), (1024,), "30", 30, None, (30.0,), (True,), [30, 20]]))),
    "correction_patch_size": _mostly(st.integers(2, 40), st.one_of(st.integers(-1, 1),
                                                                   st.sampled_from(_BIG_INTS + [30.0, None, "30"]))),
    "a": _mostly(st.floats(1e-3, 10), st.one_of(FLOATS, st.sampled_from([0, -1, 10**400, "a"]))),
    "b": _mostly(st.floats(-50, 50), st.one_of(FLOATS, st.sampled_from([None]))),
    "gamma": _mostly(st.floats(1e-6, 1e6), st.one_of(FLOATS, st.sampled_from([0.0, 1e-7]))),
    "rho": _mostly(st.floats(1e-3, 1e6), st.one_of(FLOATS, st.sampled_from([0.0]))),
    "early_stop": _mostly(st.one_of(st.none(), st.floats(1e-6, 10)), FLOATS),
    "visibility_threshold": _mostly(st.floats(-1, 2), st.one_of(FLOATS, st.just("0.5"))),
    "upsample": _mostly(st.sampled_from([1, 1, 1, 2, 4, 8, 16]), st.one_of(st.integers(-1, 18),
                                                                          st.sampled_from([100, 2.0, None, True]))),
    "backend": _mostly(st.sampled_from(["auto"] + [b for b in BACKENDS for _ in range(2)]),
                       st.sampled_from(["tpu", "cuda", None])),
    "num_threads": _mostly(st.one_of(st.none(), st.integers(1, 4)),
                           st.one_of(st.integers(-1, 0), st.sampled_from([1025, 2**40, 1.0]))),
})


def _check_fit(maps, kwargs):
    # keep every example small: many valid iterations come with an early stop that ends at once
    if VALID["iterations"](kwargs.get("iterations", 5)) and kwargs.get("iterations", 5) > 20:
        kwargs.setdefault("early_stop", 1e6)
    bad = {k for k, v in kwargs.items() if not VALID[k](v)}
    with time_bound():
        try:
            with np.errstate(all="ignore"), __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore", MapScaleWarning)
                res = ectfast.fit(maps, PDM_, **kwargs)
        except (ValueError, TypeError) as e:
            name = str(e).split(":")[0]
            if bad:
                assert name in bad, (str(e), bad)
            else:
                assert name == "response_maps" and not _valid_maps(maps), str(e)
            event(f"fit rejected: {name}")
            return "rejected"
    assert not bad, f"accepted invalid {bad}"
    assert _valid_maps(maps)
    B = maps.shape[0]
    assert res.landmarks.shape == (B, 68, 2)
    assert np.isfinite(res.landmarks).all()
    assert np.isfinite(res.confidence).all()
    assert ((res.confidence >= 0) & (res.confidence <= 1)).all()
    f = kwargs.get("upsample", 1)
    H, W = maps.shape[2] * f, maps.shape[3] * f
    if res.method != "crm":
        assert np.isfinite(res.params).all()
        assert (res.landmarks[..., 0] >= 1).all() and (res.landmarks[..., 0] <= W - 2).all()
        assert (res.landmarks[..., 1] >= 1).all() and (res.landmarks[..., 1] <= H - 2).all()
    event(f"fitted ({res.backend})")
    return "fitted"


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(60)
@given(maps=MAPS, kwargs=FIT_KWARGS)
def test_fit_fuzz(backend, maps, kwargs):
    """``backend`` is the one used where the example draws none."""
    kwargs.setdefault("backend", backend)
    _check_fit(maps, kwargs)


@pytest.mark.fuzz_long
@pytest.mark.parametrize("backend", BACKENDS)
@_settings(LONG)
@given(maps=MAPS, kwargs=FIT_KWARGS)
def test_fit_fuzz_long(backend, maps, kwargs):
    kwargs.setdefault("backend", backend)
    _check_fit(maps, kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(15)
@given(maps=valid_maps(), seed=st.integers(0, 2**16))
def test_fit_fuzz_valid_arguments_each_backend(backend, maps, seed):
    """Every host backend with valid arguments (random within the domain) on random maps."""
    rng = np.random.default_rng(seed)
    kwargs = dict(backend=backend, method=str(rng.choice(ectfast.METHODS)), iterations=int(rng.integers(0, 6)),
                  patch_sizes=tuple(int(r) for r in rng.integers(2, 40, rng.integers(1, 4))),
                  correction_patch_size=int(rng.integers(2, 40)), upsample=int(rng.choice([1, 2, 4])),
                  early_stop=None if rng.uniform() < 0.5 else float(rng.uniform(1e-4, 1)))
    _check_fit(maps, kwargs)


@pytest.mark.fuzz_long
@pytest.mark.parametrize("backend", BACKENDS)
@_settings(LONG)
@given(maps=valid_maps(), seed=st.integers(0, 2**16))
def test_fit_fuzz_valid_arguments_each_backend_long(backend, maps, seed):
    test_fit_fuzz_valid_arguments_each_backend.hypothesis.inner_test(backend, maps, seed)


# ------------------------------------------------------------------ PDM.load

with open(ectfast.core.pdm.DEFAULT_PDM_PATH, "rb") as _f:
    GOOD = _f.read()


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _fields():
    p = PDM_
    return dict(format=np.array("ectfast-pdm"), version=np.array(1), mean=p.mean, basis=p.basis,
                eigenvalues=p.eigenvalues, noise_variance=np.array(p.noise_variance))


@st.composite
def pdm_files(draw):
    kind = draw(st.sampled_from(["flip", "truncate", "random", "splice", "text", "fields", "fields"]))
    if kind == "text":
        return draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if kind == "fields":  # a well-formed archive with changed fields
        fields = _fields()
        name = draw(st.sampled_from(sorted(fields) + ["extra"]))
        change = draw(st.sampled_from(["drop", "permute", "scale", "rows", "dtype", "object", "nan", "value",
                                       "scalar", "string"]))
        rng = np.random.default_rng(draw(st.integers(0, 2**16)))
        v = fields.get(name, np.zeros(3))
        if change == "drop":
            fields.pop(name, None)
        elif change == "permute" and v.ndim:
            fields[name] = rng.permutation(v)
        elif change == "scale" and v.dtype.kind == "f":
            fields[name] = v * draw(st.sampled_from([-1.0, 0.0, 1e-300, 1e300, 1.01, 1.0]))
        elif change == "rows" and v.ndim:
            fields[name] = v[: max(0, v.shape[0] - draw(st.integers(1, 3)))]
        elif change == "dtype":
            dtype = draw(st.sampled_from([np.float32, np.int64, np.complex128, bool, "U3"]))
            try:
                fields[name] = v.astype(dtype)
            except ValueError:  # e.g. the format string as a number
                fields[name] = np.zeros(v.shape, dtype)
        elif change == "object":
            fields[name] = np.array([object()], dtype=object)
        elif change == "nan" and v.dtype.kind == "f" and v.size:
            w = v.copy()
            w.flat[rng.integers(0, w.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            fields[name] = w
        elif change == "value":
            fields[name] = np.array(draw(st.one_of(st.integers(-5, 5), st.floats(allow_nan=True))))
        elif change == "scalar":
            fields[name] = np.zeros(draw(st.integers(0, 3)))
        elif change == "string":
            fields[name] = np.array(draw(st.text(max_size=20)))
        try:
            return _npz_bytes(**fields)
        except Exception:  # savez refused (e.g. an object array without pickling support)
            return _npz_bytes(**_fields())
    data = bytearray(GOOD)
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


def _check_load(data):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.npz")
        with open(p, "wb") as f:
            f.write(data)
        with time_bound():
            try:
                pdm = PDM.load(p)
            except (ValueError, TypeError, OSError) as e:
                msg = str(e)
                assert msg.startswith(f"{p}: "), msg
                assert "allow_pickle" not in msg and "pickle.load" not in msg, msg
                event(f"pdm rejected: {type(e).__name__}")
                return "rejected"
    # a file that still loads must be a valid model
    k = pdm.n_params
    assert np.isfinite(pdm.basis).all() and pdm.n_landmarks >= 3
    np.testing.assert_allclose(pdm.basis.T @ pdm.basis, np.eye(k), atol=1e-6)
    assert (np.diff(pdm.eigenvalues) <= 0).all() and (pdm.eigenvalues > 0).all()
    event("pdm loaded")
    return "loaded"


@_settings(60)
@given(data=pdm_files())
def test_pdm_loader_fuzz(data):
    _check_load(data)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(data=pdm_files())
def test_pdm_loader_fuzz_long(data):
    _check_load(data)


# ------------------------------------------------------------------ read_pts / write_pts

GOOD_NUMBERS = st.one_of(st.floats(-1e4, 1e4).map(lambda v: f"{v:.3f}"), st.integers(-10**6, 10**6).map(str),
                        st.floats(-1e300, 1e300).map(repr), st.sampled_from([".5", "5.", "+3", "1e-400", "-0"]))
ODD_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.sampled_from(["nan", "inf", "-Infinity", "1e999", "1_0", "0x10", "--1", "1..2", ""]))


@st.composite
def pts_texts(draw):
    kind = draw(st.sampled_from(["random", "structured", "structured", "binary"]))
    if kind == "random":
        return draw(st.text(max_size=400)).encode("utf-8", "surrogatepass")
    if kind == "binary":
        return draw(st.binary(max_size=400))
    n = draw(st.integers(0, 70))
    sep = draw(st.sampled_from([" ", "  ", "\t", ",", ";", ", "]))
    lines = [f"{draw(GOOD_NUMBERS)}{sep}{draw(GOOD_NUMBERS)}" for _ in range(n)]
    if lines and draw(st.booleans()):  # one odd value
        i = draw(st.integers(0, n - 1))
        x, y = draw(GOOD_NUMBERS), draw(ODD_NUMBERS)
        lines[i] = f"{x}{sep}{y}" if draw(st.booleans()) else f"{y}{sep}{x}"
    if draw(st.booleans()):
        header = ["version: 1", f"n_points: {draw(st.sampled_from([n, n, n, n + 1, max(n - 1, 0), 68]))}", "{"]
        lines = header + lines + (["}"] if draw(st.integers(0, 3)) else [])
    if draw(st.integers(0, 3)) == 0 and lines:
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, draw(st.text(max_size=20).filter(lambda t: "\n" not in t and "\r" not in t)))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return eol.join(lines).encode("utf-8", "surrogatepass")


def _check_read(data, where):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.pts")
        if where == "file":
            with open(p, "wb") as f:
                f.write(data)
        elif where == "folder":
            os.mkdir(p)
        with time_bound():
            try:
                pts = read_pts(p)
            except (ValueError, OSError) as e:
                assert str(e).startswith(p), str(e)
                event(f"read_pts rejected: {type(e).__name__}")
                return "rejected"
    assert where == "file"
    event("read_pts read")
    assert pts.dtype == np.float64 and pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 1
    assert np.isfinite(pts).all()
    return "read"


@_settings(60)
@given(data=pts_texts(), where=st.sampled_from(["file", "file", "file", "folder", "missing"]))
def test_read_pts_fuzz(data, where):
    _check_read(data, where)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(data=pts_texts(), where=st.sampled_from(["file", "file", "file", "folder", "missing"]))
def test_read_pts_fuzz_long(data, where):
    _check_read(data, where)


POINTS = st.one_of(
    st.integers(1, 80).flatmap(lambda n: st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)),
                                                  min_size=n, max_size=n)).map(np.array),
    st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3), max_size=4),
    st.sampled_from([None, "abc", 3.0, [[1, 2], [3]], np.zeros((0, 2)), np.zeros((3, 3)), np.array([[1e308, -1e308]]),
                     np.zeros((2, 2), dtype=object), {"x": 1}]),
)


def _check_write(points, where):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "out.pts") if where != "no-folder" else os.path.join(d, "no", "out.pts")
        if where == "folder":
            os.mkdir(p)
        with time_bound():
            try:
                write_pts(p, points)
            except (ValueError, TypeError, OSError) as e:
                msg = str(e)
                assert msg.startswith("points: ") or msg.startswith(p), msg
                event(f"write_pts rejected: {type(e).__name__}")
                return "rejected"
            back = read_pts(p)
    assert where == "file"
    arr = np.asarray(points, dtype=np.float64)
    np.testing.assert_allclose(back, arr, atol=5.1e-4, rtol=1e-12)
    event("write_pts round trip")
    return "written"


@_settings(40)
@given(points=POINTS, where=st.sampled_from(["file", "file", "file", "folder", "no-folder"]))
def test_write_pts_fuzz(points, where):
    _check_write(points, where)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(points=POINTS, where=st.sampled_from(["file", "file", "file", "folder", "no-folder"]))
def test_write_pts_fuzz_long(points, where):
    _check_write(points, where)


# ------------------------------------------------------------------ command-line parsers

_PARSER = []


def _parser():
    if not _PARSER:
        from ectfast.cli import build_parser

        _PARSER.append(build_parser())
    return _PARSER[0]


BENCH_TYPES = {"batch": int, "size": int, "outliers": float, "repeat": int, "reference_batch": int, "seed": int}
BENCH_OPTIONS = ["--batch", "--size", "--outliers", "--repeat", "--reference-batch", "--backends", "--seed",
                 "--help", "-h", "--bogus", "--"]
VALUE_TOKENS = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                         st.text(max_size=12), st.sampled_from(["reference", "cpu", "cuda", "", "-1", "1e3", "0x10"]))


def _parse(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        return _parser().parse_args(argv)


BENCH_VALUES = {"--batch": st.integers(-2, 10**6).map(str), "--size": st.integers(-2, 10**5).map(str),
                "--outliers": st.floats(-1, 2).map(repr), "--repeat": st.integers(-2, 100).map(str),
                "--reference-batch": st.integers(-2, 100).map(str), "--seed": st.integers(-10**9, 10**9).map(str),
                "--backends": st.sampled_from(["reference", "cpu", "cuda"])}


@st.composite
def bench_argv(draw):
    """Mostly well-formed option/value pairs, with random tokens mixed in."""
    argv = []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 4)):
            opt = draw(st.sampled_from(sorted(BENCH_VALUES)))
            argv += [opt, draw(_mostly(BENCH_VALUES[opt], VALUE_TOKENS))]
        else:
            argv.append(draw(st.one_of(st.sampled_from(BENCH_OPTIONS), VALUE_TOKENS)))
    return argv


def _check_bench_args(argv):
    with time_bound():
        try:
            ns = _parse(["bench"] + argv)
        except SystemExit as e:
            assert e.code in (0, 2), e.code  # --help, or a usage error
            event(f"bench usage exit {e.code}")
            return "usage"
    assert ns.command == "bench"
    for name, kind in BENCH_TYPES.items():
        assert isinstance(getattr(ns, name), kind), (name, getattr(ns, name))
    assert ns.backends is None or all(isinstance(b, str) for b in ns.backends)
    event("bench parsed")
    return "parsed"


@_settings(40)
@given(argv=bench_argv())
def test_bench_arguments_fuzz(argv):
    _check_bench_args(argv)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(argv=bench_argv())
def test_bench_arguments_fuzz_long(argv):
    _check_bench_args(argv)


def _options(command):
    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted({o for a in sub.choices[command]._actions for o in a.option_strings} - {"-h", "--help"})


COMMAND = st.sampled_from(["detect", "eval", "train"])


@st.composite
def command_lines(draw):
    command = draw(COMMAND)
    opts = _options(command)
    return [command] + draw(st.lists(st.one_of(st.sampled_from(opts), VALUE_TOKENS), max_size=8))


def _check_other_parsers(argv):
    """detect/eval/train belong to other modules: here only that parsing never crashes."""
    with time_bound():
        try:
            _parse(argv)
        except SystemExit as e:
            event(f"{argv[0]} usage exit {e.code}")
            return "usage"
    event(f"{argv[0]} parsed")
    return "parsed"


@_settings(30)
@given(argv=command_lines())
def test_other_parsers_never_crash_fuzz(argv):
    _check_other_parsers(argv)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(argv=command_lines())
def test_other_parsers_never_crash_fuzz_long(argv):
    _check_other_parsers(argv)


# ------------------------------------------------------------------ weights and image loaders


def _mutations():
    """(kind, seed-driven parameters) of a file mutation: truncate, flip bytes, random bytes."""
    return st.one_of(st.tuples(st.just("truncate"), st.floats(0, 1)),
                     st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)),
                                                         min_size=1, max_size=8)),
                     st.tuples(st.just("random"), st.binary(max_size=4096)),
                     st.tuples(st.just("prefix"), st.binary(min_size=1, max_size=64)))


def _mutate(raw: bytes, m) -> bytes:
    kind, arg = m
    if kind == "truncate":
        return raw[: int(arg * len(raw))]
    if kind == "flip":
        b = bytearray(raw)
        for pos, x in arg:
            i = min(len(b) - 1, int(pos * len(b)))
            b[i] ^= x
        return bytes(b)
    if kind == "random":
        return arg
    return arg + raw


_WEIGHTS_RAW = None


def _check_weights(m):
    """The weights loader on a mutated copy of the shipped lite weights: it loads (the mutation
    missed everything that matters) or raises ValueError/OSError whose message names the file."""
    torch = pytest.importorskip("torch")  # noqa: F841  (the .pt loader needs torch)
    from ectfast.nets.model import DEFAULT_WEIGHTS, load_pretrained

    global _WEIGHTS_RAW
    if _WEIGHTS_RAW is None:
        with open(DEFAULT_WEIGHTS, "rb") as f:
            _WEIGHTS_RAW = f.read()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mutated_weights.pt")
        with open(path, "wb") as f:
            f.write(_mutate(_WEIGHTS_RAW, m))
        with time_bound():
            try:
                load_pretrained(path)
                event("loaded")
            except (ValueError, OSError) as e:
                assert "mutated_weights.pt" in str(e), str(e)
                event(type(e).__name__)


def _small_image(fmt: str) -> bytes:
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    return buf.tobytes()


def _check_image(fmt, m):
    """The detector's image reader on a mutated small JPEG/PNG: an image (H, W, 3) uint8 or an
    ImageError (ValueError) whose message starts with the path; never a crash or a hang."""
    from ectfast.io.images import read_image

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mutated" + fmt)
        with open(path, "wb") as f:
            f.write(_mutate(_small_image(fmt), m))
        with time_bound():
            try:
                im = read_image(path)
                assert im.image.ndim == 3 and im.image.shape[2] == 3 and im.image.dtype == np.uint8
                event("decoded")
            except ValueError as e:
                assert str(e).startswith(path), str(e)
                event("refused")


@_settings(25)
@given(m=_mutations())
def test_weights_loader_fuzz(m):
    _check_weights(m)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(m=_mutations())
def test_weights_loader_fuzz_long(m):
    _check_weights(m)


@_settings(40)
@given(fmt=st.sampled_from([".jpg", ".png"]), m=_mutations())
def test_image_loader_fuzz(fmt, m):
    _check_image(fmt, m)


@pytest.mark.fuzz_long
@_settings(LONG)
@given(fmt=st.sampled_from([".jpg", ".png"]), m=_mutations())
def test_image_loader_fuzz_long(fmt, m):
    _check_image(fmt, m)
