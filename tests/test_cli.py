"""``ectfast detect`` and ``ectfast eval`` through ectfast.cli.main, with a fake FCN."""
import json
import os

import cv2
import numpy as np
import pytest

from ectfast import cli
from ectfast.core import metrics
from ectfast.app import detector as D
from ectfast.nets import engine as engine_mod
from ectfast.io.pts import read_pts, write_pts

from ectfast.nets import data as facedata  # noqa: E402
from _e2e_helpers import FiducialEstimator, draw_dots, synthetic_face, template_shape  # noqa: F401


@pytest.fixture
def fake_fcn(monkeypatch, pdm):
    """Replace the FCN by the fiducial fake (template = the synthetic template)."""
    T = template_shape(pdm)
    est = FiducialEstimator(T, strict=False)
    monkeypatch.setattr(engine_mod, "make_estimator", lambda *a, **k: est)
    return T, est


@pytest.fixture
def fake_haar(monkeypatch):
    """Face detectors find no face in drawn cartoons: the default face detector becomes one that
    gives, per image size, the annotation's own crop box."""
    table = {}

    def register(img, gt):
        table[img.shape[:2]] = np.asarray(facedata.box_from_landmarks(gt), float)[None]

    def fake(im):
        return table.get(im.shape[:2], np.zeros((0, 4)))

    fake.name = "fake"
    monkeypatch.setattr(D, "default_face_detector", lambda: fake)
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
                   str(rgba), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1  # some images could not be processed; the others were written
    assert "corrupt.jpg: the file ends before the JPEG frame header (truncated)" in err
    assert "tiny.png: image of 12x10 px is too small to contain a face" in err
    assert "missing.png: no such file" in err
    assert "faceless.png: no face found" in err
    assert "Traceback" not in err
    assert "5 image(s) processed (3 with faces, 2 without; 3 faces), 2 failed" in err
    written = sorted(os.listdir(out))
    assert written == sorted(f"{s}{e}" for s in ("in0", "grey", "rgba", "tiny", "faceless")
                             for e in (".json", "_landmarks.png"))
    assert json.loads((out / "faceless.json").read_text())["faces"] == []  # a result: rerun skips it
    assert "too small" in json.loads((out / "tiny.json").read_text())["note"]
    rgba_face = json.loads((out / "rgba.json").read_text())["faces"][0]
    assert metrics.nme(np.array(rgba_face["landmarks"]), r_gt)[0] < 0.01  # RGBA file: converted, dots intact


def test_detect_exit_codes(tmp_path, fake_fcn, fake_haar, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    faceless = tmp_path / "faceless.png"
    cv2.imwrite(str(faceless), np.full((100, 90, 3), 128, np.uint8))
    rc = cli.main(["detect", str(bad), str(faceless), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.png: not an image file (unrecognised header 'nope';" in err
    # an image without a face is a result, not a failure
    assert cli.main(["detect", str(faceless), "--out", str(tmp_path / "o2")]) == 0
    # usage errors: nothing to do, or bad options
    assert cli.main(["detect", "--out", str(tmp_path / "o3")]) == 2
    assert cli.main(["detect", str(tmp_path / "empty_dir_missing"), "--out", str(tmp_path / "o4")]) == 1
    (tmp_path / "empty").mkdir()
    assert cli.main(["detect", str(tmp_path / "empty"), "--out", str(tmp_path / "o5")]) == 2
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--threshold", "nan"), ("--threshold", "inf"),
                                           ("--threshold", "1.5"), ("--batch-size", "0"),
                                           ("--device", "gpu"), ("--device", "cuda:x"),
                                           ("--engine", "tensorrt"), ("--max-megapixels", "nan")])
def test_detect_bad_option_is_one_usage_error(tmp_path, fake_fcn, option, value, capsys):
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SystemExit) as ei:
        cli.main(["detect", str(img), "--out", str(tmp_path / "o"), option, value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert not (tmp_path / "o").exists()


def test_eval_threshold_nan_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["eval", str(tmp_path), "--threshold", "nan"])
    assert ei.value.code == 2 and "argument --threshold" in capsys.readouterr().err


def test_detect_without_weights_is_a_clear_message(tmp_path, capsys, no_shipped_network):
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    rc = cli.main(["detect", str(img), "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.startswith("ectfast detect: ")
    assert "no trained network is available" in err and "--weights" in err
    assert not (tmp_path / "o").exists()


def test_eval_cli(tmp_path, fake_fcn, capsys):
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


def test_eval_without_weights_is_a_clear_message(tmp_path, capsys, pdm, no_shipped_network):
    img, gt = synthetic_face(template_shape(pdm), np.random.default_rng(0))
    cv2.imwrite(str(tmp_path / "a.png"), img)
    write_pts(tmp_path / "a.pts", gt)
    rc = cli.main(["eval", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.startswith("ectfast eval: ")
    assert "no trained network is available" in err


@pytest.mark.data
def test_detect_real_photo_with_real_haar(data_dir, tmp_path, monkeypatch, capsys):
    folder = data_dir / "faces"
    gt = read_pts(folder / "lenna.pts")
    img = cv2.imread(str(folder / "lenna.png"))
    draw_dots(img, gt, radius=max(3.0, 0.02 * np.ptp(gt[:, 0])))
    p = tmp_path / "lenna.png"
    cv2.imwrite(str(p), img)
    est = FiducialEstimator(gt)
    monkeypatch.setattr(engine_mod, "make_estimator", lambda *a, **k: est)
    rc = cli.main(["detect", str(p), "--out", str(tmp_path / "o"), "--json", "--method", "crm"])
    assert rc == 0
    faces = json.loads((tmp_path / "o" / "lenna.json").read_text())["faces"]
    best = min(faces, key=lambda f: np.linalg.norm(np.mean(f["landmarks"], 0) - gt.mean(0)))
    assert metrics.nme(np.array(best["landmarks"]), gt)[0] < 0.02  # measured 0.0105 (see test_detector)


@pytest.mark.parametrize("args, option", [
    (["--batch", "100000000"], "--batch"), (["--size", "100000"], "--size"), (["--size", "8"], "--size"),
    (["--repeat", "0"], "--repeat"), (["--reference-batch", "1000"], "--reference-batch"),
    (["--outliers", "nan"], "--outliers"), (["--outliers", "1.5"], "--outliers"), (["--batch", "x"], "--batch"),
])
def test_bench_sizes_are_bounded(args, option, capsys):
    """Issue 11: `ectfast bench` refused nothing, so a huge --batch/--size allocated unbounded maps;
    every sized option is now a usage error (exit 2) naming the option, before anything runs."""
    from ectfast.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
