"""ectfast.core.metrics: hand-computed numbers."""
import numpy as np
import pytest

from ectfast.core import metrics


def _face():
    """A 68-point shape whose eye geometry is known exactly:
    right eye points 36-41 around (100, 100) (mean exactly (100, 100)), left eye 42-47 around
    (160, 100); outer corners 36 = (90, 100) and 45 = (170, 100); the other points fill the
    box [70, 190] x [60, 200]."""
    s = np.zeros((68, 2))
    rng = np.random.default_rng(0)
    s[:] = rng.uniform([70, 60], [190, 200], (68, 2))
    s[0], s[1] = (70, 60), (190, 200)  # pin the bounding box: w = 120, h = 140
    eye = np.array([[-10, 0], [-5, -4], [5, -4], [10, 0], [5, 4], [-5, 4]], float)
    s[36:42] = eye + (100, 100)
    s[42:48] = eye[[3, 2, 1, 0, 5, 4]] * (1, 1) + (160, 100)
    s[45] = (170, 100)
    s[42] = (150, 100)
    return s


def test_normalizers_by_hand():
    g = _face()
    assert metrics.normalizer(g, "inter-pupil")[0] == pytest.approx(60.0)
    assert metrics.normalizer(g, "inter-ocular")[0] == pytest.approx(80.0)
    assert metrics.normalizer(g, "box")[0] == pytest.approx(np.sqrt(120 * 140))
    # aliases
    assert metrics.normalizer(g, "ocular")[0] == pytest.approx(80.0)
    assert metrics.normalizer(g, "inter_pupil")[0] == pytest.approx(60.0)


def test_nme_of_a_shift():
    g = _face()
    p = g + (3.0, 4.0)  # every point off by exactly 5 px
    assert metrics.point_errors(p, g) == pytest.approx(np.full((1, 68), 5.0))
    assert metrics.nme(p, g, "inter-ocular")[0] == pytest.approx(5 / 80)
    assert metrics.nme(p, g, "inter-pupil")[0] == pytest.approx(5 / 60)
    assert metrics.nme(p, g, "box")[0] == pytest.approx(5 / np.sqrt(120 * 140))
    assert metrics.mape(p, g)[0] == pytest.approx(5.0)


def test_nme_one_point_off_and_batch():
    g = np.stack([_face(), _face() * 2])  # second face twice as large: d doubles
    p = g.copy()
    p[0, 10] += (0, 68.0)  # one point 68 px off -> mean error 1 px
    p[1, 20] += (136.0, 0)  # 136 px off -> mean 2 px, d = 160
    e = metrics.nme(p, g, "inter-ocular")
    assert e == pytest.approx([1 / 80, 2 / 160])
    assert metrics.mape(p, g) == pytest.approx([1.0, 2.0])


def test_failure_rate_and_threshold_strictness():
    e = np.array([0.01, 0.08, 0.0801, 0.09, 0.2])
    assert metrics.failure_rate(e, 0.08) == pytest.approx(3 / 5)  # 0.08 itself is not a failure
    assert metrics.failure_rate(e, 0.10) == pytest.approx(1 / 5)


def test_auc_known_distribution():
    # CED of errors {0, 0.04, 0.08, 0.2} on [0, 0.08]: 1/4 on [0, .04), 2/4 on [.04, .08),
    # 3/4 at .08 -> area = 0.04 * 1/4 + 0.04 * 2/4 = 0.03 -> normalised 0.375
    e = np.array([0.0, 0.04, 0.08, 0.2])
    assert metrics.auc(e, 0.08) == pytest.approx(0.375)
    assert metrics.auc(np.zeros(7)) == pytest.approx(1.0)
    assert metrics.auc(np.full(3, 0.5)) == 0.0
    # uniform errors on [0, 0.16]: CED(t) = t / 0.16 -> area 0.08^2 / 2 / 0.16 = 0.02 -> 0.25
    u = np.linspace(0, 0.16, 100001)
    assert metrics.auc(u, 0.08) == pytest.approx(0.25, abs=1e-4)


def test_ced_matches_counts_and_auc():
    e = np.array([0.0, 0.04, 0.08, 0.2])
    t, f = metrics.ced(e, 0.08, num=5)
    assert t == pytest.approx([0, 0.02, 0.04, 0.06, 0.08])
    assert f == pytest.approx([0.25, 0.25, 0.5, 0.5, 0.75])
    t, f = metrics.ced(e, 0.08, num=20001)  # trapezoid of a fine grid converges to the exact AUC
    assert np.sum((f[1:] + f[:-1]) / 2 * np.diff(t)) / 0.08 == pytest.approx(metrics.auc(e), abs=1e-3)


def test_visibility_precision_recall():
    conf = np.array([[0.1, 0.2, 0.6, 0.9], [0.4, 0.7, 0.3, 0.95]])
    occ = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], bool)
    r = metrics.visibility_pr(conf, occ, [0.5, 0.25, 0.05])
    # tau 0.5: predicted occluded = {0.1, 0.2, 0.4, 0.3}: tp 3 (0.1, 0.2, 0.3), fp 1, fn 0
    # tau 0.25: {0.1, 0.2}: tp 2, fp 0, fn 1; tau 0.05: nothing predicted: tp 0, fn 3
    assert r["tp"].tolist() == [3, 2, 0] and r["fp"].tolist() == [1, 0, 0] and r["fn"].tolist() == [0, 1, 3]
    assert r["precision"] == pytest.approx([0.75, 1.0, 1.0])  # nothing predicted -> 1 by convention
    assert r["recall"] == pytest.approx([1.0, 2 / 3, 0.0])
    none = metrics.visibility_pr(conf, np.zeros_like(occ), [0.5])
    assert none["recall"][0] == 1.0 and none["precision"][0] == 0.0


def test_summarize_reports_everything():
    g = np.stack([_face(), _face()])
    p = g + np.array([[[3.0, 4.0]], [[0.0, 8.0]]])  # 5 px and 8 px: NME .0625 and .1 (ocular)
    s = metrics.summarize(p, g, confidence=np.ones((2, 68)), occluded=np.zeros((2, 68), bool))
    assert s["faces"] == 2
    assert s["nme_inter-ocular"] == pytest.approx((5 / 80 + 8 / 80) / 2)
    assert s["nme_inter-pupil"] == pytest.approx((5 / 60 + 8 / 60) / 2)
    assert s["fr@0.08"] == pytest.approx(0.5) and s["fr@0.1"] == pytest.approx(0.0)
    assert s["auc@0.08"] == pytest.approx(((1 - 0.0625 / 0.08) + 0) / 2)
    assert s["mape_px"] == pytest.approx(6.5)
    assert s["per_face"]["nme_inter-ocular"] == pytest.approx([0.0625, 0.1])


@pytest.mark.parametrize("call, exc, words", [
    (lambda: metrics.nme(np.zeros((68, 2)), np.zeros((67, 2))), ValueError, "shapes differ"),
    (lambda: metrics.nme(np.zeros((2, 68, 3)), np.zeros((2, 68, 3))), ValueError, "(B, n, 2)"),
    (lambda: metrics.nme(np.full((68, 2), np.nan), np.zeros((68, 2))), ValueError, "NaN"),
    (lambda: metrics.nme(np.zeros((68, 2)), np.zeros((68, 2))), ValueError, "degenerate"),
    (lambda: metrics.nme(_face(), _face(), "eyes"), ValueError, "norm"),
    (lambda: metrics.normalizer(np.ones((5, 2)) * np.arange(5)[:, None], "inter-ocular"), ValueError, "68-point"),
    (lambda: metrics.auc([]), ValueError, "empty"),
    (lambda: metrics.auc([0.1, -0.1]), ValueError, ">= 0"),
    (lambda: metrics.auc([0.1], 0), ValueError, "max_error"),
    (lambda: metrics.failure_rate([[0.1]]), ValueError, "1-D"),
    (lambda: metrics.failure_rate([0.1], float("nan")), ValueError, "threshold"),
    (lambda: metrics.visibility_pr([0.1, 0.2], [1, 0, 1]), ValueError, "equal"),
    (lambda: metrics.visibility_pr([0.1, 0.2], [2, 0]), ValueError, "0/1"),
    (lambda: metrics.nme("abc", _face()), TypeError, "pred"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=None) as ei:
        call()
    assert words in str(ei.value)
