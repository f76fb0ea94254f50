"""``ectfast detect`` and ``ectfast eval`` through ectfast.cli.main, with a fake FCN."""
import json
import os

import cv2
import numpy as np
import pytest

from ectfast import cli, metrics
from ectfast import detector as D
from ectfast.pts import read_pts, write_pts

from _e2e_helpers import FiducialEstimator, draw_dots, ect_data, synthetic_face, template_shape  # noqa: F401


@pytest.fixture
def fake_fcn(monkeypatch, pdm):
    """Replace the FCN by the fiducial fake (template = the synthetic template)."""
    T = template_shape(pdm)
    est = FiducialEstimator(T, strict=False)
    monkeypatch.setattr(D, "NetEstimator", lambda weights=None, device="auto": est)
    return T, est


@pytest.fixture
def fake_haar(monkeypatch, ect_data):
    """Haar finds no face in drawn cartoons: give it, per image size, the Haar box (x, y, w, h)
    that the calibration maps onto the annotation's landmark box."""
    table = {}

    def register(img, gt):
        lo, hi = gt.min(0), gt.max(0)
        w = (hi - lo)[0] / D.HAAR_SW
        c = (lo + hi) / 2
        table[img.shape[:2]] = np.array([[c[0] - w / 2 - D.HAAR_DX * w, c[1] - w / 2 - D.HAAR_DY * w, w, w]])

    monkeypatch.setattr(D, "haar_faces", lambda im: table.get(im.shape[:2], np.zeros((0, 4))))
    return register


def _scene(tmp_path, T, fake_haar, n=2):
    rng = np.random.default_rng(21)
    paths, gts = [], []
    for k in range(n):
        img, gt = synthetic_face(T, rng, size=300 + 20 * k)  # distinct sizes key the fake Haar
        p = tmp_path / f"in{k}{'.png' if k % 2 == 0 else '.jpg'}"
        cv2.imwrite(str(p), img, [cv2.IMWRITE_JPEG_QUALITY, 100])
        fake_haar(img, gt)
        paths.append(str(p))
        gts.append(gt)
    return paths, gts


def test_detect_writes_images_and_json(tmp_path, fake_fcn, fake_haar, capsys):
    T, est = fake_fcn
    paths, gts = _scene(tmp_path, T, fake_haar)
    out = tmp_path / "out"
    rc = cli.main(["detect", *paths, "--out", str(out), "--json"])
    assert rc == 0
    assert est.calls == 1 and est.faces == 2  # both images in one batch
    for p, gt in zip(paths, gts):
        stem, ext = os.path.splitext(os.path.basename(p))
        drawn = cv2.imread(str(out / f"{stem}_landmarks{ext}"))
        src = cv2.imread(p)
        assert drawn is not None and drawn.shape == src.shape
        assert np.abs(drawn.astype(int) - src).max() > 100  # something was drawn
        doc = json.loads((out / f"{stem}.json").read_text())
        assert doc["image"] == p and doc["width"] == src.shape[1] and doc["height"] == src.shape[0]
        (face,) = doc["faces"]
        assert len(face["landmarks"]) == 68 and len(face["confidence"]) == 68 and len(face["visible"]) == 68
        assert len(face["box"]) == 4 and all(isinstance(v, bool) for v in face["visible"])
        # the JPEG input loses the dots' exact colour only at the edges: still accurate
        assert metrics.nme(np.array(face["landmarks"]), gt)[0] < 0.02
    printed = capsys.readouterr().out
    assert all(p in printed for p in paths)


def test_detect_bad_inputs_keep_going(tmp_path, fake_fcn, fake_haar, capsys):
    T, est = fake_fcn
    paths, gts = _scene(tmp_path, T, fake_haar, n=1)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((10, 12, 3), np.uint8))
    faceless = tmp_path / "faceless.png"
    cv2.imwrite(str(faceless), np.full((100, 90, 3), 128, np.uint8))
    grey = tmp_path / "grey.png"
    g_img, g_gt = synthetic_face(T, np.random.default_rng(5), size=280)
    cv2.imwrite(str(grey), cv2.cvtColor(g_img, cv2.COLOR_BGR2GRAY))
    fake_haar(g_img, g_gt)
    rgba = tmp_path / "rgba.png"
    r_img, r_gt = synthetic_face(T, np.random.default_rng(6), size=260)
    cv2.imwrite(str(rgba), cv2.cvtColor(r_img, cv2.COLOR_BGR2BGRA))
    fake_haar(r_img, r_gt)
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"
    rc = cli.main(["detect", str(corrupt), paths[0], str(tiny), str(missing), str(faceless), str(grey),
                   str(rgba), "--out", str(out), "--json"])
    err = capsys.readouterr().err
    assert rc == 0  # some images gave faces
    assert "corrupt.jpg: cannot read" in err
    assert "tiny.png: image of 12x10 px is too small" in err
    assert "missing.png: no such file" in err
    assert "faceless.png: no face found" in err
    assert "Traceback" not in err
    written = sorted(os.listdir(out))
    assert written == sorted(["in0_landmarks.png", "in0.json", "grey_landmarks.png", "grey.json",
                              "rgba_landmarks.png", "rgba.json"])
    rgba_face = json.loads((out / "rgba.json").read_text())["faces"][0]
    assert metrics.nme(np.array(rgba_face["landmarks"]), r_gt)[0] < 0.01  # RGBA file: converted, dots intact


def test_detect_exit_code_when_every_image_fails(tmp_path, fake_fcn, fake_haar, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    faceless = tmp_path / "faceless.png"
    cv2.imwrite(str(faceless), np.full((100, 90, 3), 128, np.uint8))
    rc = cli.main(["detect", str(bad), str(faceless), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert "no image gave a face" in capsys.readouterr().err


def test_detect_without_weights_is_a_clear_message(tmp_path, capsys, ect_data):
    try:
        from ectfast import model
    except ImportError:
        model = None
    if model is not None and model.has_pretrained():
        pytest.skip("weights are shipped in this installation")
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    rc = cli.main(["detect", str(img), "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith("ectfast detect: ")
    assert ("no trained FCN weights" in err) if model is not None else ("ectfast.model" in err)
    assert not (tmp_path / "o").exists()


def test_eval_cli(tmp_path, fake_fcn, ect_data, capsys):
    T, est = fake_fcn
    rng = np.random.default_rng(2)
    data = tmp_path / "data" / "lfpw" / "testset"
    data.mkdir(parents=True)
    for k in range(3):
        img, gt = synthetic_face(T, rng)
        cv2.imwrite(str(data / f"image_{k:04d}.png"), img)
        write_pts(data / f"image_{k:04d}.pts", gt)
    out = tmp_path / "res"
    rc = cli.main(["eval", str(tmp_path / "data"), "--method", "all", "--out", str(out), "--no-progress"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "| ECT |" in stdout and "| CRM-CLM-C |" in stdout
    assert sorted(os.listdir(out)) == ["ced.png", "per_face.csv", "results.csv", "results.md"]
    assert est.faces == 3
    rc = cli.main(["eval", str(tmp_path / "nothing"), "--no-progress"])
    assert rc == 2 and "not a folder" in capsys.readouterr().err


def test_eval_without_weights_is_a_clear_message(tmp_path, capsys, ect_data, pdm):
    try:
        from ectfast import model
    except ImportError:
        model = None
    if model is not None and model.has_pretrained():
        pytest.skip("weights are shipped in this installation")
    img, gt = synthetic_face(template_shape(pdm), np.random.default_rng(0))
    cv2.imwrite(str(tmp_path / "a.png"), img)
    write_pts(tmp_path / "a.pts", gt)
    rc = cli.main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("ectfast eval: ")


@pytest.mark.data
def test_detect_real_photo_with_real_haar(data_dir, tmp_path, monkeypatch, ect_data, capsys):
    folder = data_dir / "faces"
    gt = read_pts(folder / "lenna.pts")
    img = cv2.imread(str(folder / "lenna.png"))
    draw_dots(img, gt, radius=max(3.0, 0.02 * np.ptp(gt[:, 0])))
    p = tmp_path / "lenna.png"
    cv2.imwrite(str(p), img)
    est = FiducialEstimator(gt)
    monkeypatch.setattr(D, "NetEstimator", lambda weights=None, device="auto": est)
    rc = cli.main(["detect", str(p), "--out", str(tmp_path / "o"), "--json", "--method", "crm"])
    assert rc == 0
    faces = json.loads((tmp_path / "o" / "lenna.json").read_text())["faces"]
    best = min(faces, key=lambda f: np.linalg.norm(np.mean(f["landmarks"], 0) - gt.mean(0)))
    assert metrics.nme(np.array(best["landmarks"]), gt)[0] < 0.02  # measured 0.0105 (see test_detector)
