"""functional.py, the reference tier: every forward/backward pair against naive loop oracles, and
the element-wise finite-difference check in float64 (relative error < 1e-6) for inputs and
parameters. (tests/test_kernels.py holds the fast tier to this one.)"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import (assert_check, away_from_zero, batch_norm_naive, conv2d_naive, dev, host,
                     im2col_naive)
from minisd import backend
from minisd import functional as F
from minisd.gradcheck import check_pair

TOL = 1e-6

# (kernel, stride, padding): 1x1 and 3x3, stride 1 and 2, padding 0 and 1, and non-square
# kernel / stride / padding.
CONV_CONFIGS = [
    (1, 1, 0),
    (1, 1, 1),
    (1, 2, 0),
    (3, 1, 0),
    (3, 1, 1),
    (3, 2, 0),
    (3, 2, 1),
    ((2, 3), (1, 2), (0, 1)),
    ((3, 1), (2, 1), (1, 0)),
]
CONV_IDS = [f"k{k}-s{s}-p{p}" for k, s, p in CONV_CONFIGS]


def _kshape(k):
    return (k, k) if isinstance(k, int) else k


# ------------------------------------------------------------------------------------------------
# im2col / col2im
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_im2col_matches_loops(rng, k, s, p):
    x = rng.standard_normal((2, 3, 5, 6))
    cols = F.im2col(dev(x), k, s, p)
    np.testing.assert_array_equal(host(cols), im2col_naive(x, k, s, p))


def test_im2col_of_channel_major_view_matches_contiguous(rng):
    x = rng.standard_normal((2, 3, 5, 5))
    view = dev(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)  # channel-major
    np.testing.assert_array_equal(host(F.im2col(view, 3, 1, 1)), im2col_naive(x, 3, 1, 1))


@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_col2im_is_the_adjoint_of_im2col(rng, k, s, p):
    """<im2col(x), c> == <x, col2im(c)> for random x and c: col2im is the transpose of im2col."""
    shape = (2, 3, 5, 6)
    x = rng.standard_normal(shape)
    cols_shape = im2col_naive(x, k, s, p).shape
    c = rng.standard_normal(cols_shape)
    lhs = float(np.sum(host(F.im2col(dev(x), k, s, p)) * c))
    back = host(F.col2im(dev(c), shape, k, s, p))
    assert back.shape == shape
    rhs = float(np.sum(x * back))
    assert abs(lhs - rhs) <= 1e-12 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_im2col_gradcheck_with_col2im_as_backward(rng, k, s, p):
    def forward(x):
        return F.im2col(x, k, s, p), x.shape

    def backward(dcols, shape):
        return F.col2im(dcols, shape, k, s, p)

    assert_check(check_pair(forward, backward, {"x": dev(rng.standard_normal((2, 2, 4, 5)))}, tol=TOL))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_im2col_col2im_preserve_dtype(rng, dtype):
    x = dev(rng.standard_normal((2, 3, 4, 4)).astype(dtype))
    cols = F.im2col(x, 3, 1, 1)
    assert cols.dtype == np.dtype(dtype)
    assert F.col2im(cols, x.shape, 3, 1, 1).dtype == np.dtype(dtype)


def test_im2col_kernel_larger_than_padded_input_is_an_error(rng):
    x = dev(rng.standard_normal((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="im2col.*larger than the padded input"):
        F.im2col(x, 5, 1, 0)
    assert F.im2col(x, 5, 1, 1).shape == (25, 1)  # 3 + 2*1 = 5 fits exactly


def test_col2im_rejects_wrong_column_shape(rng):
    with pytest.raises(ValueError, match="col2im"):
        F.col2im(dev(np.zeros((9, 5))), (1, 1, 4, 4), 3, 1, 0)


# ------------------------------------------------------------------------------------------------
# conv2d
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_conv2d_forward_matches_nested_loops(rng, k, s, p, bias):
    kh, kw = _kshape(k)
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, kh, kw))
    b = rng.standard_normal(4) if bias else None
    y, _ = F.conv2d_forward(dev(x), dev(w), None if b is None else dev(b), s, p)
    expected = conv2d_naive(x, w, b, s, p)
    assert y.shape == expected.shape
    np.testing.assert_allclose(host(y), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_conv2d_gradcheck(rng, k, s, p, bias):
    kh, kw = _kshape(k)
    inputs = {
        "x": dev(rng.standard_normal((2, 3, 5, 6))),
        "weight": dev(rng.standard_normal((2, 3, kh, kw))),
        "bias": dev(rng.standard_normal(2)) if bias else None,
    }
    result = assert_check(check_pair(F.conv2d_forward, F.conv2d_backward, inputs,
                                     kwargs={"stride": s, "padding": p}, tol=TOL))
    assert set(result.errors) == ({"x", "weight", "bias"} if bias else {"x", "weight"})


def test_conv2d_backward_matches_loop_oracle_gradients(rng):
    """dW and dx from the definition, by loops: dW[o,c,i,j] = sum dy[n,o,p,q] x_pad[n,c,p*s+i,q*s+j]."""
    x = rng.standard_normal((2, 2, 5, 4))
    w = rng.standard_normal((3, 2, 3, 2))
    dy_shape = conv2d_naive(x, w, None, (2, 1), (1, 0)).shape
    dy = rng.standard_normal(dy_shape)
    _, cache = F.conv2d_forward(dev(x), dev(w), None, (2, 1), (1, 0))
    dx, dw, db = F.conv2d_backward(dev(dy), cache)
    assert db is None
    xpad = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
    dw_ref = np.zeros_like(w)
    dxpad = np.zeros_like(xpad)
    for n in range(dy.shape[0]):
        for o in range(dy.shape[1]):
            for p in range(dy.shape[2]):
                for q in range(dy.shape[3]):
                    patch = (slice(None), slice(2 * p, 2 * p + 3), slice(q, q + 2))
                    dw_ref[o] += dy[n, o, p, q] * xpad[n][patch]
                    dxpad[n][patch] += dy[n, o, p, q] * w[o]
    np.testing.assert_allclose(host(dw), dw_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(host(dx), dxpad[:, :, 1:-1, :], rtol=1e-10, atol=1e-12)


def test_conv2d_float32_in_float32_out(rng):
    x = dev(rng.standard_normal((2, 3, 5, 5)).astype("float32"))
    w = dev(rng.standard_normal((4, 3, 3, 3)).astype("float32"))
    b = dev(rng.standard_normal(4).astype("float32"))
    y, cache = F.conv2d_forward(x, w, b, 2, 1)
    grads = F.conv2d_backward(dev(np.ones(y.shape, dtype="float32")), cache)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


# ------------------------------------------------------------------------------------------------
# batch norm
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 3)], ids=["NCHW", "NC"])
def test_batch_norm_training_forward_matches_formula(rng, shape):
    x = rng.standard_normal(shape) * 3 + 1
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    y, cache = F.batch_norm_forward(dev(x), dev(gamma), dev(beta), dev(np.zeros(3)), dev(np.ones(3)), True, 1e-5)
    y_ref, bmean, bvar, _ = batch_norm_naive(x, gamma, beta, 1e-5)
    np.testing.assert_allclose(host(y), y_ref, rtol=1e-10, atol=1e-12)
    # the cache carries the batch mean and the biased variance (for the running estimates)
    np.testing.assert_allclose(host(cache.mean), bmean, rtol=1e-12)
    np.testing.assert_allclose(host(cache.var), bvar, rtol=1e-12)


@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (6, 3)], ids=["NCHW", "NC"])
def test_batch_norm_eval_forward_uses_running_stats(rng, shape):
    x = rng.standard_normal(shape)
    gamma, beta = rng.standard_normal(3), rng.standard_normal(3)
    rmean, rvar = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    y, _ = F.batch_norm_forward(dev(x), dev(gamma), dev(beta), dev(rmean), dev(rvar), False, 1e-5)
    y_ref, *_ = batch_norm_naive(x, gamma, beta, 1e-5, mean=rmean, var=rvar)
    np.testing.assert_allclose(host(y), y_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (5, 2)], ids=["NCHW", "NC"])
def test_batch_norm_gradcheck(rng, shape, training):
    inputs = {
        "x": dev(rng.standard_normal(shape)),
        "gamma": dev(rng.standard_normal(2)),
        "beta": dev(rng.standard_normal(2)),
        "running_mean": dev(rng.standard_normal(2)),
        "running_var": dev(rng.uniform(0.5, 2.0, 2)),
    }
    result = assert_check(check_pair(F.batch_norm_forward, F.batch_norm_backward, inputs,
                                     grad_names=["x", "gamma", "beta"],
                                     kwargs={"training": training}, tol=TOL))
    assert set(result.errors) == {"x", "gamma", "beta"}


def test_running_stats_follow_pytorch_by_hand():
    """Channel values 1, 2, 3, 4: mean 2.5, unbiased variance 5/3 (biased 1.25).

    PyTorch's BatchNorm (momentum 0.1) from running (0, 1): mean 0.25, var 0.9 + 0.1 * 5/3.
    """
    x = dev(np.array([[1.0], [2.0], [3.0], [4.0]]))
    rm, rv = dev(np.zeros(1)), dev(np.ones(1))
    _, cache = F.batch_norm_forward(x, dev(np.ones(1)), dev(np.zeros(1)), rm, rv, True)
    F.update_running_stats(rm, rv, cache, momentum=0.1)
    np.testing.assert_allclose(host(rm), [0.25], rtol=1e-14)
    np.testing.assert_allclose(host(rv), [0.9 + 0.1 * 5.0 / 3.0], rtol=1e-14)


def test_running_stats_unbiased_variance_over_n_h_w(rng):
    x = rng.standard_normal((3, 2, 4, 5)) * 2 + 0.5
    rm0, rv0 = rng.standard_normal(2), rng.uniform(0.5, 2, 2)
    rm, rv = dev(rm0.copy()), dev(rv0.copy())
    _, cache = F.batch_norm_forward(dev(x), dev(np.ones(2)), dev(np.zeros(2)), rm, rv, True)
    F.update_running_stats(rm, rv, cache, momentum=0.3)
    _, bmean, _, uvar = batch_norm_naive(x, np.ones(2), np.zeros(2))
    np.testing.assert_allclose(host(rm), 0.7 * rm0 + 0.3 * bmean, rtol=1e-12)
    np.testing.assert_allclose(host(rv), 0.7 * rv0 + 0.3 * uvar, rtol=1e-12)


def test_running_stats_unchanged_by_an_eval_cache(rng):
    rm, rv = dev(np.array([0.5, -1.0])), dev(np.array([2.0, 3.0]))
    _, cache = F.batch_norm_forward(dev(rng.standard_normal((4, 2))), dev(np.ones(2)), dev(np.zeros(2)), rm, rv, False)
    F.update_running_stats(rm, rv, cache)
    np.testing.assert_array_equal(host(rm), [0.5, -1.0])
    np.testing.assert_array_equal(host(rv), [2.0, 3.0])


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_float32_in_float32_out(rng, training):
    f32 = lambda a: dev(np.asarray(a, dtype="float32"))  # noqa: E731
    rm, rv = f32(np.zeros(3)), f32(np.ones(3))
    y, cache = F.batch_norm_forward(f32(rng.standard_normal((4, 3, 2, 2))), f32(np.ones(3)), f32(np.zeros(3)),
                                    rm, rv, training)
    F.update_running_stats(rm, rv, cache)
    grads = F.batch_norm_backward(f32(rng.standard_normal(y.shape)), cache)
    assert y.dtype == np.float32 and rm.dtype == np.float32 and rv.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads)


# ------------------------------------------------------------------------------------------------
# relu, linear, global average pool
# ------------------------------------------------------------------------------------------------


def test_relu_forward_and_backward_values(rng):
    x = away_from_zero(rng.standard_normal((2, 3, 4)))
    y, cache = F.relu_forward(dev(x))
    np.testing.assert_array_equal(host(y), np.maximum(x, 0))
    dy = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(host(F.relu_backward(dev(dy), cache)), dy * (x > 0))


def test_relu_gradcheck(rng):
    x = dev(away_from_zero(rng.standard_normal((2, 3, 4, 4))))
    assert_check(check_pair(F.relu_forward, F.relu_backward, {"x": x}, tol=TOL))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_gradcheck(rng, bias):
    x, w = rng.standard_normal((4, 5)), rng.standard_normal((3, 5))
    b = rng.standard_normal(3) if bias else None
    y, _ = F.linear_forward(dev(x), dev(w), None if b is None else dev(b))
    np.testing.assert_allclose(host(y), x @ w.T + (0 if b is None else b), rtol=1e-12)
    inputs = {"x": dev(x), "weight": dev(w), "bias": None if b is None else dev(b)}
    assert_check(check_pair(F.linear_forward, F.linear_backward, inputs, tol=TOL))


def test_global_avg_pool_forward_and_gradcheck(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    y, _ = F.global_avg_pool_forward(dev(x))
    np.testing.assert_allclose(host(y), x.mean(axis=(2, 3)), rtol=1e-12)
    assert_check(check_pair(F.global_avg_pool_forward, F.global_avg_pool_backward, {"x": dev(x)}, tol=TOL))


def test_relu_linear_pool_float32(rng):
    x32 = dev(rng.standard_normal((2, 3, 4, 4)).astype("float32"))
    y, c = F.relu_forward(x32)
    assert y.dtype == np.float32 and F.relu_backward(y, c).dtype == np.float32
    p, c = F.global_avg_pool_forward(x32)
    assert p.dtype == np.float32 and F.global_avg_pool_backward(p, c).dtype == np.float32
    w = dev(rng.standard_normal((2, 3)).astype("float32"))
    b = dev(np.zeros(2, dtype="float32"))
    z, c = F.linear_forward(p, w, b)
    assert z.dtype == np.float32
    assert all(g.dtype == np.float32 for g in F.linear_backward(z, c))


# ------------------------------------------------------------------------------------------------
# The transition shortcut
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(4, 4), (5, 7)])
@pytest.mark.parametrize("stride", [1, 2])
def test_shortcut_forward_matches_definition(rng, hw, stride):
    x = rng.standard_normal((2, 3) + hw)
    y, _ = F.shortcut_forward(dev(x), 5, stride)
    ho, wo = -(-hw[0] // stride), -(-hw[1] // stride)  # ceil
    expected = np.zeros((2, 5, ho, wo))
    for n in range(2):
        for c in range(3):
            for i in range(ho):
                for j in range(wo):
                    expected[n, c, i, j] = x[n, c, i * stride, j * stride]
    np.testing.assert_array_equal(host(y), expected)


@pytest.mark.parametrize("stride", [1, 2])
def test_shortcut_gradcheck(rng, stride):
    x = dev(rng.standard_normal((2, 3, 5, 4)))
    assert_check(check_pair(F.shortcut_forward, F.shortcut_backward, {"x": x},
                            kwargs={"out_channels": 6, "stride": stride}, tol=TOL))


def test_shortcut_rejects_fewer_output_channels(rng):
    with pytest.raises(ValueError, match="shortcut"):
        F.shortcut_forward(dev(rng.standard_normal((1, 4, 2, 2))), 2)


def test_shortcut_float32(rng):
    y, c = F.shortcut_forward(dev(rng.standard_normal((1, 2, 4, 4)).astype("float32")), 4)
    assert y.dtype == np.float32 and F.shortcut_backward(y, c).dtype == np.float32


# ------------------------------------------------------------------------------------------------
# softmax cross entropy
# ------------------------------------------------------------------------------------------------


def _ce_oracle(logits, labels):
    total = 0.0
    for row, label in zip(logits, labels):
        m = max(row)
        log_z = m + np.log(sum(np.exp(v - m) for v in row))
        total += log_z - row[label]
    return total / len(labels)


def test_softmax_cross_entropy_matches_definition(rng):
    logits = rng.standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss, _ = F.softmax_cross_entropy_forward(dev(logits), dev(labels))
    assert host(loss).shape == ()
    np.testing.assert_allclose(float(host(loss)), _ce_oracle(logits, labels), rtol=1e-12)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 999.0]])
    labels = np.array([0, 2])
    loss, cache = F.softmax_cross_entropy_forward(dev(logits), dev(labels))
    expected = (0.0 + np.log1p(np.exp(-1.0)) + 1.0) / 2
    np.testing.assert_allclose(float(host(loss)), expected, rtol=1e-12)
    d = host(F.softmax_cross_entropy_backward(1.0, cache))
    assert np.all(np.isfinite(d))


def test_softmax_cross_entropy_gradcheck(rng):
    inputs = {"logits": dev(rng.standard_normal((4, 5))), "labels": dev(np.array([4, 0, 2, 2]))}
    result = assert_check(check_pair(F.softmax_cross_entropy_forward, F.softmax_cross_entropy_backward,
                                     inputs, tol=TOL))
    assert set(result.errors) == {"logits"}  # integer labels are passed through, not checked


def test_softmax_cross_entropy_backward_values_and_dloss_scaling(rng):
    logits = rng.standard_normal((3, 4))
    labels = np.array([1, 0, 3])
    _, cache = F.softmax_cross_entropy_forward(dev(logits), dev(labels))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    onehot = np.eye(4)[labels]
    np.testing.assert_allclose(host(F.softmax_cross_entropy_backward(1.0, cache)), (probs - onehot) / 3, rtol=1e-12)
    np.testing.assert_allclose(host(F.softmax_cross_entropy_backward(2.5, cache)),
                               2.5 * (probs - onehot) / 3, rtol=1e-12)


def test_softmax_cross_entropy_float32(rng):
    loss, cache = F.softmax_cross_entropy_forward(dev(rng.standard_normal((3, 4)).astype("float32")),
                                                  dev(np.array([0, 1, 2])))
    assert loss.dtype == np.float32
    assert F.softmax_cross_entropy_backward(1.0, cache).dtype == np.float32


@pytest.mark.parametrize("logits_shape,labels,match", [
    ((3, 4, 1), np.array([0, 1, 2]), "logits of shape"),
    ((3, 4), np.array([0, 1]), "labels of shape"),
    ((3, 4), np.array([0.0, 1.0, 2.0]), "integer labels"),
])
def test_softmax_cross_entropy_input_errors(logits_shape, labels, match):
    with pytest.raises(ValueError, match=match):
        F.softmax_cross_entropy_forward(dev(np.zeros(logits_shape)), dev(labels))


# ------------------------------------------------------------------------------------------------
# The habit: a backward never writes into the gradient it was given
# ------------------------------------------------------------------------------------------------


def test_no_backward_writes_into_its_dout(rng):
    x4 = dev(away_from_zero(rng.standard_normal((2, 3, 4, 4))))
    cases = [
        (F.conv2d_forward(x4, dev(rng.standard_normal((3, 3, 3, 3))), dev(np.zeros(3)), 1, 1), F.conv2d_backward),
        (F.batch_norm_forward(x4, dev(np.ones(3)), dev(np.zeros(3)), dev(np.zeros(3)), dev(np.ones(3)), True),
         F.batch_norm_backward),
        (F.relu_forward(x4), F.relu_backward),
        (F.global_avg_pool_forward(x4), F.global_avg_pool_backward),
        (F.shortcut_forward(x4, 6, 2), F.shortcut_backward),
        (F.linear_forward(dev(rng.standard_normal((2, 3))), dev(rng.standard_normal((4, 3))), dev(np.zeros(4))),
         F.linear_backward),
    ]
    for (out, cache), backward in cases:
        dout_host = rng.standard_normal(out.shape)
        dout = dev(dout_host)
        backward(dout, cache)
        np.testing.assert_array_equal(host(dout), dout_host, err_msg=backward.__name__)


@pytest.mark.parametrize("bad", [-1, 3])
def test_cross_entropy_rejects_labels_outside_the_classes(bad):
    logits = dev(np.zeros((2, 3)))
    labels = dev(np.array([0, bad]))
    if backend.is_device_array(labels):  # on the GPU: a NaN loss, no read-back of the labels
        loss, _ = F.softmax_cross_entropy_forward(logits, labels)
        assert np.isnan(float(host(loss)))
        return
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: expected labels in \[0, 3\)"):
        F.softmax_cross_entropy_forward(logits, labels)
