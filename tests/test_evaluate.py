"""ectfast.app.evaluate on a tiny synthetic 300-W-layout folder, with a fake FCN (no weights)."""
import csv
import os
import warnings

import cv2
import numpy as np
import pytest

from ectfast.app import evaluate as E
from ectfast.core import metrics
from ectfast.io.pts import write_pts

from _e2e_helpers import FiducialEstimator, synthetic_face, template_shape  # noqa: F401


def _write_folder(root, pdm, n_faces=6, seed=0, occluded=(), features=True):
    """afw-like nested layout: root/a/*.png + .pts, root/b/c/*.png + .pts; plus two bad faces."""
    rng = np.random.default_rng(seed)
    T = template_shape(pdm)
    gts = {}
    for k in range(n_faces):
        sub = root / ("a" if k % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        img, gt = synthetic_face(T, rng, features=features)
        path = sub / f"face{k}.png"
        assert cv2.imwrite(str(path), img)
        write_pts(sub / f"face{k}.pts", gt)
        if occluded:
            (sub / f"face{k}.occ").write_text(" ".join("1" if i in occluded else "0" for i in range(68)))
        gts[str(path)] = gt
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    write_pts(root / "a" / "broken.pts", gts[next(iter(gts))])
    img, gt = synthetic_face(T, rng)
    cv2.imwrite(str(root / "a" / "short.png"), img)
    write_pts(root / "a" / "short.pts", gt[:10])  # 10 points: mismatched .pts
    return T, gts


def test_evaluate_all_methods_with_outliers(tmp_path, pdm):
    T, gts = _write_folder(tmp_path / "data", pdm)
    est = FiducialEstimator(T, outlier_fraction=0.2, seed=1)
    with pytest.warns(E.DataWarning) as rec:
        res = E.evaluate(tmp_path / "data", methods="all", estimator=est, out=tmp_path / "out",
                         batch_size=4, progress=False)
    msgs = " ".join(str(w.message) for w in rec)
    assert "broken.png" in msgs and "cannot read" in msgs
    assert "short.pts" in msgs and "10 points" in msgs
    assert len(res.skipped) == 2
    # the estimator ran once per good face, whatever the number of methods
    assert est.faces == 6 and len(res.faces) == 6 and set(res.faces) == set(gts)
    assert res.gt == pytest.approx(np.array([gts[f] for f in res.faces]), abs=1e-3)  # .pts: 3 decimals
    nme = {m: res.summary[m]["nme_inter-ocular"] for m in E.METHODS}
    # 20 % wrong peaks: ECT must beat the unweighted variants by a wide margin
    assert nme["ect"] < 0.02, nme
    assert nme["ect"] < 0.5 * nme["crm-pdm"], nme
    assert nme["ect"] < nme["crm-clm"] and nme["ect"] < nme["crm"], nme
    # the table/CSV numbers agree with recomputing the metrics from the returned landmarks
    for m in E.METHODS:
        assert res.summary[m]["nme_inter-ocular"] == pytest.approx(
            metrics.nme(res.landmarks[m], res.gt, "inter-ocular").mean())
    files = res.files
    for key in ("table", "csv", "per_face", "plot"):
        assert os.path.getsize(files[key]) > 0
    table = open(files["table"]).read()
    for m in E.METHODS:
        assert f"| {E.DISPLAY[m]} |" in table
    with open(files["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [E.DISPLAY[m] for m in E.METHODS]
    ect_row = rows[-1]
    assert float(ect_row["nme_inter_ocular_pct"]) == pytest.approx(100 * nme["ect"], rel=1e-9)
    assert int(ect_row["faces"]) == 6
    with open(files["per_face"]) as f:
        assert len(list(csv.reader(f))) == 1 + 6 * 5
    plot = cv2.imread(files["plot"])
    assert plot is not None and plot.shape[0] > 200 and plot.shape[1] > 300
    assert plot.std() > 10  # not a blank canvas
    assert [lab.split(" ")[0] for lab in res.plot_labels] == [E.DISPLAY[m] for m in E.METHODS]


def test_evaluate_clean_maps_is_near_exact(tmp_path, pdm):
    T, gts = _write_folder(tmp_path / "data", pdm, n_faces=4, seed=3)
    est = FiducialEstimator(T, map_size=64)  # FusionNet-sized maps: fit upsamples x4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.DataWarning)
        res = E.evaluate(tmp_path / "data", methods=["crm", "ect"], estimator=est, out=None, progress=False)
    assert set(res.summary) == {"crm", "ect"}
    for m in ("crm", "ect"):
        s = res.summary[m]
        assert s["nme_inter-ocular"] < 0.01, (m, s["nme_inter-ocular"])
        assert s["fr@0.08"] == 0.0 and s["auc@0.08"] > 0.85
        assert s["mape_px"] < 1.0
    assert res.files == {}


def test_evaluate_occlusion_labels(tmp_path, pdm):
    occluded = set(range(17, 27))  # the eyebrows' maps are all zero, and labelled occluded
    T, _ = _write_folder(tmp_path / "data", pdm, n_faces=4, seed=5, occluded=occluded)
    est = FiducialEstimator(T, occluded=sorted(occluded))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.DataWarning)
        res = E.evaluate(tmp_path / "data", methods="ect", estimator=est, out=tmp_path / "out",
                         occlusion_labels=True, progress=False)
    v = res.summary["ect"]["visibility"]
    k = int(np.argmin(np.abs(v["thresholds"] - 0.5)))
    assert v["tp"][k] + v["fn"][k] == 4 * len(occluded)
    assert v["recall"][k] == 1.0 and v["precision"][k] == 1.0
    assert "occl. precision" in open(res.files["table"]).read()
    assert os.path.exists(res.files["visibility"])


def test_evaluate_detector_boxes_fall_back(tmp_path, pdm):
    T, _ = _write_folder(tmp_path / "data", pdm, n_faces=2, seed=7, features=False)
    est = FiducialEstimator(T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.DataWarning)
        res = E.evaluate(tmp_path / "data", methods="crm", boxes="detector", estimator=est, progress=False)
    # no face to detect (plain images with dots): both fall back to the landmark box and are counted
    assert res.detector_missed == 2
    assert res.summary["crm"]["nme_inter-ocular"] < 0.01  # measured 0.0034..0.0040
    assert "missed" in res.table


def test_evaluate_bad_arguments(tmp_path, pdm):
    est = FiducialEstimator(template_shape(pdm))
    with pytest.raises(ValueError, match="not a directory"):
        E.evaluate(tmp_path / "nope", estimator=est)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no NAME"):
        E.evaluate(tmp_path / "empty", estimator=est)
    with pytest.raises(ValueError, match="methods"):
        E.evaluate(tmp_path / "empty", methods=["ect", "fancy"], estimator=est)
    with pytest.raises(ValueError, match="boxes"):
        E.evaluate(tmp_path / "empty", boxes="oracle", estimator=est)
    # only bad faces: a clear error, not an empty table
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    (bad / "x.pts").write_text("version: 1\nn_points: 1\n{\n1 2\n}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.DataWarning)
        with pytest.raises(ValueError, match="could be evaluated"):
            E.evaluate(bad, estimator=est, progress=False)


def test_real_lfpw_subset_pipeline_consistency(data_dir, tmp_path):
    """Real 300-W faces (a handful): with maps at the ground truth mapped into each crop (the
    template is each face's own annotation, carried by dots drawn on a copy of the image), the
    pipeline's CRM error is only the argmax quantisation."""
    from ectfast.io.datasets import find_faces
    from ectfast.io.pts import read_pts

    from _e2e_helpers import draw_dots

    pairs = find_faces(data_dir / "300w" / "lfpw" / "testset")[:3]
    for image_path, pts_path in pairs:
        gt = read_pts(pts_path)
        img = cv2.imread(image_path)
        draw_dots(img, gt, radius=max(3.0, 0.02 * np.ptp(gt[:, 0])))
        d = tmp_path / os.path.basename(image_path)
        d.mkdir()
        cv2.imwrite(str(d / "f.png"), img)
        write_pts(d / "f.pts", gt)
        for boxes in ("landmarks", "detector"):
            res = E.evaluate(d, methods="crm", boxes=boxes, estimator=FiducialEstimator(gt), progress=False)
            assert res.detector_missed == 0
            assert res.summary["crm"]["nme_inter-ocular"] < 0.01  # measured 0.0034..0.0040
