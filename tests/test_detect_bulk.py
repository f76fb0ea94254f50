"""``ectfast detect`` in bulk (issue 10) and its bad inputs (issues 10, 11): folders, batching,
results written as it goes, resume, Ctrl-C, one line per bad file, exit statuses, unwritable
output. A fast fake network and face detector stand in for the real ones (no weights needed)."""
import json
import os
import struct
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from ectfast import cli
from ectfast.app import detector as D
from ectfast.nets import engine as engine_mod
from ectfast.app import crops
from ectfast.cli import detect as detect_cmd
from ectfast.io import images
from ectfast.core.synthetic import gaussian_maps, peak_scale

from _e2e_helpers import template_shape

MAP = 32  # the lite network's maps: fitted with upsample 8


class ConstEstimator:
    """Maps with a Gaussian at the template face (placed as box_from_landmarks places a face in
    its crop) for every crop: the fit then returns that face, mapped back to each image."""

    engine = "fake"
    input_size = 128  # as the lite network: the pipeline averages the 256 crops down to it

    def __init__(self, template):
        side = 1.3 * np.ptp(template, axis=0).max()
        crop_pts = template * (256 / side) + 127.5
        self.crop_points = crop_pts
        centres = (crop_pts - 3.5) / 8.0  # map pixel i sits at 8 i + 3.5 in the crop
        self.maps = gaussian_maps(centres[None], MAP, MAP, sigma=6.0 / 8, peak=peak_scale(6.0))
        self.calls = 0
        self.faces = 0
        self.fail_on_call = None

    def __call__(self, crops):
        assert crops.shape[1:] == (3, 128, 128) and crops.dtype == np.float32
        self.calls += 1
        self.faces += len(crops)
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the network runs
        return np.repeat(self.maps, len(crops), axis=0)


def whole_image_box(im):
    """A fake face detector: the square of the image's shorter side, centred."""
    h, w = im.shape[:2]
    s = min(h, w)
    return np.array([[(w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2]], float)


whole_image_box.name = "fake-whole-image"


@pytest.fixture
def fake(monkeypatch, pdm):
    est = ConstEstimator(template_shape(pdm))
    monkeypatch.setattr(engine_mod, "make_estimator", lambda *a, **k: est)
    monkeypatch.setattr(D, "default_face_detector", lambda: whole_image_box)
    return est


def _png(img):
    return cv2.imencode(".png", img)[1].tobytes()


def _jpg(img, q=90):
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()


def _noise(h, w, seed=0, c=3):
    shape = (h, w, c) if c > 1 else (h, w)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def _corrupt_jpeg():
    """A JPEG whose scan data is damaged mid-way: OpenCV still decodes it (garbage pixels), and
    libjpeg warns 'Corrupt JPEG data' on stderr."""
    b = bytearray(_jpg(_noise(256, 256, seed=4), q=95))
    n = len(b)
    for i in range(n // 2, n // 2 + 300):
        b[i] = (b[i] * 7 + 3) % 255
    return bytes(b)


def _corrupt_png():
    b = bytearray(_png(_noise(64, 64, seed=5)))
    b[60:260] = bytes(200)  # zeros over the IDAT data (its CRC no longer matches)
    return bytes(b)


def _huge_png_header(side=20000):
    """A PNG whose header claims side x side px (the data is a tiny image's): must be refused
    from the header alone, never decoded."""
    b = bytearray(_png(_noise(8, 8)))
    b[16:24] = struct.pack(">II", side, side)
    return bytes(b)


def big_jpeg(side=20000):
    """A valid baseline greyscale JPEG of side x side px, uniform grey, in ~side^2/32 bytes: one
    Huffman code per table (DC category 0, AC end-of-block), so every 8x8 block is 2 zero bits."""
    def seg(marker, body):
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(body) + 2) + body

    def one_code(table_class):
        return bytes([table_class]) + bytes([1] + [0] * 15) + b"\x00"

    head = (b"\xff\xd8" + seg(0xDB, b"\x00" + b"\x01" * 64)
            + seg(0xC0, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
            + seg(0xC4, one_code(0x00)) + seg(0xC4, one_code(0x10))
            + seg(0xDA, b"\x01\x01\x00\x00\x3f\x00"))
    return head + bytes((side // 8) ** 2 * 2 // 8) + b"\xff\xd9"


BAD_FILES = {
    "empty.jpg": (lambda: b"", "empty file (0 bytes)"),
    "truncated.jpg": (lambda: _jpg(_noise(64, 64))[:400], "truncated JPEG"),
    "truncated.png": (lambda: _png(_noise(64, 64))[:500], "truncated PNG"),
    "corrupt.jpg": (_corrupt_jpeg, "corrupt JPEG data (libjpeg: Corrupt JPEG data"),
    "corrupt.png": (_corrupt_png, "cannot decode the PNG image (corrupt data)"),
    "text.jpg": (lambda: b"hello, I am a text file\n", "not an image file (unrecognised header 'hello, I am '"),
    "huge.png": (_huge_png_header, "PNG image of 20000x20000 px (400 megapixels) is over the limit of 64 megapixels"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_is_one_clear_line(name, tmp_path, fake, capfd):
    make, words = BAD_FILES[name]
    bad = tmp_path / "in" / name
    bad.parent.mkdir()
    bad.write_bytes(make())
    good = tmp_path / "in" / "good.png"
    good.write_bytes(_png(_noise(64, 64, seed=1)))
    with pytest.raises(images.ImageError, match=words.replace("(", r"\(").replace(")", r"\)")):
        images.read_image(bad)
    rc = cli.main(["detect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capfd.readouterr()  # file-descriptor level: the C libraries' own stderr too
    assert rc == 1
    lines = err.strip().splitlines()
    bad_lines = [ln for ln in lines if name in ln]
    assert bad_lines == [f"ectfast detect: {bad}: {bad_lines[0].split(': ', 2)[2]}"] and words in bad_lines[0]
    assert all(ln.startswith("ectfast detect: ") for ln in lines), lines  # nothing raw from libjpeg/libpng
    assert "1 image(s) processed (1 with faces, 0 without; 1 faces), 1 failed" in lines[-1]
    assert (tmp_path / "out" / "good.json").is_file() and not (tmp_path / "out" / (bad.stem + ".json")).exists()


def test_grey_rgba_16bit_and_1px_images(tmp_path, fake, capfd):
    d = tmp_path / "in"
    d.mkdir()
    cv2.imwrite(str(d / "grey.png"), _noise(80, 60, c=1))
    cv2.imwrite(str(d / "rgba.png"), np.dstack([_noise(70, 90), np.full((70, 90), 128, np.uint8)]))
    cv2.imwrite(str(d / "deep.png"), (np.random.default_rng(2).random((50, 50, 3)) * 65535).astype(np.uint16))
    cv2.imwrite(str(d / "deepgrey.png"), (np.random.default_rng(3).random((40, 40)) * 65535).astype(np.uint16))
    cv2.imwrite(str(d / "one.png"), np.zeros((1, 1, 3), np.uint8))
    rc = cli.main(["detect", str(d), "--out", str(tmp_path / "out"), "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    for stem, (w, h) in {"grey": (60, 80), "rgba": (90, 70), "deep": (50, 50), "deepgrey": (40, 40)}.items():
        doc = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert (doc["width"], doc["height"]) == (w, h) and len(doc["faces"]) == 1
        lm = np.array(doc["faces"][0]["landmarks"])
        assert np.isfinite(lm).all() and lm.shape == (68, 2)
        drawn = cv2.imread(str(tmp_path / "out" / f"{stem}_landmarks.png"))
        assert drawn.shape == (h, w, 3)
    one = json.loads((tmp_path / "out" / "one.json").read_text())
    assert one["faces"] == [] and "1x1 px is too small" in one["note"]
    assert f"{d / 'one.png'}: image of 1x1 px is too small to contain a face" in err


def test_landmarks_are_mapped_back_to_the_image(tmp_path, fake, capfd):
    """The fake network's face, fitted in the crop, lands where the crop affine puts it."""
    img = _noise(300, 200, seed=7)
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), img)
    assert cli.main(["detect", str(p), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "o" / "a.json").read_text())
    box = whole_image_box(img)[0]
    M = crops.crop_affine(box)
    inv = cv2.invertAffineTransform(M)
    expect = fake.crop_points @ inv[:, :2].T + inv[:, 2]
    got = np.array(doc["faces"][0]["landmarks"])
    assert np.abs(got - expect).max() < 1.0  # ECT's PDM fit of the template: sub-pixel here
    np.testing.assert_allclose(doc["faces"][0]["box"], box)


def test_huge_jpeg_is_decoded_reduced_in_bounded_memory(tmp_path):
    """20000 x 20000 px (400 megapixels; 1.2 GB decoded in full): read at 1/4 in a fresh
    interpreter whose peak memory stays far below a full decode."""
    p = tmp_path / "huge.jpg"
    p.write_bytes(big_jpeg())
    # the peak of this process's own memory: VmHWM (getrusage's ru_maxrss is carried across exec
    # on Linux, so it would report the larger pytest process that started the interpreter)
    code = textwrap.dedent(f"""
        import resource
        from ectfast.io.images import read_image
        r = read_image({str(p)!r})
        print(r.image.shape, r.scale, r.width, r.height, int(r.image.mean()))
        try:
            hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("maxrss_mb", hwm // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()
    assert first == "(5000, 5000, 3) 0.25 20000 20000 128"
    assert int(second.split()[1]) < 600  # measured ~200 MB; a full decode alone is 1144 MiB


def test_huge_jpeg_through_detect(tmp_path, fake, capfd):
    p = tmp_path / "huge.jpg"
    p.write_bytes(big_jpeg())
    rc = cli.main(["detect", str(p), "--out", str(tmp_path / "o"), "--no-progress", "--no-draw"])
    assert rc == 0, capfd.readouterr().err
    doc = json.loads((tmp_path / "o" / "huge.json").read_text())
    assert (doc["width"], doc["height"], doc["decoded_scale"]) == (20000, 20000, 0.25)
    np.testing.assert_allclose(doc["faces"][0]["box"], [0, 0, 20000, 20000])  # in the file's pixels
    assert doc["annotated"] is None
    # refused outright with a lower limit: even 1/8 is over it
    rc = cli.main(["detect", str(p), "--out", str(tmp_path / "o2"), "--no-progress", "--max-megapixels", "5"])
    err = capfd.readouterr().err
    assert rc == 1 and "over 5 megapixels even decoded at 1/8" in err


def _make_folder(root, n=1000, bad_every=10):
    """n tiny images in sub-folders, every ``bad_every``-th one bad (five kinds in turn), plus
    files that are not images by their extension (ignored)."""
    good_png, good_jpg = _png(_noise(32, 32, seed=1)), _jpg(_noise(32, 32, seed=2))
    kinds = [b"", good_jpg[:100], good_png[:60], b"plain text", _huge_png_header()]
    good, bad = [], []
    for k in range(n):
        sub = root / f"part{k // 250}"
        sub.mkdir(parents=True, exist_ok=True)
        ext = ".jpg" if k % 2 else ".png"
        p = sub / f"img{k:04d}{ext}"
        if k % bad_every == bad_every - 1:
            p.write_bytes(kinds[(k // bad_every) % len(kinds)])
            bad.append(p)
        else:
            p.write_bytes(good_jpg if ext == ".jpg" else good_png)
            good.append(p)
    (root / "notes.txt").write_text("not an image")
    (root / "part0" / "img0000.pts").write_text("version: 1")
    return good, bad


def test_folder_of_1000_images_10_percent_corrupt(tmp_path, fake, capfd):
    root = tmp_path / "photos"
    good, bad = _make_folder(root)
    out = tmp_path / "out"
    rc = cli.main(["detect", str(root), "--out", str(out), "--no-draw", "--no-progress", "-q", "--batch-size", "32"])
    _, err = capfd.readouterr()
    assert rc == 1  # documented: some images failed, the others were written
    lines = err.strip().splitlines()
    for p in bad:  # every bad one named, once
        assert sum(str(p) + ":" in ln for ln in lines) == 1, p
    for p in good:  # every good one processed, its JSON in the mirrored sub-folder
        rel = p.relative_to(root).with_suffix(".json")
        doc = json.loads((out / rel).read_text())
        assert doc["image"] == str(p) and len(doc["faces"]) == 1
    assert "900 image(s) processed (900 with faces, 0 without; 900 faces), 100 failed" in lines[-1]
    assert fake.faces == 900 and fake.calls <= 900 // 32 + 40  # batched across images
    assert not list(out.rglob("*.tmp*"))
    # a rerun skips the finished images and retries the failed ones
    mtime = (out / good[0].relative_to(root).with_suffix(".json")).stat().st_mtime_ns
    rc = cli.main(["detect", str(root), "--out", str(out), "--no-draw", "--no-progress", "-q"])
    _, err = capfd.readouterr()
    assert rc == 1 and "skipping 900 image(s) already done" in err
    assert "0 image(s) processed (0 with faces, 0 without; 0 faces), 100 failed, 900 skipped" in err
    assert (out / good[0].relative_to(root).with_suffix(".json")).stat().st_mtime_ns == mtime


def test_ctrl_c_keeps_what_was_written_and_a_rerun_continues(tmp_path, fake, capfd):
    root = tmp_path / "photos"
    good, _ = _make_folder(root, n=40, bad_every=1000)
    out = tmp_path / "out"
    fake.fail_on_call = 3
    rc = cli.main(["detect", str(root), "--out", str(out), "--no-progress", "--batch-size", "4", "--workers", "1"])
    _, err = capfd.readouterr()
    assert rc == 130 and "interrupted" in err and "rerun the same command to continue" in err
    done = sorted(out.rglob("*.json"))
    assert len(done) == 8  # the two batches before the interrupt
    for f in done:
        assert json.loads(f.read_text())["faces"]  # complete files only
    assert not list(out.rglob("*.tmp*"))
    fake.fail_on_call = None
    rc = cli.main(["detect", str(root), "--out", str(out), "--no-progress", "--batch-size", "4"])
    _, err = capfd.readouterr()
    assert rc == 0 and "32 image(s) processed" in err and "8 skipped as already done" in err
    assert len(list(out.rglob("*.json"))) == 40


def test_jsonl_stream_resume_and_a_line_cut_by_a_crash(tmp_path, fake, capfd):
    root = tmp_path / "photos"
    good, bad = _make_folder(root, n=20, bad_every=5)
    stream = tmp_path / "res.jsonl"
    rc = cli.main(["detect", str(root), "--jsonl", str(stream), "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 1
    recs = [json.loads(ln) for ln in stream.read_text().splitlines()]
    assert sorted(r["image"] for r in recs if "error" not in r) == sorted(map(str, good))
    assert sorted(r["image"] for r in recs if "error" in r) == sorted(map(str, bad))
    assert not (tmp_path / "ectfast-detect").exists()  # --jsonl alone writes no image files
    with open(stream, "a") as fh:  # a crash in the middle of a line
        fh.write('{"image": "cut')
    rc = cli.main(["detect", str(root), "--jsonl", str(stream), "--no-progress"])
    _, err = capfd.readouterr()
    assert rc == 1 and "skipping 16 image(s)" in err
    lines = stream.read_text().splitlines()
    assert lines[len(recs)] == '{"image": "cut'  # left as it was, on its own line
    assert all("error" in json.loads(ln) for ln in lines[len(recs) + 1:]) and len(lines) == len(recs) + 1 + 4
    # '-' streams to stdout, one JSON object per line and nothing else
    rc = cli.main(["detect", str(good[0]), str(good[1]), "--jsonl", "-", "--no-progress"])
    out, err = capfd.readouterr()
    assert rc == 0 and [json.loads(ln)["image"] for ln in out.splitlines()] == [str(good[0]), str(good[1])]


def test_unwritable_output_is_its_own_failure(tmp_path, fake, capfd):
    img = tmp_path / "a.png"
    img.write_bytes(_png(_noise(40, 40)))
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    rc = cli.main(["detect", str(img), "--out", str(blocker / "out"), "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 3 and "cannot create the output folder" in err and "no face" not in err
    assert fake.calls == 0  # stopped before any work
    # a write that fails in the middle of a run: stop at once with status 3
    out = tmp_path / "out"
    (out / "b.json").mkdir(parents=True)  # a folder where b.json must go
    for s in "abc":
        (tmp_path / f"{s}.png").write_bytes(_png(_noise(40, 40)))
    rc = cli.main(["detect", *(str(tmp_path / f"{s}.png") for s in "abc"), "--out", str(out), "--no-progress",
                   "--batch-size", "1", "--workers", "1"])
    err = capfd.readouterr().err
    assert rc == 3 and f"cannot write {out / 'b.json'}" in err and "stopped" in err
    assert (out / "a.json").is_file() and not (out / "c.json").exists()
    if os.path.exists("/dev/full"):
        rc = cli.main(["detect", str(img), "--jsonl", "/dev/full", "--no-progress"])
        err = capfd.readouterr().err
        assert rc == 3 and "cannot write /dev/full" in err


def test_example_photograph(tmp_path, fake, capfd, monkeypatch):
    assert os.path.isfile(detect_cmd.EXAMPLE_IMAGE)
    out = tmp_path / "ex"
    rc = cli.main(["detect", "--example", "--out", str(out), "--no-progress"])
    so, err = capfd.readouterr()
    assert rc == 0
    assert f"example: wrote {out / 'einstein.json'} and {out / 'einstein_landmarks.jpg'}" in so
    assert cli.main(["detect", "--example", "x.jpg"]) == 2
    # rerun: the example is always redone (and says where again)
    assert cli.main(["detect", "--example", "--out", str(out), "--no-progress"]) == 0
    assert "example: wrote" in capfd.readouterr().out


def test_output_folder_inside_the_input_folder_is_not_searched(tmp_path, fake, capfd):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "a.png").write_bytes(_png(_noise(40, 40)))
    for _ in range(2):
        assert cli.main(["detect", str(root), "--out", str(root / "out"), "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "1 skipped as already done" in err and "a_landmarks" not in err


def test_exif_orientation_gives_the_decoded_size(tmp_path):
    """A JPEG stored 64x32 with EXIF orientation 6 decodes turned (32x64): the reported size
    is the decoded one, so that landmarks and width/height agree."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :8] = 255
    jpg = _jpg(img)
    tiff = (b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
            + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0))
    app1 = b"Exif\x00\x00" + tiff
    p = tmp_path / "turned.jpg"
    p.write_bytes(jpg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpg[2:])
    assert images.image_header(p.read_bytes())[1:] == (64, 32)
    r = images.read_image(p)
    assert r.image.shape[:2] == (64, 32) and (r.width, r.height, r.scale) == (32, 64, 1.0)
