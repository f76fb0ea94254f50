"""The FCN (model.py), its data pipeline (data.py), training (train.py) and ONNX export.

All on CPU with tiny synthetic inputs (the net is fully convolutional: 32x32 or 64x64 inputs),
except the ``data`` tests, which read real 300-W shapes where ../shared/data exists.
"""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ectfast.core import _reference  # noqa: E402
from ectfast.nets import data as D  # noqa: E402
from ectfast.nets.model import (FCN, UpsampleNet, has_pretrained, load_pretrained, read_weights,  # noqa: E402
                           save_weights, state_dict_sha256)
from ectfast.core.synthetic import peak_scale, place_in_map  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TORCH_THREADS = 2  # conftest's _torch_threads


def synthetic_crops(pdm, n=8, stored=48, context=D.CONTEXT, seed=0) -> D.CropSet:
    """Margin crops of random smooth images with PDM shapes placed where the 1.3 box fits."""
    from ectfast.core.synthetic import random_pdm_shapes

    rng = np.random.default_rng(seed)
    shapes = random_pdm_shapes(pdm, n, size=stored, extent=1.0 / (context * D.BOX_SCALE),
                               max_rotation_deg=5, seed=seed)
    yy, xx = np.mgrid[0:stored, 0:stored]
    imgs = np.empty((n, stored, stored, 3), np.uint8)
    for i in range(n):
        f = rng.uniform(0.05, 0.3, 3)
        for c in range(3):
            imgs[i, :, :, c] = (127 + 100 * np.sin(f[c] * xx + rng.uniform(0, 6)) * np.cos(f[c] * yy)).astype(np.uint8)
    return D.CropSet(imgs, shapes.astype(np.float32), np.ones((n, 68), bool),
                     np.array([f"face{i}" for i in range(n)]), stored, context)


# ------------------------------------------------------------------ the network


def test_output_shapes_and_input_checks():
    m = FCN().eval()
    with torch.no_grad():
        p, f, u = m(torch.rand(2, 3, 64, 64))
    assert p.shape == (2, 68, 16, 16) and f.shape == (2, 68, 16, 16) and u.shape == (2, 68, 64, 64)
    assert torch.isfinite(u).all()
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="multiples of 4"):
        m(torch.rand(1, 3, 62, 64))
    # upsampling is fixed, not trained
    assert not any(n.startswith("upsample.") for n, _ in m.named_parameters())


def test_upsampling_equals_reference(rng):
    maps = rng.normal(size=(2, 68, 9, 7)).astype(np.float32)
    with torch.no_grad():
        got = UpsampleNet()(torch.from_numpy(maps)).numpy()
    want = _reference.upsample(maps, 4)
    assert got.shape == (2, 68, 36, 28)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_fusion_output_is_what_is_upsampled():
    m = FCN().eval()
    with torch.no_grad():
        _, f, u = m(torch.rand(1, 3, 32, 32))
    np.testing.assert_allclose(u.numpy(), _reference.upsample(f.numpy(), 4), atol=1e-5)


def test_import_ectfast_does_not_import_torch():
    code = "import sys, ectfast; ectfast.default_pdm(); assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "python")},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ crops, flips, targets


def test_flip_permutation_is_a_mirror_involution():
    f = D.FLIP_68
    assert sorted(f) == list(range(68))
    np.testing.assert_array_equal(f[f], np.arange(68))
    assert (f[36], f[45], f[0], f[16], f[48], f[54], f[39], f[42]) == (45, 36, 16, 0, 54, 48, 42, 39)
    # the midline points map to themselves
    for i in (8, 27, 28, 29, 30, 33, 51, 57, 62, 66):
        assert f[i] == i


@pytest.mark.data
def test_flip_mirrors_real_shapes(data_dir):
    from ectfast.io.datasets import find_faces
    from ectfast.io.pts import read_pts

    shapes = np.stack([read_pts(p) for _, p in find_faces(data_dir / "300w" / "lfpw" / "testset")])
    W = 1000.0
    flipped = shapes.copy()
    flipped[..., 0] = W - 1 - flipped[..., 0]
    good = flipped[:, D.FLIP_68]
    # (left point, right point) on the image: subject's right eye/brow/jaw/mouth corner is on the left
    pairs = [(36, 45), (39, 42), (0, 16), (17, 26), (48, 54), (31, 35)]
    for a, b in pairs:
        assert (shapes[:, a, 0] < shapes[:, b, 0]).mean() > 0.97
        assert (good[:, a, 0] < good[:, b, 0]).mean() > 0.97       # the permutation keeps the layout
        assert (flipped[:, a, 0] < flipped[:, b, 0]).mean() < 0.03  # without it the layout breaks
    # the mirrored shape is a mirror image: same eye distance, the nose tip on the mirrored x
    np.testing.assert_allclose(np.linalg.norm(good[:, 36] - good[:, 45], axis=1),
                               np.linalg.norm(shapes[:, 36] - shapes[:, 45], axis=1))
    np.testing.assert_allclose(good[:, 30, 0], W - 1 - shapes[:, 30, 0])


def test_crop_transform_round_trips_landmarks(rng):
    pts = rng.uniform(100, 400, (68, 2))
    box = D.box_from_landmarks(pts)
    side = box[2] - box[0]
    assert side == pytest.approx(1.3 * np.ptp(pts, 0).max())
    A = D.crop_transform(box, 256)
    crop_pts = D.transform_points(A, pts)
    np.testing.assert_allclose(D.transform_points(cv2.invertAffineTransform(A), crop_pts), pts, atol=1e-9)
    # the landmarks' bounding box is centred and spans 256 / 1.3
    lo, hi = crop_pts.min(0), crop_pts.max(0)
    np.testing.assert_allclose((lo + hi) / 2, [127.5, 127.5], atol=1e-9)
    assert np.ptp(crop_pts, 0).max() == pytest.approx(256 / 1.3)
    # a bright pixel in the image lands where the transform says
    img = np.zeros((500, 500), np.float32)
    img[300, 200] = 1.0
    crop, A2 = D.crop_face(img, box, 256)
    np.testing.assert_array_equal(A2, A)
    x, y = D.transform_points(A, [200.0, 300.0])
    yy, xx = np.unravel_index(np.argmax(crop), crop.shape)
    assert abs(xx - x) <= 1 and abs(yy - y) <= 1
    with pytest.raises(ValueError, match="box"):
        D.crop_transform((0, 0, 0, 0))
    with pytest.raises(ValueError, match="landmarks"):
        D.box_from_landmarks(np.zeros((68, 3)))


def test_targets_peak_and_invisible_points():
    lm = np.array([[[100.0, 60.0], [37.5, 201.5], [5.0, 5.0]]])
    vis = np.array([[True, True, False]])
    hi, lo = D.make_targets(lm, vis, 256)
    peak = 16 / (6 * np.sqrt(2 * np.pi))
    assert peak == pytest.approx(1.0638, abs=1e-4) and peak == pytest.approx(peak_scale(6.0))
    assert hi.shape == (1, 3, 256, 256) and lo.shape == (1, 3, 64, 64)
    assert hi[0, 0].max() == pytest.approx(peak, rel=1e-6) and hi[0, 0, 60, 100] == hi[0, 0].max()
    # 64 grid: 256-coordinate 37.5 -> (37.5 - 1.5) / 4 = 9, 201.5 -> 50; same peak height
    assert lo[0, 1, 50, 9] == pytest.approx(peak, rel=1e-6) and lo[0, 1].max() == lo[0, 1, 50, 9]
    assert not hi[0, 2].any() and not lo[0, 2].any()
    # the torch version agrees
    th = D.target_maps_torch(torch.tensor(lm), torch.tensor(vis), 256, 256)
    tl = D.target_maps_torch(torch.tensor(lm), torch.tensor(vis), 64, 256)
    np.testing.assert_allclose(th.numpy(), hi, atol=1e-6)
    np.testing.assert_allclose(tl.numpy(), lo, atol=1e-6)
    # the 64 target upsampled x4 is close to the 256 target (the losses agree)
    # (bilinear interpolation of a 4-px-sampled Gaussian: within 12 % of the peak, argmax within
    # 2 px: the 64 grid's nodes sit at 4 i + 1.5)
    up = _reference.upsample(lo[:, :1], 4)[0, 0]
    assert np.abs(up - hi[0, 0]).max() < 0.12 * peak
    yy, xx = np.unravel_index(np.argmax(up), up.shape)
    assert abs(xx - 100) <= 2 and abs(yy - 60) <= 2


def _warp_cv2(image, A, size):
    """The oracle of the torch warp: OpenCV, bilinear, zero border."""
    return cv2.warpAffine(image, np.asarray(A, np.float64), (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def test_torch_warp_matches_opencv(rng):
    img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    A, flips, _ = D.sample_augmentation(np.random.default_rng(3), 4, stored_size=48, size=32)
    out = D.warp_torch(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(4, 1, 1, 1), A, 32).numpy()
    for b in range(4):
        ref = _warp_cv2(img, A[b], 32).astype(np.float32).transpose(2, 0, 1) / 255
        inner = (slice(None), slice(4, -4), slice(4, -4))
        assert np.abs(out[b][inner] - ref[inner]).mean() < 0.01


@pytest.mark.parametrize("use_torch", [False, True])
def test_augmented_landmarks_follow_the_image(use_torch):
    S, size = 96, 64
    lm = place_in_map(np.random.default_rng(1).uniform(0, 1, (1, 68, 2)), S, 1 / (D.CONTEXT * 1.3))[0]
    cfg = D.AugmentConfig(flip=1.0)
    A, flips, _ = D.sample_augmentation(np.random.default_rng(5), 3, cfg, S, D.CONTEXT, size)
    assert flips.all()
    for i in (0, 36, 57):  # one landmark at a time: a bright blob in the stored crop
        img = np.zeros((S, S, 3), np.uint8)
        cx, cy = np.round(lm[i]).astype(int)
        img[cy - 1:cy + 2, cx - 1:cx + 2] = 255
        pts = np.repeat(np.round(lm)[None], 3, 0)
        new, _ = D.augment_landmarks(A, flips, pts)
        for b in range(3):
            if use_torch:
                w = D.warp_torch(torch.from_numpy(img).permute(2, 0, 1)[None], A[b:b + 1], size)[0, 0].numpy()
            else:
                w = _warp_cv2(img, A[b], size)[..., 0]
            yy, xx = np.unravel_index(np.argmax(w), w.shape)
            j = D.FLIP_68[i]  # after a flip the landmark sits at index FLIP_68[i]
            assert np.hypot(xx - new[b, j, 0], yy - new[b, j, 1]) <= 1.5


# ------------------------------------------------------------------ training


def _trainer(pdm, tmp_path, **kw):
    from ectfast.nets.train import Trainer

    args = dict(arch="paper", loss=None, epochs=3, batch_size=4, lr=1e-3, weight_decay=1e-4, seed=0,
                input_size=32, warmup=0.1,
                clip=5.0, device="cpu", amp="none", channels_last=False, compile_model=False, ckpt_every=0,
                val_every=None, log_every=1, progress=False, augment=False, data_desc="synthetic")
    args.update(kw)
    return Trainer(synthetic_crops(pdm), synthetic_crops(pdm, 4, seed=1), str(tmp_path), **args)


def test_one_step_lowers_the_loss_on_a_fixed_batch(pdm, tmp_path):
    t = _trainer(pdm, tmp_path, lr=3e-4)
    x, lm, vis = t.batch(0)
    with torch.no_grad():
        before = float(t.loss(x, lm, vis)[0])
    t.train_step()
    with torch.no_grad():
        after = float(t.loss(x, lm, vis)[0])
    assert np.isfinite(before) and after < before
    # validation runs and gives a finite NME
    assert 0 < t.validate() < 5


def test_bf16_channels_last_step_runs(pdm, tmp_path):
    """The CUDA settings' code path (autocast bf16 + channels_last), here on CPU."""
    t = _trainer(pdm, tmp_path, amp="bf16", channels_last=True, augment=True)
    loss, parts = t.train_step()
    assert np.isfinite(float(loss)) and len(parts) == 3 and t.step == 1
    assert t.model.primary.conv2.weight.is_contiguous(memory_format=torch.channels_last)


def _losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_resume_continues_exactly(pdm, tmp_path):
    from ectfast.nets.train import train

    cs, vs = synthetic_crops(pdm), synthetic_crops(pdm, 4, seed=1)
    kw = dict(arch="paper", holdout=0, epochs=2, batch_size=4, input_size=32, lr=1e-3, device="cpu",
              progress=False, log_every=1, train_set=cs, val_set=vs)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    s = train(out=a, max_steps=4, **kw)
    assert s["step"] == 4 and s["total_steps"] == 4 and s["stopped"] == "done"
    s1 = train(out=b, max_steps=2, **kw)
    assert s1["step"] == 2 and s1["stopped"] == "max-steps"
    ck = torch.load(os.path.join(b, "last.pt"), weights_only=False)
    assert ck["step"] == 2 and ck["epoch"] == 1 and "optimizer" in ck and "scheduler" in ck and "rng" in ck
    s2 = train(out=b, resume=True, **kw)
    assert s2["step"] == 4
    la, lb = _losses(a), _losses(b)
    assert set(lb) == {1, 2, 3, 4}
    for k in (1, 2, 3, 4):
        assert la[k] == lb[k], (k, la[k], lb[k])  # bit-identical, also after the resume
    # a resume that changes the schedule is refused; so is a fresh run into a used folder
    with pytest.raises(ValueError, match="batch_size"):
        train(out=b, resume=True, **{**kw, "batch_size": 2})
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(out=b, **kw)
    # warm resume from the light (fp16) checkpoint alone keeps the position
    os.remove(os.path.join(b, "last.pt"))
    s3 = train(out=b, resume=True, **{**kw, "epochs": 2})
    assert s3["step"] == 4 and s3["stopped"] == "done"


def test_weights_moving_average_is_validated_and_exported(pdm, tmp_path):
    """The EMA of the weights (and BatchNorm statistics) follows the formula step by step, and
    it is what validation, best.pt, light.pt and --export-weights see."""
    from ectfast.nets.train import Trainer, ema_avg_fn

    cs, vs = synthetic_crops(pdm), synthetic_crops(pdm, 4, seed=1)
    t = Trainer(cs, vs, str(tmp_path / "r"), arch="lite", loss=None, epochs=2, batch_size=4, lr=1e-3,
                weight_decay=1e-4, seed=0, input_size=32, warmup=0.0, clip=5.0, device="cpu", amp="none",
                channels_last=False, compile_model=False, ckpt_every=0, val_every=2, log_every=1, progress=False,
                augment=False, data_desc="synthetic", ema=0.9)
    decay = 0.9
    avg = {k: v.detach().clone().double() for k, v in t.model.state_dict().items() if v.is_floating_point()}
    for n in range(4):  # oracle: e <- e + (p - e)(1 - min(decay, (1 + n) / (10 + n))), n = 0 copies
        t.train_step()
        d = min(decay, (1.0 + n) / (10.0 + n))
        for k, v in t.model.state_dict().items():
            if k in avg:
                avg[k] = v.double().clone() if n == 0 else avg[k] + (v.double() - avg[k]) * (1 - d)
    ema = t.eval_model.state_dict()
    for k in avg:
        np.testing.assert_allclose(ema[k].double().numpy(), avg[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert not torch.equal(ema["fusion_out.weight"], t.model.state_dict()["fusion_out.weight"])
    assert ema["enc64.0.1.num_batches_tracked"] == 4  # BatchNorm counts follow the model
    # the average is what is validated and kept
    t._log_validation(t.validate(), torch.tensor(0.0), str(tmp_path / "log.jsonl"), None)
    best = torch.load(str(tmp_path / "r" / "best.pt"), weights_only=False)["model"]
    assert torch.equal(best["fusion_out.weight"], ema["fusion_out.weight"])
    sha = t.export(str(tmp_path / "w.pt"))
    assert sha == read_weights(str(tmp_path / "w.pt"))["sha256"]
    assert read_weights(str(tmp_path / "w.pt"))["meta"]["label_offset_x"] == 0.0  # what check_flip reads
    shipped = read_weights(str(tmp_path / "w.pt"))["state_dict"]["fusion_out.weight"].float()
    np.testing.assert_allclose(shipped.numpy(), ema["fusion_out.weight"].numpy(), atol=1e-3)  # fp16
    # no average with ema = 0; a decay outside [0, 1) is refused by name
    assert ema_avg_fn(0.5)(torch.tensor(3), torch.tensor(5), torch.tensor(7)) == 5  # integer buffers follow
    from ectfast.nets.train import train

    with pytest.raises(ValueError, match=r"ema: expected a decay in \[0, 1\)"):
        train(out=str(tmp_path / "bad"), arch="paper", holdout=0, ema=1.0, train_set=cs, val_set=vs, progress=False)


def test_cold_light_resume_tracks_best_of_this_call(pdm, tmp_path):
    """A light checkpoint carried to a folder without best.pt (a fresh machine): the next
    validation writes best.pt and the export carries its NME, even when an earlier call's
    best NME (in the light checkpoint) was lower."""
    from ectfast.nets.train import train

    cs, vs = synthetic_crops(pdm), synthetic_crops(pdm, 4, seed=1)
    kw = dict(arch="paper", holdout=0, epochs=2, batch_size=4, input_size=32, lr=1e-3, device="cpu",
              progress=False, log_every=1, train_set=cs, val_set=vs)
    a, c = tmp_path / "a", tmp_path / "c"
    s1 = train(out=str(a), max_steps=2, **kw)
    assert s1["step"] == 2 and 0 < s1["best_nme"] < 5  # validated at the end of epoch 1
    blob = torch.load(str(a / "light.pt"), weights_only=True)
    blob["meta"]["train_state"]["best_nme"] = 0.0  # an earlier call's best that nothing beats
    c.mkdir()
    torch.save(blob, str(c / "light.pt"))
    w = str(tmp_path / "w.pt")
    s2 = train(out=str(c), resume=True, export_weights=w, **kw)
    assert s2["step"] == 4 and s2["stopped"] == "done"
    assert (c / "best.pt").is_file() and 0 < s2["best_nme"] < 5
    meta = read_weights(w)["meta"]
    assert meta["best_step"] == 4 and meta["val_nme_interocular_subpixel"] == s2["best_nme"]


def test_flip_keeps_the_labels_offset_from_the_content():
    """Labels d original-image px right of the content (a crop of pixel scale s): with
    flip_label_shift every augmented sample's label sits d s k along the augmented image's x axis
    (k, theta: the warp's scale and rotation) from the content, flipped or not; without it a
    flipped sample's label sits on the other side. The content is found in the warped image."""
    S, size, s, d = 96, 64, 0.75, 1.2
    yy, xx = np.mgrid[0:S, 0:S]
    c = np.array([44.3, 50.7])
    img = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * 2.5 ** 2)).astype(np.float32)
    B = 8
    A, flips, _ = D.sample_augmentation(np.random.default_rng(4), B, D.AugmentConfig(), S, D.CONTEXT, size)
    assert flips.any() and not flips.all()
    w = D.warp_torch(torch.from_numpy(img)[None, None].repeat(B, 3, 1, 1), A, size)[:, 0].numpy()
    gy, gx = np.mgrid[0:size, 0:size]
    content = np.stack([(w * gx).sum((1, 2)) / w.sum((1, 2)), (w * gy).sum((1, 2)) / w.sum((1, 2))], 1)
    labels = np.repeat((c + [d * s, 0.0])[None, None], B, 0).repeat(68, 1)  # all 68 at one point
    plain, _ = D.augment_landmarks(A, flips, labels)
    kept = plain.copy()
    kept[:, :, 0] += D.flip_label_shift(A, flips, np.full(B, s), d)[:, None]
    sign = np.where(flips, -1.0, 1.0)  # A's linear part is k R, or F k R when flipped (F = diag(-1, 1))
    along_x = d * s * np.stack([sign * A[:, 0, 0], A[:, 1, 0]], 1)  # d s k (cos theta, sin theta)
    np.testing.assert_allclose(kept[:, 0] - content, along_x, atol=0.02)
    np.testing.assert_allclose(plain[~flips, 0] - content[~flips], along_x[~flips], atol=0.02)
    assert (np.sign(plain[flips, 0, 0] - content[flips, 0]) == -np.sign(along_x[flips, 0])).all()
    assert np.abs(along_x[:, 0]).min() > 0.5 * d * s * size / S


def test_trainer_keeps_the_label_offset_through_flips(pdm, tmp_path):
    cs = synthetic_crops(pdm)
    with pytest.raises(ValueError, match="label_offset_x: needs the crops' pixel scale"):
        _trainer(pdm, tmp_path / "a", augment=True, label_offset_x=1.0)
    with pytest.raises(ValueError, match="label_offset_x: expected"):
        _trainer(pdm, tmp_path / "b", augment=True, label_offset_x=float("nan"))
    from ectfast.nets.train import Trainer

    cs.pixel_scale = np.linspace(0.5, 2.0, len(cs))
    args = dict(arch="paper", loss=None, epochs=3, batch_size=4, lr=1e-3, weight_decay=1e-4, seed=0, input_size=32,
                warmup=0.1, clip=5.0, device="cpu", amp="none", channels_last=False, compile_model=False,
                ckpt_every=0, val_every=None, log_every=1, progress=False, augment=True, data_desc="synthetic")
    lm = {}
    for off in (0.0, 1.5):
        t = Trainer(cs, None, str(tmp_path / f"r{off}"), label_offset_x=off, **args)
        assert t.cfg["label_offset_x"] == off
        lm[off] = t.batch(0)[1]
    diff = lm[1.5] - lm[0.0]
    moved = np.abs(diff[:, :, 0]).max(1) > 1e-9
    assert moved.any() and not moved.all() and not diff[:, :, 1].any()
    assert np.allclose(diff[:, :, 0], diff[:, :1, 0])  # one shift per sample


def test_cli_train_on_packed_data_and_export(pdm, tmp_path):
    from ectfast.cli import main

    packed = str(tmp_path / "p.npz")
    train_crops = synthetic_crops(pdm)
    train_crops.pixel_scale = np.linspace(0.5, 2.0, len(train_crops))
    size = D.pack(packed, train_crops, synthetic_crops(pdm, 4, seed=1), quality=95)
    back = D.load_packed(packed, "train")
    np.testing.assert_array_equal(back.pixel_scale, train_crops.pixel_scale)
    np.testing.assert_array_equal(back.subset([1, 3]).pixel_scale, train_crops.pixel_scale[[1, 3]])
    assert D.load_packed(packed, "val").pixel_scale is None
    np.testing.assert_array_equal(back.landmarks, synthetic_crops(pdm).landmarks)
    assert np.abs(back.images.astype(int) - synthetic_crops(pdm).images).mean() < 4
    assert len(D.load_packed(packed, "val")) == 4 and size == os.path.getsize(packed)
    w = str(tmp_path / "w.pt")
    rc = main(["train", "--arch", "paper", "--holdout", "0", "--packed", packed, "--out", str(tmp_path / "run"), "--input-size", "32",
               "--batch-size", "4", "--epochs", "1", "--quiet", "--export-weights", w])
    assert rc == 0
    blob = read_weights(w)
    assert blob["n_landmarks"] == 68 and blob["meta"]["input_size"] == 32
    with pytest.raises(FileNotFoundError):
        D.load_packed(str(tmp_path / "missing.npz"))
    np.savez(str(tmp_path / "bad.npz"), x=np.zeros(3))
    with pytest.raises(ValueError, match="packed"):
        D.load_packed(str(tmp_path / "bad.npz"))


# ------------------------------------------------------------------ shipped weights


def test_weights_file_round_trip_checksum_and_corruption(tmp_path):
    torch.manual_seed(0)
    m = FCN().eval()
    path = str(tmp_path / "fcn.pt")
    sha = save_weights(m, path, meta={"note": "test"})
    assert os.path.getsize(path) < 40 * 2**20
    blob = read_weights(path)
    assert blob["sha256"] == sha == state_dict_sha256(blob["state_dict"])
    assert blob["state_dict"]["primary.conv1.weight"].dtype == torch.float16
    m2 = load_pretrained(path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a, b = m(x)[2], m2(x)[2]
    assert torch.allclose(a, b, atol=1e-2 * float(a.abs().max()) + 1e-6)
    assert has_pretrained(path) and not has_pretrained(str(tmp_path / "nope.pt"))

    # a changed tensor no longer matches the stored checksum
    blob["state_dict"]["fusion.fuse2.bias"][0] += 1
    torch.save(blob, str(tmp_path / "tampered.pt"))
    with pytest.raises(ValueError, match="checksum"):
        load_pretrained(str(tmp_path / "tampered.pt"))
    # a truncated file
    with open(path, "rb") as f:
        raw = f.read()
    with open(tmp_path / "trunc.pt", "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        load_pretrained(str(tmp_path / "trunc.pt"))
    # another format, another version
    torch.save({"format": "something", "state_dict": {}}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not an ectfast FCN weights file"):
        read_weights(str(tmp_path / "other.pt"))
    good = read_weights(path)
    good["version"] = 99
    torch.save(good, str(tmp_path / "v99.pt"))
    with pytest.raises(ValueError, match="version"):
        read_weights(str(tmp_path / "v99.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(str(tmp_path / "absent.pt"))


def test_default_weights_path_is_clear_when_absent():
    if has_pretrained():
        blob = read_weights(os.path.join(ROOT, "python", "ectfast", "assets", "lite_300w.pt"))
        assert blob["n_landmarks"] == 68 and blob["arch"] in ("lite", "lite64", "lite-hr")
    else:
        with pytest.raises(FileNotFoundError, match="lite_300w.pt"):
            load_pretrained()


# ------------------------------------------------------------------ ONNX


def test_onnx_export_matches_pytorch(tmp_path):
    from ectfast.nets.export import check_onnx, export_onnx

    pytest.importorskip("onnx", reason="onnx not installed: the exporters need it")
    torch.manual_seed(0)
    m = FCN().eval()
    path = export_onnx(m, str(tmp_path / "fcn.onnx"), size=32)
    assert os.path.getsize(path) > 10 * 2**20  # the weights are inside
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pytest.skip("onnxruntime not installed: export ran, numeric check skipped")
    assert check_onnx(m, path, size=32, batch=3) <= 1e-3


# ------------------------------------------------------------------ real faces


@pytest.mark.data
def test_load_crops_reads_real_faces(data_dir):
    cs = D.load_crops(data_dir / "300w", ["lfpw/testset"], limit=3, workers=1, progress=False)
    assert len(cs) == 3 and cs.images.shape == (3, D.STORED_SIZE, D.STORED_SIZE, 3) and cs.images.dtype == np.uint8
    # the canonical crop of a stored crop: the landmarks' bounding box is centred and spans 256 / 1.3
    lm = D.transform_points(D.canonical_matrix(cs.stored_size, cs.context, 256), cs.landmarks[0])
    assert np.ptp(lm, 0).max() == pytest.approx(256 / 1.3, rel=1e-4)
    np.testing.assert_allclose((lm.min(0) + lm.max(0)) / 2, 127.5, atol=1e-3)
    # RGB order: the first stored crop is the first face's image file (BGR) reversed, margin-cropped
    import cv2 as _cv2

    from ectfast.io.pts import read_pts

    img_path, pts_path = D.list_faces(data_dir / "300w", ["lfpw/testset"])[0]
    crop, _, _ = D.margin_crop(np.ascontiguousarray(_cv2.imread(str(img_path))[..., ::-1]), read_pts(pts_path))
    np.testing.assert_array_equal(cs.images[0], crop)