"""ectfast.faces: BlazeFace anchors/decoding/NMS, crop calibration, input checks (synthetic), and
the detectors on the real photographs and LFPW test faces (``data``)."""
import math
import os

import numpy as np
import pytest

from ectfast import faces as F
from ectfast.nets.data import box_from_landmarks


# ------------------------------------------------------------------ anchors and decoding


def test_anchor_counts_match_the_models():
    short = F.blazeface_anchors("short")
    full = F.blazeface_anchors("full")
    assert short.shape == (896, 2)   # 16*16*2 + 8*8*6
    assert full.shape == (2304, 2)   # 48*48*1
    # stride 8, 2 anchors per cell, cells row by row, at the cell centres
    np.testing.assert_allclose(short[:4], [[4, 4], [4, 4], [12, 4], [12, 4]])
    np.testing.assert_allclose(short[32], [4, 12])
    # stride 16, 6 anchors per cell
    np.testing.assert_allclose(short[512:518], [[8, 8]] * 6)
    np.testing.assert_allclose(short[-1], [120, 120])
    np.testing.assert_allclose(full[0], [2, 2])
    np.testing.assert_allclose(full[1], [6, 2])
    np.testing.assert_allclose(full[-1], [190, 190])
    with pytest.raises(ValueError, match="variant"):
        F.blazeface_anchors("medium")


def _raw_with_one_face(anchors, j, reg, logit=3.0):
    raw = np.zeros((len(anchors), 16), np.float32)
    raw[j] = reg
    logits = np.full((len(anchors), 1), -10.0, np.float32)
    logits[j] = logit
    return raw, logits


def test_decoding_a_hand_made_output():
    anchors = F.blazeface_anchors("short")
    j = 512 + 6 * (8 * 3 + 2) + 4          # stride-16 cell (x 2, y 3): centre (40, 56)
    reg = [5, -3, 40, 50] + [float(v) for v in range(12)]
    raw, logits = _raw_with_one_face(anchors, j, reg)
    boxes, scores, kps = F.decode_blazeface(raw, logits, anchors, 0.5)
    assert boxes.shape == (1, 4) and kps.shape == (1, 6, 2)
    np.testing.assert_allclose(boxes[0], [45 - 20, 53 - 25, 45 + 20, 53 + 25])
    np.testing.assert_allclose(scores[0], 1 / (1 + math.exp(-3.0)))
    np.testing.assert_allclose(kps[0], np.arange(12).reshape(6, 2) + [40, 56])
    # threshold: a logit of 3 (0.953) is dropped at 0.96
    assert len(F.decode_blazeface(raw, logits, anchors, 0.96)[0]) == 0
    # huge logits are clipped, no overflow
    logits[:] = -1e6
    logits[j] = 1e6
    with np.errstate(over="raise"):
        _, s, _ = F.decode_blazeface(raw, logits, anchors, 0.5)
    assert s.tolist() == [1.0]


def test_nms_merges_overlapping_and_keeps_distant_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.6, 0.7])
    kps = np.array([[[2, 2]], [[3, 2]], [[55, 55]]], float)
    b, s, k = F.weighted_nms(boxes, scores, kps, iou_threshold=0.3)
    assert len(b) == 2
    np.testing.assert_allclose(s, [0.9, 0.7])                       # best first, best score kept
    np.testing.assert_allclose(b[0], [0.4, 0, 10.4, 10])            # (0.9 * 0 + 0.6 * 1) / 1.5
    np.testing.assert_allclose(k[0], [[2.4, 2]])
    np.testing.assert_allclose(b[1], [50, 50, 60, 60])
    # boxes far apart are all kept
    b, s, k = F.weighted_nms(boxes[[0, 2]], scores[[0, 2]], None)
    assert len(b) == 2 and k is None
    # empty input
    b, s, k = F.weighted_nms(np.zeros((0, 4)), np.zeros(0), np.zeros((0, 6, 2)))
    assert b.shape == (0, 4) and s.shape == (0,) and k.shape == (0, 6, 2)


def test_box_iou():
    iou = F.box_iou(np.array([[0, 0, 10, 10]]), np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]]))
    np.testing.assert_allclose(iou, [[50 / 150, 0, 1]])


# ------------------------------------------------------------------ detector with a fake network


@pytest.fixture(scope="module")
def short():
    return F.BlazeFaceDetector("short", tiles=False)


def test_models_and_licence_ship_in_the_package():
    for name in ("face_detection_short_range.tflite", "face_detection_full_range.tflite", "BLAZEFACE_LICENSE.txt"):
        assert os.path.isfile(os.path.join(F.ASSETS, name)), name
    text = open(os.path.join(F.ASSETS, "BLAZEFACE_LICENSE.txt"), encoding="utf-8").read()
    assert "Apache License" in text and "MediaPipe" in text


def test_letterbox_maps_boxes_back_to_image_pixels(short, monkeypatch):
    # a 200 x 400 image: letterboxed by 128/400 into the top 128 x 64 of the input
    anchors = short.anchors
    j = 2 * (16 * 2 + 4)                    # stride-8 cell (x 4, y 2): centre (36, 20)
    raw, logits = _raw_with_one_face(anchors, j, [0, 0, 16, 8] + [0] * 12)
    monkeypatch.setattr(short, "_raw", lambda square: (raw.reshape(-1, 16), logits.reshape(-1)))
    faces = short.detect(np.zeros((200, 400, 3), np.uint8))
    assert len(faces) == 1
    f = faces[0]
    k = 400 / 128
    np.testing.assert_allclose(f.box, [28 * k, 16 * k, 44 * k, 24 * k], rtol=1e-6)
    assert f.keypoints.shape == (6, 2) and f.detector == "blazeface-short"
    np.testing.assert_allclose(f.keypoints[0], [36 * k, 20 * k], rtol=1e-6)


def test_blank_image_has_no_face(short):
    assert short.detect(np.full((300, 200, 3), 128, np.uint8)) == []
    assert short.detect(np.zeros((50, 60), np.uint8)) == []        # grey accepted


def test_tiles_cover_large_images_and_drop_cut_faces(monkeypatch):
    full = F.BlazeFaceDetector("full", tiles=True)
    assert full.tile_windows(400, 300) == []                       # small: whole image only
    wins = full.tile_windows(1000, 2000)
    side = wins[0][2]
    assert side == 500
    xs = sorted({x for x, _, _ in wins})
    ys = sorted({y for _, y, _ in wins})
    assert xs[0] == 0 and xs[-1] + side == 2000 and max(np.diff(xs)) <= side / 2
    assert ys[0] == 0 and ys[-1] + side == 1000 and max(np.diff(ys)) <= side / 2
    # a face reaching a tile edge inside the image is dropped, one inside the tile kept
    anchors = full.anchors
    j = 48 * 24 + 47                               # anchor at the right edge column (190, 98)
    raw, logits = _raw_with_one_face(anchors, j, [0, 0, 20, 20] + [0] * 12)
    monkeypatch.setattr(full, "_raw", lambda square: (raw.reshape(-1, 16), logits.reshape(-1)))
    img = np.zeros((1000, 2000, 3), np.uint8)
    assert len(full._detect_window(img, 0, 0, 500, drop_cut=True)[0]) == 0
    assert len(full._detect_window(img, 1500, 0, 500, drop_cut=True)[0]) == 1   # image edge: kept


# ------------------------------------------------------------------ crop box and angle


def test_crop_box_applies_the_calibration(monkeypatch):
    monkeypatch.setitem(F.CROP_CALIBRATION, "haar", (0.1, 0.2, 1.5))
    f = F.FaceBox((100.0, 50.0, 200.0, 150.0), 1.0, None, "haar")
    np.testing.assert_allclose(F.crop_box(f), [85, 45, 235, 195])  # centre (160, 120), side 150
    # a named detector overrides facebox.detector; "-notiles" shares its model's calibration
    monkeypatch.setitem(F.CROP_CALIBRATION, "blazeface-full", (0.0, 0.0, 1.0))
    np.testing.assert_allclose(F.crop_box(f, "blazeface-full-notiles"), f.box)
    with pytest.raises(ValueError, match="detector_name"):
        F.crop_box(f, "yolo")


def test_calibration_fit_recovers_known_constants():
    rng = np.random.default_rng(0)
    c = rng.uniform(100, 500, (50, 2))
    s = rng.uniform(40, 200, 50)
    det = np.concatenate([c - s[:, None] / 2, c + s[:, None] / 2], axis=1)
    dx, dy, k = 0.03, 0.12, 1.27
    tc = c + np.stack([dx * s, dy * s], axis=1)
    crop = np.concatenate([tc - k * s[:, None] / 2, tc + k * s[:, None] / 2], axis=1)
    np.testing.assert_allclose(F.fit_crop_calibration(det, crop), (dx, dy, k), atol=1e-12)
    # crop_box with the fitted constants reproduces the crop boxes
    for b, t in zip(det[:5], crop[:5]):
        F.CROP_CALIBRATION["_test"] = (dx, dy, k)
        try:
            np.testing.assert_allclose(F.crop_box(F.FaceBox(tuple(b), 1.0, None, "_test")), t)
        finally:
            del F.CROP_CALIBRATION["_test"]


def test_calibration_constants_are_plausible():
    for name, (dx, dy, k) in F.CROP_CALIBRATION.items():
        assert abs(dx) < 0.2 and abs(dy) < 0.3 and 0.9 < k < 2.0, name


def test_crop_angle_from_eye_keypoints():
    kp = np.zeros((6, 2))
    kp[0], kp[1] = (10, 10), (20, 20)          # left eye lower in the image: +45 degrees
    assert F.crop_angle(F.FaceBox((0, 0, 1, 1), 1.0, kp)) == pytest.approx(math.pi / 4)
    kp[1] = (30, 10)
    assert F.crop_angle(F.FaceBox((0, 0, 1, 1), 1.0, kp)) == pytest.approx(0.0)
    assert F.crop_angle(F.FaceBox((0, 0, 1, 1), 1.0, None)) == 0.0


# ------------------------------------------------------------------ bad input, choice of detector


@pytest.mark.parametrize("name", ["blazeface-short", "blazeface", "haar"])
@pytest.mark.parametrize("bad, exc", [
    (np.zeros((64, 64, 3), np.float32), TypeError),
    (np.zeros((64, 64, 3), np.uint16), TypeError),
    ([[0, 1], [2, 3]], TypeError),
    (np.zeros((64, 64, 4), np.uint8), ValueError),
    (np.zeros((2, 64, 64, 3), np.uint8), ValueError),
    (np.zeros((0, 0, 3), np.uint8), ValueError),
    (np.zeros((0, 10), np.uint8), ValueError),
])
def test_bad_image_names_the_argument(name, bad, exc):
    det = F.make_detector(name)
    with pytest.raises(exc, match="image"):
        det.detect(bad)


def test_detect_faces_sorts_by_score():
    class Fake:
        name = "fake"

        def detect(self, image):
            return [F.FaceBox((0, 0, 1, 1), 0.2), F.FaceBox((0, 0, 2, 2), 0.9), F.FaceBox((0, 0, 3, 3), 0.5)]

    assert [f.score for f in F.detect_faces(np.zeros((4, 4, 3), np.uint8), Fake())] == [0.9, 0.5, 0.2]


def test_default_detector_falls_back(monkeypatch):
    monkeypatch.setattr(F, "_DEFAULT", None)
    real = F.make_detector

    def broken(name):
        if name.startswith("blazeface"):
            raise FileNotFoundError("model missing")
        return real(name)

    monkeypatch.setattr(F, "make_detector", broken)
    assert F.default_detector().name == "haar"
    monkeypatch.setattr(F, "_DEFAULT", None)
    monkeypatch.setattr(F, "make_detector", lambda name: (_ for _ in ()).throw(ImportError(f"{name} gone")))
    with pytest.raises(RuntimeError, match="blazeface-short.*haar"):
        F.default_detector()
    monkeypatch.setattr(F, "_DEFAULT", None)
    monkeypatch.setattr(F, "make_detector", real)
    assert F.default_detector().name == F.DEFAULT_ORDER[0]


def test_unknown_detector_name():
    with pytest.raises(ValueError, match="unknown face detector"):
        F.make_detector("yolo")


# ------------------------------------------------------------------ real data

PHOTOS = ("einstein.jpg", "breakingbad.jpg", "lenna.png", "takeo.ppm")


def _read(data_dir, rel):
    import cv2

    from ectfast.io.pts import read_pts

    path = data_dir / rel
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return img, read_pts(str(path.with_suffix(".pts")))


@pytest.mark.data
@pytest.mark.parametrize("photo", PHOTOS)
def test_annotated_face_found_in_each_photograph(data_dir, photo):
    img, pts = _read(data_dir, f"faces/{photo}")
    faces = F.detect_faces(img)
    lb = np.asarray(box_from_landmarks(pts, 1.0))
    assert faces, f"{photo}: no face"
    iou = F.box_iou(np.array([f.box for f in faces]), lb)[:, 0]
    assert iou.max() > F.MATCH_IOU, f"{photo}: best IoU {iou.max():.2f}"
    # and the calibrated crop box overlaps the training crop box (measured: einstein 0.68,
    # breakingbad 0.92, lenna 0.92, takeo 0.93)
    best = faces[int(np.argmax(iou))]
    assert F.box_iou(np.array(F.crop_box(best)), np.array(box_from_landmarks(pts)))[0, 0] > 0.6


@pytest.mark.data
def test_both_people_found_in_breakingbad(data_dir):
    img, _ = _read(data_dir, "faces/breakingbad.jpg")
    big = [f for f in F.detect_faces(img) if f.width > 150]
    assert len(big) == 2


@pytest.mark.data
def test_recall_and_keypoint_order_on_lfpw_test(data_dir):
    from ectfast.io.datasets import find_faces
    from ectfast.io.pts import read_pts
    import cv2

    pairs = find_faces(str(data_dir / "300w" / "lfpw" / "testset"))
    assert len(pairs) == 224
    det = F.default_detector()
    found, kp_ok, crop_iou = 0, 0, []
    for p, q in pairs:
        img, pts = cv2.imread(p, cv2.IMREAD_COLOR), read_pts(q)
        faces = det.detect(img)
        if not faces:
            continue
        lb = np.asarray(box_from_landmarks(pts, 1.0))
        iou = F.box_iou(np.array([f.box for f in faces]), lb)[:, 0]
        j = int(np.argmax(iou))
        if iou[j] <= F.MATCH_IOU:
            continue
        found += 1
        crop_iou.append(F.box_iou(np.array(F.crop_box(faces[j])), np.array(box_from_landmarks(pts)))[0, 0])
        k = faces[j].keypoints
        right_eye, left_eye = pts[36:42].mean(0), pts[42:48].mean(0)
        kp_ok += (np.linalg.norm(k[0] - right_eye) < np.linalg.norm(k[0] - left_eye)
                  and np.linalg.norm(k[1] - left_eye) < np.linalg.norm(k[1] - right_eye)
                  and np.linalg.norm(k[2] - pts[30]) < np.linalg.norm(k[3] - pts[30]))
    # measured (bench/RESULTS.md, "face detectors (issue 10)"): 224/224 found
    assert found >= 222, f"recall {found}/224"
    assert kp_ok >= 0.95 * found, f"keypoint order right on {kp_ok}/{found}"
    # measured mean IoU of crop_box with the training crop box: 0.879
    assert np.mean(crop_iou) > 0.85, f"mean crop IoU {np.mean(crop_iou):.3f}"
