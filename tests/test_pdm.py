import io
import os
import re
import zipfile

import numpy as np
import pytest

import ectfast
from ectfast.core.pdm import PDM, VERSION, default_pdm, procrustes_align


def _synthetic_shapes(rng, N=200, n=20, modes=3):
    base = np.stack([np.cos(np.linspace(0, 2 * np.pi, n, endpoint=False)),
                     0.7 * np.sin(np.linspace(0, 2 * np.pi, n, endpoint=False))], 1) * 50
    dirs = rng.normal(size=(modes, n, 2))
    out = []
    for _ in range(N):
        s = base + np.tensordot(rng.normal(size=modes) * [6, 3, 1.5], dirs, 1)
        t = rng.uniform(-0.5, 0.5)
        R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
        out.append(rng.uniform(0.5, 2) * s @ R.T + rng.uniform(-100, 100, 2))
    return np.stack(out)


def test_procrustes_recovers_similarity(rng):
    a = rng.normal(size=(10, 2))
    t = 0.7
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    b = 2.5 * a @ R.T + [3, -4]
    np.testing.assert_allclose(procrustes_align(a, b), b, atol=1e-12)


def test_from_shapes_structure(rng):
    shapes = _synthetic_shapes(rng)
    pdm = PDM.from_shapes(shapes, n_components=5)
    k = pdm.n_params
    assert pdm.basis.shape == (40, 9) and k == 9
    np.testing.assert_allclose(pdm.basis.T @ pdm.basis, np.eye(k), atol=1e-10)
    assert np.all(np.diff(pdm.eigenvalues) <= 0)
    lo, hi = pdm.mean.min(0), pdm.mean.max(0)
    assert np.linalg.norm(hi - lo) == pytest.approx(200.0)
    np.testing.assert_allclose(pdm.mean.mean(0), 0, atol=1e-9)
    # three true modes (plus the second-order residue of the similarity alignment); no noise
    # was added, so what is discarded is tiny
    assert pdm.noise_variance < 1e-3 * pdm.eigenvalues[2]
    assert pdm.eigenvalues[4] < 1e-2 * pdm.eigenvalues[2]
    # a similarity transform of a training shape is represented by the model up to the
    # tangent-space approximation; the similarity part alone reproduces scaled rotations of the mean
    t = 0.3
    R = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    s = 1.7 * pdm.mean @ R.T + [40, -7]
    np.testing.assert_allclose(pdm.best_fit(s), s, atol=1e-9)
    p = pdm.project(s)
    np.testing.assert_allclose(p[4:], 0, atol=1e-9)


def test_save_load_round_trip(tmp_path, rng):
    pdm = PDM.from_shapes(_synthetic_shapes(rng), n_components=4)
    pdm.save(tmp_path / "m.npz")
    back = PDM.load(tmp_path / "m.npz")
    assert back.checksum() == pdm.checksum()
    np.testing.assert_array_equal(back.basis, pdm.basis)


def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _fields(pdm):
    return dict(format=np.array("ectfast-pdm"), version=np.array(VERSION), mean=pdm.mean,
                basis=pdm.basis, eigenvalues=pdm.eigenvalues, noise_variance=np.array(pdm.noise_variance))


@pytest.mark.parametrize("change, msg", [
    (dict(version=np.array(VERSION + 1)), "version 2"),
    (dict(format=np.array("something-else")), "not an ectfast PDM"),
    (dict(eigenvalues=None), "missing"),
    (dict(mean=np.zeros((5, 2))), r"PDM mean: 5 points, but the basis has 136 rows"),
    # a mean one row short must blame the mean (it used to blame the basis)
    (dict(mean=np.zeros((67, 2))), r"PDM mean: 67 points, but the basis has 136 rows \(68 points\)"),
    (dict(basis=None), "missing"),
    (dict(basis=np.eye(136)[:, :30]), r"PDM basis: expected \(136, 34\)"),
    (dict(noise_variance=np.array(-1.0)), "noise_variance"),
    (dict(noise_variance=np.array([1.0, 2.0])), "malformed noise_variance"),
    (dict(noise_variance=np.array("one")), "malformed noise_variance"),
    (dict(version=np.array("1")), "malformed PDM version"),
    (dict(eigenvalues=np.full(30, np.nan)), "PDM eigenvalues: non-finite"),
    (dict(eigenvalues=-np.ones(30)), "PDM eigenvalues: must all be positive"),
    (dict(eigenvalues=np.full(30, 1e-320)), r"PDM eigenvalues: expected values in \[1e-12, 1e\+12\]"),
    (dict(noise_variance=np.array(1e300)), r"PDM noise_variance: expected a value in \[1e-12, 1e\+12\]"),
    # ascending eigenvalues silently changed the prior (they used to load)
    (dict(eigenvalues=np.sort(default_pdm().eigenvalues)), r"PDM eigenvalues: must be in descending order"),
])
def test_load_rejects_inconsistent_files(tmp_path, change, msg):
    fields = _fields(default_pdm())
    for k, v in change.items():
        if v is None:
            del fields[k]
        else:
            fields[k] = v
    _write_npz(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match=msg) as e:
        PDM.load(tmp_path / "bad.npz")
    assert str(e.value).startswith(f"{tmp_path / 'bad.npz'}: ")  # names the file


def test_load_rejects_non_orthonormal_basis(tmp_path):
    fields = _fields(default_pdm())
    fields["basis"] = fields["basis"] * 1.01
    _write_npz(tmp_path / "bad.npz", **fields)
    with pytest.raises(ValueError, match="orthonormal"):
        PDM.load(tmp_path / "bad.npz")


def test_load_rejects_corrupt_bytes(tmp_path):
    good = open(ectfast.core.pdm.DEFAULT_PDM_PATH, "rb").read()
    for i, data in enumerate([b"", b"not a zip file at all", good[: len(good) // 2],
                              good[:100] + bytes(200) + good[300:]]):
        p = tmp_path / f"c{i}.npz"
        p.write_bytes(data)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: not a (readable )?PDM file"):
            PDM.load(p)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(tmp_path / 'missing.npz'))}: no such PDM file"):
        PDM.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: is a folder"):
        PDM.load(tmp_path)
    with pytest.raises(TypeError, match="^path: "):
        PDM.load(12)


@pytest.mark.parametrize("data", [
    b"\x80\x04\x95" + bytes(range(256)) * 2,  # random-looking bytes (numpy tries them as a pickle)
    b"version: 1\nn_points: 68\nnot a model at all\n",  # a text file
    b"\x93NUMPY\x01\x00" + bytes(60),  # an .npy header, not an .npz
])
def test_load_never_suggests_unpickling(tmp_path, data):
    """Random bytes and text files used to get numpy's hint to load them with allow_pickle=."""
    p = tmp_path / "x.npz"
    p.write_bytes(data)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(p))}: not a PDM file") as e:
        PDM.load(p)
    assert "allow_pickle" not in str(e.value) and "pickle.load" not in str(e.value)


def test_load_refuses_pickles(tmp_path):
    fields = _fields(default_pdm())
    fields["mean"] = np.array([object()], dtype=object)
    with open(tmp_path / "p.npz", "wb") as f:
        np.savez(f, **fields)
    with pytest.raises(ValueError, match=r"array 'mean' holds Python objects.*never loaded") as e:
        PDM.load(tmp_path / "p.npz")
    assert "allow_pickle" not in str(e.value)


def test_load_bounds_the_unpacked_size(tmp_path, monkeypatch):
    fields = _fields(default_pdm())
    _write_npz(tmp_path / "m.npz", **fields)
    monkeypatch.setattr(ectfast.core.pdm, "MAX_FILE_BYTES", 10_000)
    with pytest.raises(ValueError, match=r"bytes unpacked; a PDM file holds 6 arrays of at most 10000"):
        PDM.load(tmp_path / "m.npz")


def test_constructor_validates_like_load():
    pdm = default_pdm()
    with pytest.raises(ValueError, match="^PDM eigenvalues: must be in descending order"):
        PDM(mean=pdm.mean, basis=pdm.basis, eigenvalues=pdm.eigenvalues[::-1].copy(),
            noise_variance=pdm.noise_variance)
    with pytest.raises(ValueError, match="^PDM mean: 67 points"):
        PDM(mean=pdm.mean[:67].copy(), basis=pdm.basis, eigenvalues=pdm.eigenvalues,
            noise_variance=pdm.noise_variance)
    # equal eigenvalues are allowed (non-increasing)
    ev = pdm.eigenvalues.copy()
    ev[5] = ev[6]
    PDM(mean=pdm.mean, basis=pdm.basis, eigenvalues=ev, noise_variance=pdm.noise_variance)


def test_from_shapes_validates(rng):
    with pytest.raises(ValueError, match="shapes"):
        PDM.from_shapes(np.zeros((10, 68)))
    with pytest.raises(ValueError, match="n_components"):
        PDM.from_shapes(_synthetic_shapes(rng, N=50), n_components=0)
    with pytest.raises(ValueError, match="more than n_components"):
        PDM.from_shapes(_synthetic_shapes(rng, N=5), n_components=10)
    bad = _synthetic_shapes(rng, N=50)
    bad[3, 2, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        PDM.from_shapes(bad)


def test_default_pdm_is_the_300w_model():
    pdm = default_pdm()
    assert (pdm.n_landmarks, pdm.n_components) == (68, 30)
    # DESIGN.md: noise variance ~1.0 with 30 of 132 kept
    assert 0.7 < pdm.noise_variance < 1.5
    assert os.path.getsize(ectfast.core.pdm.DEFAULT_PDM_PATH) < 300_000
    # the first mode dominates (head pose / face shape), eigenvalues decrease
    assert pdm.eigenvalues[0] > 1000 and np.all(np.diff(pdm.eigenvalues) <= 0)


def test_shipped_pdm_is_reproducible_from_the_data(data_dir):
    from ectfast.io.datasets import TRAIN_SUBSETS, find_faces
    from ectfast.io.pts import read_pts

    paths = [pts for sub in TRAIN_SUBSETS for _, pts in find_faces(data_dir / "300w" / sub)]
    assert len(paths) == 2012
    pdm = PDM.from_shapes(np.stack([read_pts(p) for p in paths]), n_components=30)
    ref = default_pdm()
    np.testing.assert_allclose(pdm.mean, ref.mean, atol=1e-6)
    np.testing.assert_allclose(pdm.eigenvalues, ref.eigenvalues, rtol=1e-6)
    # modes are defined up to sign
    np.testing.assert_allclose(np.abs(np.sum(pdm.basis * ref.basis, 0)), 1.0, atol=1e-6)
