import re

import numpy as np
import pytest

from ectfast.io.pts import format_pts, parse_pts, read_pts, write_pts

STANDARD = """version: 1
n_points:  3
{
10.5 20.0
30 40.25
1e1 2E1
}
"""


def test_standard_form_is_read_zero_based():
    pts = parse_pts(STANDARD)
    np.testing.assert_allclose(pts, [[9.5, 19.0], [29.0, 39.25], [9.0, 19.0]])
    np.testing.assert_allclose(parse_pts(STANDARD, one_based=True)[0], [10.5, 20.0])


def test_headerless_form():
    pts = parse_pts("10 20\n30 40\n\n50 60\n")
    np.testing.assert_allclose(pts, [[9, 19], [29, 39], [49, 59]])


def test_round_trip(tmp_path, rng):
    pts = rng.uniform(0, 500, (68, 2))
    write_pts(tmp_path / "a.pts", pts)
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), pts, atol=1e-3)
    assert (tmp_path / "a.pts").read_text().startswith("version: 1\nn_points:  68\n{\n")


@pytest.mark.parametrize("text, msg", [
    ("", "no landmark points"),
    ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "n_points 3 but 2"),
    ("1 2\nabc def\n", "expected 'x y'"),
    # NaN/Inf used to get the same "expected 'x y'" as text
    ("1 2\n3 nan\n", "x.pts:2: non-finite coordinate"),
    ("1 2\n-inf 4\n", "x.pts:2: non-finite coordinate"),
    ("1 2\nInfinity, NaN\n", "x.pts:2: non-finite coordinate"),
    ("1 2\n3 1e999\n", "x.pts:2: non-finite coordinate"),
    ("n_points: x\n1 2\n", "malformed n_points"),
    ("{\n1 2\n}\n3 4\n", "after the closing brace"),
])
def test_bad_text_names_the_problem(text, msg):
    with pytest.raises(ValueError, match=msg):
        parse_pts(text, source="x.pts")


def test_binary_file_is_a_value_error(tmp_path):
    p = tmp_path / "b.pts"
    p.write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match="b.pts"):
        read_pts(p)


def test_format_rejects_bad_points():
    with pytest.raises(ValueError, match="points"):
        format_pts(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        format_pts(np.array([[1.0, np.inf]]))


def test_reads_real_300w_files(data_dir):
    from ectfast.io.datasets import find_faces

    faces = find_faces(data_dir / "300w" / "lfpw" / "testset")
    assert len(faces) == 224
    pts = read_pts(faces[0][1])
    assert pts.shape == (68, 2) and np.isfinite(pts).all()


def test_missing_file_and_folder_name_the_path(tmp_path):
    """They used to be a raw FileNotFoundError ("[Errno 2] ...") and IsADirectoryError."""
    missing = tmp_path / "none.pts"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(missing))}: no such \.pts file$"):
        read_pts(missing)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: is a folder, not a \.pts file$"):
        read_pts(tmp_path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: is a folder"):
        write_pts(tmp_path, np.zeros((3, 2)))
    with pytest.raises(FileNotFoundError, match=r"cannot write: the folder .* does not exist"):
        write_pts(tmp_path / "no" / "such" / "a.pts", np.zeros((3, 2)))
    with pytest.raises(TypeError, match="^path: "):
        read_pts(3)
    with pytest.raises(ValueError, match="^path: "):
        read_pts("bad\x00name.pts")


def test_huge_file_is_refused(tmp_path, monkeypatch):
    import ectfast.io.pts

    p = tmp_path / "big.pts"
    p.write_text("1 2\n" * 100)
    monkeypatch.setattr(ectfast.io.pts, "MAX_FILE_BYTES", 64)
    with pytest.raises(ValueError, match=r"big\.pts: 400 bytes is too large for a \.pts file \(at most 64\)"):
        read_pts(p)


def test_bad_points_name_the_argument(tmp_path):
    with pytest.raises(TypeError, match="^points: "):
        write_pts(tmp_path / "a.pts", "abc")
    with pytest.raises(ValueError, match="^points: non-finite"):
        write_pts(tmp_path / "a.pts", np.array([[1.0, np.nan]]))
    with pytest.raises(TypeError, match="^text: "):
        parse_pts(b"1 2\n")
