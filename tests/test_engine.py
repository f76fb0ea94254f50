"""ectfast.nets.engine: ONNX Runtime and PyTorch estimators, the ONNX export with its metadata, the
engine choice and its error messages (issue 10: torch-free inference; issue 11: --device)."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from ectfast import cli
from ectfast.nets import engine as E

torch = pytest.importorskip("torch", reason="the export and the comparison need PyTorch")
pytest.importorskip("onnx", reason="the export needs the onnx package")
pytest.importorskip("onnxruntime")

FIT = {"a": 0.3, "b": 12.0}


@pytest.fixture(scope="module")
def net_files(tmp_path_factory):
    """A random lite network saved as a weights file (with fit options in its metadata) and
    exported by `ectfast export-onnx` beside it."""
    from ectfast.nets import model

    d = tmp_path_factory.mktemp("net")
    torch.manual_seed(3)
    net = model.build("lite").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding them is checked
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    pt = d / "lite.pt"
    sha = model.save_weights(net, pt, meta={"fit": FIT, "train_state": {"big": list(range(10))}})
    onnx_path = d / "lite.onnx"
    rc = cli.main(["export-onnx", "--weights", str(pt), "--out", str(onnx_path)])
    assert rc == 0
    return pt, onnx_path, sha


def _crops(n=3, seed=0):
    return np.random.default_rng(seed).random((n, 3, 256, 256), dtype=np.float32)


def test_onnx_file_carries_the_metadata(net_files, capsys):
    pt, onnx_path, sha = net_files
    est = E.OnnxEstimator(onnx_path)
    assert est.engine == "onnxruntime" and est.arch == "lite" and est.input_size == 128
    assert est.fit_options == FIT
    assert est.sha256 == sha
    meta = E.read_onnx_metadata(onnx_path)
    assert meta["format"] == E.ONNX_FORMAT and meta["map_size"] == 32 and meta["crop_size"] == 256
    assert meta["n_landmarks"] == 68 and meta["weights_file"] == "lite.pt"
    assert "train_state" not in meta["meta"]  # the training position stays out of the ONNX file
    assert os.path.getsize(onnx_path) < 4 * 2**20  # float32, 0.68 M parameters


def test_test_time_flip_averages_the_mirrored_maps(net_files):
    from ectfast.nets.data import FLIP_68

    # the 68-point mirror (iBUG order): jaw ends, outer eye corners, mouth corners swap; the
    # chin, nose tip and the lips' centre points stay
    assert (FLIP_68[0], FLIP_68[16], FLIP_68[36], FLIP_68[45], FLIP_68[48], FLIP_68[54]) == (16, 0, 45, 36, 54, 48)
    assert (FLIP_68[8], FLIP_68[30], FLIP_68[51], FLIP_68[57], FLIP_68[62], FLIP_68[66]) == (8, 30, 51, 57, 62, 66)
    pt, onnx_path, _ = net_files
    x = _crops(3, seed=5)
    for make in (lambda f: E.OnnxEstimator(onnx_path, flip=f), lambda f: E.TorchEstimator(pt, device="cpu", flip=f)):
        plain, flipped = make(False), make(True)
        assert plain.flip is False and flipped.flip is True
        m = np.asarray(plain(x))
        mm = np.asarray(plain(np.ascontiguousarray(x[..., ::-1])))
        want = 0.5 * (m + mm[:, FLIP_68][..., ::-1])  # the mirrored face's maps, mirrored back
        np.testing.assert_allclose(np.asarray(flipped(x)), want, rtol=1e-5, atol=1e-5)  # batch 6 vs 3: rounding
    assert E.make_estimator(onnx_path, flip=False).flip is False and E.make_estimator(onnx_path).flip is E.DEFAULT_FLIP
    with pytest.raises(ValueError, match="maps: test-time flip"):
        E.flip_average(np.zeros((1, 68, 8, 8)), np.zeros((1, 68, 8, 4)))


def test_landmark_offset_comes_from_the_weights_metadata(net_files, tmp_path):
    """The (dx, dy) image-pixel landmark offset is read from the weights' metadata by both engines
    (the ONNX file carries it), (0, 0) where none is stored; a bad one is refused by name."""
    from ectfast.nets import model

    pt, onnx_path, _ = net_files
    assert E.OnnxEstimator(onnx_path).landmark_offset.tolist() == [0.0, 0.0]
    assert E.TorchEstimator(pt, device="cpu").landmark_offset.tolist() == [0.0, 0.0]
    blob = model.read_weights(pt)
    off_pt = tmp_path / "off.pt"
    model.save_weights(blob["state_dict"], off_pt, meta={**blob["meta"], "arch": blob["arch"],
                                                         "landmark_offset": [0.97, 0.02]})
    assert cli.main(["export-onnx", "--weights", str(off_pt), "--out", str(tmp_path / "off.onnx")]) == 0
    for est in (E.TorchEstimator(off_pt, device="cpu"), E.OnnxEstimator(tmp_path / "off.onnx")):
        assert est.landmark_offset.tolist() == [0.97, 0.02]
    # test-time flip averages out a label offset the network learned (--label-offset-x): a warning
    lo_pt = tmp_path / "lo.pt"
    model.save_weights(blob["state_dict"], lo_pt, meta={**blob["meta"], "arch": blob["arch"], "label_offset_x": 1.0})
    assert cli.main(["export-onnx", "--weights", str(lo_pt), "--out", str(tmp_path / "lo.onnx")]) == 0
    for make in (lambda f: E.TorchEstimator(lo_pt, device="cpu", flip=f), lambda f: E.OnnxEstimator(tmp_path / "lo.onnx", flip=f)):
        with pytest.warns(UserWarning, match="test-time flip averages out this network's learned label offset"):
            assert make(True).flip is True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert make(False).flip is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E.TorchEstimator(off_pt, device="cpu", flip=True).flip is True  # no label offset: no warning
    for bad in ([1.0], [1.0, float("inf")], "ab", [20.0, 0.0], {"x": 1}):
        with pytest.raises(ValueError, match="w.pt: landmark_offset"):
            E.landmark_offset({"landmark_offset": bad}, "w.pt")


def test_onnx_matches_torch_on_256_crops(net_files):
    pt, onnx_path, _ = net_files
    o = E.OnnxEstimator(onnx_path)
    t = E.TorchEstimator(pt, device="cpu")
    assert t.fit_options == FIT and t.input_size == 128 and t.sha256 == o.sha256
    x = _crops(4)
    a, b = o(x), t(x).numpy()
    assert a.shape == b.shape == (4, 68, 32, 32)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_crops_pooled_before_the_network_equal_pooling_after():
    from ectfast.app import crops as C

    crops = [(np.random.default_rng(k).random((256, 256, 3)) * 255).astype(np.uint8) for k in range(3)]
    full = C.crops_to_input(crops)
    assert full.shape == (3, 3, 256, 256)
    np.testing.assert_allclose(full[:, 0], np.stack(crops)[..., 2] / 255.0, atol=1e-6)  # RGB order
    np.testing.assert_allclose(C.crops_to_input(crops, 128), E.pool_to(full, 128), atol=1e-6)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(full), 4).numpy()
    np.testing.assert_allclose(C.crops_to_input(crops, 64), ref, atol=1e-6)


def test_pool_to_is_avg_pool(net_files):
    x = _crops(2, seed=5)
    ref = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 2).numpy()
    np.testing.assert_allclose(E.pool_to(x, 128), ref, atol=1e-6)
    with pytest.raises(ValueError, match="crops"):
        E.pool_to(x[..., :200, :200], 128)


def test_engine_choice(net_files, tmp_path):
    pt, onnx_path, _ = net_files
    assert E.choose_engine(onnx_path) == "onnxruntime"
    assert isinstance(E.make_estimator(onnx_path, "cpu"), E.OnnxEstimator)
    # a .pt with its exported twin beside it: auto runs the ONNX file (faster on CPU)
    assert E.CPU_PREFERENCE[0] == "onnxruntime"
    est = E.make_estimator(pt, "cpu")
    assert isinstance(est, E.OnnxEstimator) and est.path == str(onnx_path)
    assert isinstance(E.make_estimator(pt, "cpu", engine="torch"), E.TorchEstimator)
    # a .pt alone: torch under auto; onnxruntime converts it in memory
    lone = tmp_path / "alone.pt"
    lone.write_bytes(pt.read_bytes())
    assert E.choose_engine(lone, "cpu") == "torch"
    conv = E.make_estimator(lone, "cpu", engine="onnxruntime")
    assert isinstance(conv, E.OnnxEstimator) and "converted" in conv.path
    np.testing.assert_allclose(conv(_crops(1)), E.OnnxEstimator(onnx_path)(_crops(1)), atol=1e-5)


def test_stale_onnx_beside_weights_is_refused(net_files, tmp_path):
    from ectfast.nets import model

    pt, onnx_path, _ = net_files
    other = tmp_path / "lite.pt"
    torch.manual_seed(9)
    model.save_weights(model.build("lite"), other, meta={})
    (tmp_path / "lite.onnx").write_bytes(onnx_path.read_bytes())  # exported from other weights
    with pytest.raises(ValueError, match="weights: .* was exported from other weights"):
        E.make_estimator(other, "cpu")


@pytest.mark.parametrize("engine, weights, exc, words", [
    ("magic", None, ValueError, "engine: expected one of"),
    ("torch", "onnx", ValueError, "engine: 'torch' cannot run the ONNX file"),
])
def test_bad_engine_arguments(net_files, engine, weights, exc, words):
    w = net_files[1] if weights == "onnx" else None
    with pytest.raises(exc, match=words):
        E.make_estimator(w, "cpu", engine=engine)


def test_missing_engines_are_clear(net_files, monkeypatch):
    pt, onnx_path, _ = net_files
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match=r"torch engine needs PyTorch: pip install 'ectfast\[torch\]'"):
        E.make_estimator(pt, "cpu", engine="torch")
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="onnxruntime engine needs ONNX Runtime"):
        E.make_estimator(onnx_path, "cpu")


def test_bad_onnx_files(tmp_path, net_files):
    with pytest.raises(FileNotFoundError, match="weights: no such file"):
        E.make_estimator(tmp_path / "missing.onnx", "cpu")
    txt = tmp_path / "text.onnx"
    txt.write_text("not a model")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        E.OnnxEstimator(txt)
    import onnx

    proto = onnx.load(str(net_files[1]))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="no 'ectfast' metadata"):
        E.OnnxEstimator(bare)
    onnx.helper.set_model_props(proto, {"ectfast": json.dumps({"format": "other"})})
    onnx.save(proto, str(bare))
    with pytest.raises(ValueError, match="metadata format 'other'"):
        E.OnnxEstimator(bare)


def test_bad_device_spelling():
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "", None):
        with pytest.raises(ValueError, match="device"):
            E.check_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:5"], ids=["device-plain", "device-index-5"])
def test_cuda_without_cuda_is_one_clear_error(net_files, device, tmp_path, capsys):
    import cv2

    pt, onnx_path, _ = net_files
    with pytest.raises(ValueError, match=f"device: '{device}' was requested but"):
        E.make_estimator(pt, device, engine="torch")
    with pytest.raises(ValueError, match=f"device: '{device}' was requested but onnxruntime has no CUDA"):
        E.make_estimator(onnx_path, device, engine="onnxruntime")
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((64, 64, 3), np.uint8))
    for engine in ("auto", "torch", "onnxruntime"):
        rc = cli.main(["detect", str(img), "--weights", str(pt), "--device", device, "--engine", engine,
                       "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert rc == 2, engine
        assert err.startswith(f"ectfast detect: device: '{device}' was requested but") and err.count("\n") == 1
        assert "Traceback" not in err
    from ectfast.io.pts import write_pts

    data = tmp_path / "data"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), np.zeros((64, 64, 3), np.uint8))
    write_pts(data / "a.pts", np.random.default_rng(1).random((68, 2)) * 40 + 10)
    rc = cli.main(["eval", str(data), "--weights", str(pt), "--device", device, "--no-progress",
                   "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and "device:" in err and "Traceback" not in err


def test_detect_without_torch(net_files, tmp_path):
    """A plain install (no torch) detects landmarks with ONNX Runtime: torch is made unimportable
    in a fresh interpreter, which then runs the whole Detector on an image."""
    import cv2

    _, onnx_path, _ = net_files
    img = tmp_path / "face.png"
    cv2.imwrite(str(img), (np.random.default_rng(0).random((300, 280, 3)) * 255).astype(np.uint8))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # import torch now raises ImportError
        import numpy as np
        import ectfast
        from ectfast import cli
        from ectfast.nets import engine
        assert engine.available_engines() == ["onnxruntime"], engine.available_engines()
        det = ectfast.Detector(weights={str(onnx_path)!r}, face_detector=lambda im: np.array([[40, 40, 240, 240.]]))
        faces = det.detect({str(img)!r})
        assert det.engine == "onnxruntime" and len(faces) == 1
        assert np.isfinite(faces[0].landmarks).all() and faces[0].landmarks.shape == (68, 2)
        try:
            engine.make_estimator({str(onnx_path)!r}, "cpu", engine="torch")
        except ValueError as e:
            assert "engine" in str(e)
        try:
            engine.make_estimator(None, "cpu", engine="torch")
        except ImportError as e:
            assert "ectfast[torch]" in str(e)
        else:
            raise AssertionError("no ImportError")
        import contextlib, io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(["export-onnx", "--out", "x.onnx"])
        assert rc == 2 and "needs torch, which is not installed: pip install 'ectfast[torch]'" in err.getvalue(), err.getvalue()
        print("OK", [m for m in sys.modules if m == "torch" or m.startswith("torch.")])
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK ['torch']" in r.stdout  # only the blocking None entry


# ------------------------------------------------------------------ int8 (static quantisation)


@pytest.fixture(scope="module")
def int8_files(net_files, tmp_path_factory):
    """The random lite network's weights, its float ONNX file and the int8 file quantised from
    it (calibrated on 8 random crops), side by side as NAME.pt, NAME.onnx, NAME_int8.onnx."""
    from ectfast.nets import export as X

    pt, onnx_path, sha = net_files
    d = tmp_path_factory.mktemp("int8")
    (d / "lite.pt").write_bytes(pt.read_bytes())
    (d / "lite.onnx").write_bytes(onnx_path.read_bytes())
    calib = E.pool_to(_crops(8, seed=4), 128)
    q = X.quantize_int8(d / "lite.onnx", E.int8_sibling(d / "lite.onnx"), calib, calibration="8 random crops")
    return d / "lite.pt", d / "lite.onnx", d / "lite_int8.onnx", sha, q


def test_int8_file_holds_int8_weights_and_the_metadata(int8_files):
    import onnx

    from ectfast.nets import export as X

    pt, f32, i8, sha, q = int8_files
    assert q["path"] == str(i8) and q["bytes"] == os.path.getsize(i8)
    meta = E.read_onnx_metadata(i8)
    assert meta["precision"] == "int8" and meta["calibration"] == "8 random crops"
    assert meta["sha256"] == sha and meta["meta"]["fit"] == FIT and meta["input_size"] == 128
    proto = onnx.load(str(i8))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    n_conv = sum(n.op_type == "Conv" for n in proto.graph.node)
    # every convolution's weights stored as int8, except the first one and the two map outputs
    kept = X.float_convolutions(onnx.load(str(f32)))
    assert kept[0].endswith("enc64.0.0/Conv") and {k.split("/")[2] for k in kept[1:]} == {"primary_out", "fusion_out"}
    assert len(int8_weights) == n_conv - len(kept) == n_conv - 3
    assert os.path.getsize(i8) < 0.4 * os.path.getsize(f32)  # 1 byte per weight instead of 4


def test_int8_estimator_runs_close_to_the_float_one(int8_files):
    pt, f32, i8, sha, q = int8_files
    est = E.make_estimator(pt, "cpu", precision="int8")  # NAME_int8.onnx beside NAME.pt
    assert isinstance(est, E.OnnxEstimator) and est.path == str(i8) and est.precision == "int8"
    assert est.fit_options == FIT and est.sha256 == sha
    assert E.make_estimator(pt, "cpu").precision == "fp32"
    x = _crops(4, seed=8)
    ref, got = E.OnnxEstimator(f32)(x), est(x)
    assert got.shape == ref.shape == (4, 68, 32, 32) and got.dtype == np.float32
    # quantised (not the float graph), and close to it: relative RMS error and correlation
    # (measured 0.18 and 0.984 on this untrained net; a wrong scale or layout gives ~1 and ~0)
    rel = np.sqrt(np.mean((got - ref) ** 2) / np.mean((ref - ref.mean()) ** 2))
    corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
    assert 0 < rel < 0.3 and corr > 0.95, (rel, corr)
    c = q["check"]  # the comparison quantize_int8 made on its calibration crops
    assert 0 <= c["peak_shift_mean"] <= c["peak_shift_max"] and 0 < c["within_half_px"] <= 1


def test_precision_errors_name_the_argument(int8_files, tmp_path):
    pt, f32, i8, sha, q = int8_files
    with pytest.raises(ValueError, match=r"precision: expected one of \('fp32', 'int8'\), got 'int4'"):
        E.make_estimator(pt, "cpu", precision="int4")
    with pytest.raises(ValueError, match="precision: 'int8' runs on the onnxruntime engine"):
        E.make_estimator(pt, "cpu", engine="torch", precision="int8")
    with pytest.raises(ValueError, match=r"precision: 'int8' was requested but .*lite.onnx is a fp32 model"):
        E.make_estimator(f32, "cpu", precision="int8")
    with pytest.raises(ValueError, match=r"precision: 'fp32' was requested but .*lite_int8.onnx is a int8 model"):
        E.make_estimator(i8, "cpu", precision="fp32")
    lone = tmp_path / "alone.pt"
    lone.write_bytes(pt.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"weights: precision 'int8' needs an int8 ONNX file \(no alone_int8.onnx"):
        E.make_estimator(lone, "cpu", precision="int8")
    with pytest.raises(ValueError, match="precision: expected one of"):
        from ectfast.app.detector import Detector

        Detector(device="cpu", weights=pt, face_detector=None, precision="fp16")


def test_export_int8_needs_calibration_data(net_files, tmp_path, capsys):
    pt, _, _ = net_files
    rc = cli.main(["export-onnx", "--weights", str(pt), "--out", str(tmp_path / "x.onnx"), "--int8"])
    assert rc == 2 and not (tmp_path / "x_int8.onnx").exists()
    assert "--int8 needs --calibration-data DIR" in capsys.readouterr().err
