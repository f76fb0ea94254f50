"""Independent oracles for the equations: values worked out by hand from DESIGN.md on tiny
inputs (a 3x3 patch, a 2-point model), not from ``ectfast.core._reference``.

Every backend is compared with the reference elsewhere; these tests pin the reference (and the
cpu backend, directly) to the equations themselves: Eq. 15 (confidence), Eq. 9 (kernel variance
and mean shift), Eqs. 14 / 8 (the regularised projection). The hand derivations are in the
comments; the test code only evaluates the closed forms."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

import ectfast
from ectfast.core import _reference as R

OPS = [R.ReferenceOps()]
if "cpu" in ectfast.backends():
    from ectfast.core._cpu import CpuOps

    OPS.append(CpuOps())


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------ Eq. 15: confidence

XS = np.array([4.0, 5.0, 6.0])
YS = np.array([7.0, 8.0, 9.0])


def test_confidence_of_a_symmetric_cross():
    # patch  0 1 0      S = 6; x-marginal (1, 4, 1) / 6 on x = 4, 5, 6: mean 5,
    #        1 2 1      variance (1 * 1 + 1 * 1) / 6 = 1/3, sigma_x = 1/sqrt(3); the same in y.
    #        0 1 0      w = sigmoid(a (S / sigma - b)) = sigmoid(a (6 sqrt(3) - b))
    patch = np.array([[0, 1, 0], [1, 2, 1], [0, 1, 0]], float)
    a, b = 0.25, 10.0
    want = sigmoid(a * (6 * math.sqrt(3) - b))
    wx, wy = R.confidence(patch, XS, YS, a, b)
    assert wx == pytest.approx(want, rel=1e-14) and wy == pytest.approx(want, rel=1e-14)
    assert want == pytest.approx(0.52450, abs=1e-5)  # sigmoid(0.25 * 0.39230)


def test_confidence_of_a_single_row():
    # patch  0 0 0      S = 6; x-marginal (1, 2, 3) / 6: mean 16/3,
    #        1 2 3      variance (1 (4 - 16/3)^2 + 2 (5 - 16/3)^2 + 3 (6 - 16/3)^2) / 6
    #        0 0 0               = (16/9 + 2/9 + 12/9) / 6 = 5/9, sigma_x = sqrt(5)/3.
    # y: all mass in row 8, sigma_y = 0 exactly -> w_y = 0 (the guard).
    patch = np.array([[0, 0, 0], [1, 2, 3], [0, 0, 0]], float)
    a, b = 0.25, 25.0
    wx, wy = R.confidence(patch, XS, YS, a, b)
    assert wx == pytest.approx(sigmoid(a * (6 / (math.sqrt(5) / 3) - b)), rel=1e-14)
    assert wy == 0.0
    assert R.confidence(np.zeros((3, 3)), XS, YS, a, b) == (0.0, 0.0)  # S = 0: weight 0


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
def test_weights_op_on_a_map(ops):
    # a 7x7 map holding the cross of the first test around pixel (3, 2), with a negative value
    # in the patch (clamped to 0) and a large value outside it (ignored); r = 2 -> 3x3 patch.
    m = np.zeros((1, 1, 7, 7))
    m[0, 0, 1:4, 2:5] = [[0, 1, 0], [1, 2, 1], [0, 1, -5]]
    m[0, 0, 6, 6] = 100.0
    a, b = 0.25, 10.0
    # with the -5 clamped: the same cross but the (4, 3) corner is 0 (it was 0 anyway)
    want = sigmoid(a * (6 * math.sqrt(3) - b))
    w = ops.weights(m, np.array([[[3.4, 1.6]]]), 2, a, b)  # centre pixel (3, 2): round half up
    np.testing.assert_allclose(w, [[[want, want]]], rtol=1e-13)
    assert ops.confidence_of(w)[0, 0] == pytest.approx(want, rel=1e-13)


# ------------------------------------------------------------------ Eq. 9: kernel variance


def test_kernel_variance():
    # rho_i = 2 rho / (w_x + w_y): 2 * 20 / (0.2 + 0.6) = 50; unweighted: rho
    assert R.kernel_variance(0.2, 0.6, 20.0, True) == pytest.approx(50.0, rel=1e-15)
    assert R.kernel_variance(1.0, 1.0, 20.0, True) == 20.0  # full confidence: rho itself
    assert R.kernel_variance(0.2, 0.6, 20.0, False) == 20.0


# ------------------------------------------------------------------ Eq. 9: mean shift


def test_mean_shift_equal_distances():
    # pi: 1 at (4, 8), 3 at (6, 8); x = (5, 8): both at distance 1, the same kernel value, so
    # omega = (1/4, 3/4) and sum omega y = (4/4 + 18/4, 8) = (5.5, 8): v = (0.5, 0)
    patch = np.array([[0, 0, 0], [1, 0, 3], [0, 0, 0]], float)
    vx, vy = R.mean_shift(patch, XS, YS, 5.0, 8.0, 2.0)
    assert vx == pytest.approx(0.5, rel=1e-14) and vy == pytest.approx(0.0, abs=1e-15)


def test_mean_shift_kernel_weights():
    # x = (4.5, 8), rho_i = 2: squared distances 0.25 and 2.25, kernel exp(-d^2 / 4):
    # omega ∝ (1 e^{-1/16}, 3 e^{-9/16}); v_x = (4 e^{-1/16} + 18 e^{-9/16}) / (e^{-1/16} + 3 e^{-9/16}) - 4.5
    patch = np.array([[0, 0, 0], [1, 0, 3], [0, 0, 0]], float)
    k1, k2 = math.exp(-1 / 16), math.exp(-9 / 16)
    want = (4 * k1 + 18 * k2) / (k1 + 3 * k2) - 4.5
    vx, vy = R.mean_shift(patch, XS, YS, 4.5, 8.0, 2.0)
    assert vx == pytest.approx(want, rel=1e-14) and vy == pytest.approx(0.0, abs=1e-15)
    assert R.mean_shift(np.zeros((3, 3)), XS, YS, 4.5, 8.0, 2.0) == (0.0, 0.0)  # empty patch: v = 0


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("weighted", [True, False])
def test_mean_shift_op_chains_eqs_15_and_9(ops, weighted):
    # map 7x7: 1 at (x=2, y=3), 3 at (x=4, y=3); point (3.2, 3) -> centre pixel (3, 3), r = 2:
    # the 3x3 patch holds both. Eq. 15: S = 4, x-marginal (1, 0, 3) / 4 on x = 2, 3, 4: mean 3.5,
    # variance (1.5^2 + 3 * 0.5^2) / 4 = 0.75; y in one row: w_y = 0.
    # w_x = sigmoid(a (4 / sqrt(0.75) - b)); rho_i = 2 rho / (w_x + 0) (weighted) or rho.
    # Eq. 9: squared distances 1.44 and 0.64, kernel exp(-d^2 / (2 rho_i)):
    # t_x = (2 k1 + 12 k2) / (k1 + 3 k2), t_y = 3.
    m = np.zeros((1, 1, 7, 7))
    m[0, 0, 3, 2], m[0, 0, 3, 4] = 1.0, 3.0
    a, b, rho = 0.25, 1.0, 1.0
    wx = sigmoid(a * (4 / math.sqrt(0.75) - b))
    rho_i = 2 * rho / wx if weighted else rho
    k1, k2 = math.exp(-1.44 / (2 * rho_i)), math.exp(-0.64 / (2 * rho_i))
    tx = (2 * k1 + 12 * k2) / (k1 + 3 * k2)
    w, t = ops.mean_shift(m, np.array([[[3.2, 3.0]]]), 2, a, b, rho, weighted)
    np.testing.assert_allclose(w, [[[wx, 0.0]]] if weighted else [[[1.0, 1.0]]], rtol=1e-13)
    np.testing.assert_allclose(t, [[[tx, 3.0]]], rtol=1e-13)
    assert wx == pytest.approx(0.7119, abs=1e-4)


# ------------------------------------------------------------------ Eqs. 14 / 8: projection

# A 2-point model (2n = 4 coordinates x0, y0, x1, y1) with k = 2 orthonormal modes:
# u1 = (1, 0, 1, 0)/sqrt2 (x translation, no prior), u2 = (1, 0, -1, 0)/sqrt2 (x stretch, lambda = 4).
S2 = np.array([[1, 1], [0, 0], [1, -1], [0, 0]], float) / math.sqrt(2)
PRIOR2 = np.array([0.0, 0.25])
MEAN2 = np.zeros(4)


def test_regularized_projection_by_hand():
    # W = diag(1, 1, 0.5, 0.5), lam = 2, eps = 0, t = (2, 5, 4, 7):
    # S^T W S = [[0.75, 0.25], [0.25, 0.75]], + lam diag(0, 0.25) -> A = [[0.75, 0.25], [0.25, 1.25]]
    # S^T W t: W t = (2, 5, 2, 3.5) -> (4/sqrt2, 0) = (2 sqrt2, 0); det A = 0.875
    # p = A^-1 rhs = (1.25 * 2 sqrt2, -0.25 * 2 sqrt2) / 0.875 = (20 sqrt2 / 7, -4 sqrt2 / 7)
    w = np.array([1, 1, 0.5, 0.5])
    t = np.array([2.0, 5.0, 4.0, 7.0])
    p = R.regularized_projection(S2, MEAN2, PRIOR2, 2.0, w, t, np.zeros(2), 0.0)
    np.testing.assert_allclose(p, [20 * math.sqrt(2) / 7, -4 * math.sqrt(2) / 7], rtol=1e-14)
    # eps pulls the first (up to 4) parameters to x0 only where nothing else decides them:
    # no weight and lam = 0 leave A = eps I, rhs = eps x0 -> p = x0
    x0 = np.array([3.0, -1.0])
    np.testing.assert_allclose(R.regularized_projection(S2, MEAN2, PRIOR2, 0.0, np.zeros(4), t, x0, 1e-6),
                               x0, rtol=1e-12)


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
def test_project_op_by_hand(ops):
    model = SimpleNamespace(basis=S2, mean=MEAN2.reshape(2, 2), prior_inverse=PRIOR2, n_landmarks=2,
                            n_params=2)
    w = np.array([[[1, 1], [0.5, 0.5]]], float)
    t = np.array([[[2.0, 5.0], [4.0, 7.0]]])
    p = ops.project(model, w, t, 2.0, np.zeros((1, 2)), 0.0)
    np.testing.assert_allclose(p, [[20 * math.sqrt(2) / 7, -4 * math.sqrt(2) / 7]], rtol=1e-13)
    # W = I (w None): S^T S = I, A = diag(1, 1.5); rhs = (6/sqrt2, -2/sqrt2) -> p = (3 sqrt2, -2 sqrt2 / 3)
    p = ops.project(model, None, t, 2.0, np.zeros((1, 2)), 0.0)
    np.testing.assert_allclose(p, [[3 * math.sqrt(2), -2 * math.sqrt(2) / 3]], rtol=1e-13)


def test_projection_is_eq_8s_update():
    # Eq. 8: Delta p = -(rho~ L + S^T W S)^-1 (rho~ L p - S^T W v) with L = diag(prior_inv) and
    # v = the mean-shift vectors at s = mean + S p. The implementation solves for p + Delta p
    # directly from the targets t = s + v; the two are algebraically equal:
    # (rho~ L + S^T W S)(p + Delta p) = S^T W S p + S^T W v = S^T W (t - mean).
    rng = np.random.default_rng(3)
    p = np.array([1.5, -0.7])
    v = rng.normal(0, 1, 4)
    w = np.array([0.9, 0.1, 0.4, 0.7])
    rho_t = 1.1
    s = MEAN2 + S2 @ p
    A = rho_t * np.diag(PRIOR2) + S2.T @ np.diag(w) @ S2
    delta = -np.linalg.solve(A, rho_t * np.diag(PRIOR2) @ p - S2.T @ (w * v))
    got = R.regularized_projection(S2, MEAN2, PRIOR2, rho_t, w, s + v, p, 0.0)
    np.testing.assert_allclose(got, p + delta, rtol=1e-12)
