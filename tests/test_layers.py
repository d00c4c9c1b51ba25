"""layers.py: element-wise gradient checks of every layer (float64), oracles, dtypes, errors that
name the layer, and the module tree (names, state dicts, zero_grad, train/eval, to)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_check, away_from_zero, batch_norm_naive, conv2d_naive, dev, host
from minisd import backend, layers
from minisd.gradcheck import check_module

# Finite-difference checks verify the math, which lives in the reference tier (tests/test_kernels.py
# holds the fast tier to it, with a few checks of its own).
pytestmark = pytest.mark.usefixtures("reference_tier")

TOL = 1e-6
F64 = "float64"

CONV_CONFIGS = [
    (1, 1, 0), (1, 2, 1), (3, 1, 0), (3, 1, 1), (3, 2, 0), (3, 2, 1),
    ((2, 3), (1, 2), (0, 1)),
    ((3, 1), (2, 1), (1, 0)),
]
CONV_IDS = [f"k{k}-s{s}-p{p}" for k, s, p in CONV_CONFIGS]


def _small_net(dtype=F64, bias=True):
    return layers.Sequential(
        layers.Conv2d(2, 3, 3, 1, 1, bias=bias, dtype=dtype),
        layers.BatchNorm2d(3, dtype=dtype),
        layers.ReLU(),
        layers.GlobalAvgPool2d(),
        layers.Linear(3, 4, dtype=dtype),
    )


# ------------------------------------------------------------------------------------------------
# Element-wise gradient checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_conv2d_layer_gradcheck(rng, k, s, p, bias):
    layer = layers.Conv2d(3, 2, k, s, p, bias=bias, dtype=F64)
    result = assert_check(check_module(layer, dev(rng.standard_normal((2, 3, 5, 6))), tol=TOL))
    assert set(result.errors) == ({"input", "weight", "bias"} if bias else {"input", "weight"})


@pytest.mark.parametrize("k,s,p", CONV_CONFIGS, ids=CONV_IDS)
def test_conv2d_layer_matches_nested_loops(rng, k, s, p):
    layer = layers.Conv2d(3, 4, k, s, p, dtype=F64)
    x = rng.standard_normal((2, 3, 5, 6))
    expected = conv2d_naive(x, host(layer.params["weight"]), host(layer.params["bias"]), s, p)
    np.testing.assert_allclose(host(layer(dev(x))), expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (5, 2)], ids=["NCHW", "NC"])
def test_batchnorm_layer_gradcheck(rng, shape, training):
    bn = layers.BatchNorm2d(2, dtype=F64)
    bn.params["weight"][...] = dev(rng.standard_normal(2))
    bn.params["bias"][...] = dev(rng.standard_normal(2))
    bn.buffers["running_mean"][...] = dev(rng.standard_normal(2))
    bn.buffers["running_var"][...] = dev(rng.uniform(0.5, 2, 2))
    bn.train(training)
    result = assert_check(check_module(bn, dev(rng.standard_normal(shape)), tol=TOL))
    assert set(result.errors) == {"input", "weight", "bias"}


def test_relu_layer_gradcheck(rng):
    assert_check(check_module(layers.ReLU(), dev(away_from_zero(rng.standard_normal((2, 3, 4, 4)))), tol=TOL))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_layer_gradcheck(rng, bias):
    assert_check(check_module(layers.Linear(5, 3, bias=bias, dtype=F64), dev(rng.standard_normal((4, 5))), tol=TOL))


def test_global_avg_pool_layer_gradcheck(rng):
    assert_check(check_module(layers.GlobalAvgPool2d(), dev(rng.standard_normal((2, 3, 4, 5))), tol=TOL))


def test_identity_layer_gradcheck(rng):
    assert_check(check_module(layers.Identity(), dev(rng.standard_normal((2, 3))), tol=TOL))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sequential_gradcheck(rng, training):
    # No conv bias in training mode: a training batch norm subtracts the batch mean, so the
    # gradient of a bias just before it is exactly zero, and relative error is meaningless for an
    # exact zero (the numerical side is rounding noise); see the next test.
    net = _small_net(bias=not training).train(training)
    result = assert_check(check_module(net, dev(rng.standard_normal((3, 2, 4, 4))), tol=TOL))
    expected = {"input", "0.weight", "1.weight", "1.bias", "4.weight", "4.bias"}
    assert set(result.errors) == (expected if training else expected | {"0.bias"})


def test_conv_bias_before_training_batchnorm_gets_zero_gradient(rng):
    net = _small_net(bias=True)
    y = net(dev(rng.standard_normal((3, 2, 4, 4))))
    net.backward(dev(rng.standard_normal(y.shape)))
    assert np.max(np.abs(host(net[0].grads["bias"]))) < 1e-12
    assert np.max(np.abs(host(net[0].grads["weight"]))) > 1e-3


# ------------------------------------------------------------------------------------------------
# Batch norm: formula, running statistics as PyTorch keeps them
# ------------------------------------------------------------------------------------------------


def test_batchnorm_defaults_match_pytorch():
    bn = layers.BatchNorm2d(3)
    assert bn.eps == 1e-5 and bn.momentum == 0.1
    np.testing.assert_array_equal(host(bn.params["weight"]), np.ones(3))
    np.testing.assert_array_equal(host(bn.params["bias"]), np.zeros(3))
    np.testing.assert_array_equal(host(bn.buffers["running_mean"]), np.zeros(3))
    np.testing.assert_array_equal(host(bn.buffers["running_var"]), np.ones(3))


def test_batchnorm_running_stats_pytorch_convention_over_steps(rng):
    """running = 0.9 running + 0.1 batch_stat, the unbiased variance in running_var; eval uses them."""
    bn = layers.BatchNorm2d(2, dtype=F64)
    rm, rv = np.zeros(2), np.ones(2)
    for step in range(3):
        x = rng.standard_normal((3, 2, 2, 3)) * (step + 1) + step
        y = bn(dev(x))
        y_ref, bmean, _, uvar = batch_norm_naive(x, np.ones(2), np.zeros(2))
        np.testing.assert_allclose(host(y), y_ref, rtol=1e-10, atol=1e-12)  # batch statistics
        rm, rv = 0.9 * rm + 0.1 * bmean, 0.9 * rv + 0.1 * uvar
        np.testing.assert_allclose(host(bn.buffers["running_mean"]), rm, rtol=1e-12)
        np.testing.assert_allclose(host(bn.buffers["running_var"]), rv, rtol=1e-12)
    bn.eval()
    x = rng.standard_normal((2, 2, 2, 2))
    y_ref, *_ = batch_norm_naive(x, np.ones(2), np.zeros(2), 1e-5, mean=rm, var=rv)
    np.testing.assert_allclose(host(bn(dev(x))), y_ref, rtol=1e-10)
    np.testing.assert_allclose(host(bn.buffers["running_mean"]), rm, rtol=1e-12)  # eval leaves them


def test_batchnorm_training_needs_more_than_one_value_per_channel():
    bn = layers.BatchNorm2d(2)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        bn(dev(np.zeros((1, 2), dtype="float32")))
    bn.eval()
    assert bn(dev(np.zeros((1, 2), dtype="float32"))).shape == (1, 2)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------


def test_conv_kaiming_normal_fan_out_and_bias_bound():
    conv = layers.Conv2d(32, 64, 3, dtype=F64, rng=np.random.default_rng(0))
    w = host(conv.params["weight"])
    assert w.shape == (64, 32, 3, 3)
    expected_std = np.sqrt(2.0 / (64 * 3 * 3))  # fan_out = out_channels * kh * kw
    assert abs(w.std() / expected_std - 1) < 0.03
    assert abs(w.mean()) < 0.05 * expected_std  # standard error of the mean is 0.007 std
    b = host(conv.params["bias"])
    assert np.all(np.abs(b) <= 1 / np.sqrt(32 * 9))


def test_linear_init_bounds():
    lin = layers.Linear(50, 20, rng=np.random.default_rng(0))
    assert host(lin.params["weight"]).shape == (20, 50)
    bound = 1 / np.sqrt(50)
    assert np.all(np.abs(host(lin.params["weight"])) <= bound)
    assert host(lin.params["weight"]).std() > 0.5 * bound / np.sqrt(3)


# ------------------------------------------------------------------------------------------------
# dtypes: float32 in, float32 out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,shape", [
    (lambda: layers.Conv2d(3, 4, 3, 2, 1), (2, 3, 5, 5)),
    (lambda: layers.Conv2d(3, 4, (1, 3), (2, 1), (0, 1), bias=False), (2, 3, 5, 5)),
    (lambda: layers.BatchNorm2d(3), (2, 3, 4, 4)),
    (lambda: layers.BatchNorm2d(3).eval(), (2, 3, 4, 4)),
    (lambda: layers.BatchNorm2d(3), (4, 3)),
    (lambda: layers.ReLU(), (2, 3, 4, 4)),
    (lambda: layers.Linear(3, 4), (5, 3)),
    (lambda: layers.GlobalAvgPool2d(), (2, 3, 4, 4)),
    (lambda: _small_net(dtype=None), (2, 2, 4, 4)),
], ids=["conv", "conv-nonsquare", "bn-train", "bn-eval", "bn-2d", "relu", "linear", "pool", "sequential"])
def test_float32_in_gives_float32_out_and_gradients(rng, make, shape):
    layer = make()
    assert all(p.dtype == np.float32 for p in layer.parameters())
    y = layer(dev(rng.standard_normal(shape).astype("float32")))
    assert y.dtype == np.float32
    dx = layer.backward(dev(rng.standard_normal(y.shape).astype("float32")))
    assert dx.dtype == np.float32 and dx.shape == shape
    assert all(g.dtype == np.float32 for _, g in layer.named_grads())
    assert all(b.dtype == np.float32 for _, b in layer.named_buffers())


def test_float64_layers_keep_float64(rng):
    net = _small_net(dtype=F64)
    y = net(dev(rng.standard_normal((2, 2, 4, 4))))
    assert y.dtype == np.float64
    assert net.backward(dev(np.ones(y.shape))).dtype == np.float64
    assert all(g.dtype == np.float64 for _, g in net.named_grads())


# ------------------------------------------------------------------------------------------------
# Errors name the layer, what it got and what it expected
# ------------------------------------------------------------------------------------------------


LAYERS_FOR_ERRORS = {
    "Conv2d": (lambda: layers.Conv2d(3, 4, 3, 1, 1), (2, 3, 5, 5)),
    "BatchNorm2d": (lambda: layers.BatchNorm2d(3), (2, 3, 4, 4)),
    "Linear": (lambda: layers.Linear(3, 2), (4, 3)),
    "GlobalAvgPool2d": (lambda: layers.GlobalAvgPool2d(), (2, 3, 4, 4)),
    "ReLU": (lambda: layers.ReLU(), (2, 3, 4, 4)),
}


def _f32(shape):
    return dev(np.random.default_rng(0).standard_normal(shape).astype("float32"))


@pytest.mark.parametrize("name,bad_shape", [
    ("Conv2d", (3, 5, 5)), ("Conv2d", (1, 2, 3, 5, 5)), ("BatchNorm2d", (2, 3, 4)),
    ("Linear", (4, 3, 1, 1)), ("GlobalAvgPool2d", (2, 3)),
])
def test_wrong_number_of_dimensions(name, bad_shape):
    layer = LAYERS_FOR_ERRORS[name][0]()
    with pytest.raises(ValueError) as info:
        layer(_f32(bad_shape))
    msg = str(info.value)
    assert msg.startswith(name + "("), msg
    assert str(bad_shape) in msg and "expected" in msg


@pytest.mark.parametrize("name,bad_shape,expected", [
    ("Conv2d", (2, 4, 5, 5), "3 channels"),
    ("BatchNorm2d", (2, 5, 4, 4), "3 channels"),
    ("BatchNorm2d", (4, 2), "3 channels"),
    ("Linear", (4, 5), "3 channels"),
])
def test_wrong_channel_count(name, bad_shape, expected):
    layer = LAYERS_FOR_ERRORS[name][0]()
    with pytest.raises(ValueError) as info:
        layer(_f32(bad_shape))
    msg = str(info.value)
    assert msg.startswith(name + "("), msg
    assert expected in msg and str(bad_shape) in msg


@pytest.mark.parametrize("kernel,padding,hw", [(5, 0, (3, 3)), (3, 0, (5, 2)), ((2, 4), (0, 0), (4, 3))])
def test_kernel_larger_than_padded_input(kernel, padding, hw):
    conv = layers.Conv2d(1, 1, kernel, 1, padding)
    with pytest.raises(ValueError) as info:
        conv(_f32((1, 1) + hw))
    msg = str(info.value)
    assert msg.startswith("Conv2d(") and "larger than the padded input" in msg and "expected kernel" in msg


def test_kernel_that_fits_only_thanks_to_padding_is_fine():
    assert layers.Conv2d(1, 1, 5, 1, 1)(_f32((1, 1, 3, 3))).shape == (1, 1, 1, 1)


@pytest.mark.parametrize("name", list(LAYERS_FOR_ERRORS))
def test_gradient_shape_must_match_forward_output(name):
    make, shape = LAYERS_FOR_ERRORS[name]
    layer = make()
    y = layer(_f32(shape))
    bad = tuple(y.shape[:-1]) + (y.shape[-1] + 1,)
    with pytest.raises(ValueError) as info:
        layer.backward(_f32(bad))
    msg = str(info.value)
    assert msg.startswith(name + "(") and str(tuple(y.shape)) in msg and str(bad) in msg


@pytest.mark.parametrize("name", list(LAYERS_FOR_ERRORS) + ["Sequential"])
def test_backward_before_forward(name):
    layer = _small_net(dtype=None) if name == "Sequential" else LAYERS_FOR_ERRORS[name][0]()
    with pytest.raises(ValueError, match="backward called before forward"):
        layer.backward(_f32((2, 4)))


@pytest.mark.parametrize("name", list(LAYERS_FOR_ERRORS))
def test_backward_twice_for_one_forward(name):
    make, shape = LAYERS_FOR_ERRORS[name]
    layer = make()
    y = layer(_f32(shape))
    layer.backward(_f32(y.shape))
    with pytest.raises(ValueError, match=name + r"\(.*backward called before forward"):
        layer.backward(_f32(y.shape))


@pytest.mark.parametrize("name", ["Conv2d", "BatchNorm2d", "Linear"])
def test_wrong_dtype(name):
    make, shape = LAYERS_FOR_ERRORS[name]
    layer = make()  # float32 parameters
    with pytest.raises(ValueError) as info:
        layer(dev(np.zeros(shape, dtype="float64")))
    msg = str(info.value)
    assert msg.startswith(name + "(") and "float32" in msg and "float64" in msg


# ------------------------------------------------------------------------------------------------
# The module tree
# ------------------------------------------------------------------------------------------------


def test_named_parameters_and_grads_pytorch_names_in_definition_order():
    net = _small_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "4.weight", "4.bias"]
    assert [n for n, _ in net.named_grads()] == names
    for (_, p), (_, g) in zip(net.named_parameters(), net.named_grads()):
        assert p.shape == g.shape and p is not g
    assert [n for n, _ in net.named_buffers()] == ["1.running_mean", "1.running_var"]
    assert net.num_parameters() == 2 * 3 * 9 + 3 + 3 + 3 + 3 * 4 + 4


def test_nested_names_are_dotted():
    class Net(layers.Module):
        def __init__(self):
            super().__init__()
            self.features = layers.Sequential(layers.Conv2d(1, 2, 3, bias=False), layers.BatchNorm2d(2))
            self.head = layers.Linear(2, 3)

    names = [n for n, _ in Net().named_parameters()]
    assert names == ["features.0.weight", "features.1.weight", "features.1.bias", "head.weight", "head.bias"]
    assert list(Net().state_dict()) == ["features.0.weight", "features.1.weight", "features.1.bias",
                                        "features.1.running_mean", "features.1.running_var",
                                        "head.weight", "head.bias"]


def test_backward_adds_into_grads_and_zero_grad_clears(rng):
    net = _small_net()
    x = dev(rng.standard_normal((3, 2, 4, 4)))
    dy = dev(rng.standard_normal((3, 4)))
    net(x)
    net.backward(dy)
    first = {n: host(g).copy() for n, g in net.named_grads()}
    assert all(np.any(g != 0) for g in first.values())
    net(x)
    net.backward(dy)
    for n, g in net.named_grads():
        np.testing.assert_allclose(host(g), 2 * first[n], rtol=1e-12, err_msg=n)
    net.zero_grad()
    assert all(np.all(host(g) == 0) for _, g in net.named_grads())
    assert not any(m.grad_received for m in net.modules())


def test_train_and_eval_set_the_whole_tree():
    net = _small_net()
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_state_dict_round_trip(rng):
    a, b = _small_net(dtype=None), _small_net(dtype=None)
    a(dev(rng.standard_normal((3, 2, 4, 4)).astype("float32")))  # non-trivial running statistics
    assert any(np.any(host(a.state_dict()[k]) != host(b.state_dict()[k])) for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(host(b.state_dict()[key]), host(value), err_msg=key)
    # a copy, not an alias: changing the source later does not change the loaded module
    a[0].params["weight"][...] = 0
    assert np.any(host(b[0].params["weight"]) != 0)
    a.eval(), b.eval()
    x = dev(rng.standard_normal((2, 2, 4, 4)).astype("float32"))
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(host(a(x)), host(b(x)))


def test_state_dict_accepts_host_arrays_and_casts(rng):
    net = _small_net(dtype=None)  # float32
    state = {k: np.asarray(host(v), dtype=np.float64) + 1 for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    for k, v in net.state_dict().items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(host(v), state[k], rtol=1e-6)


def test_load_state_dict_names_missing_and_misshapen_entries():
    net = _small_net(dtype=None)
    state = {k: host(v) for k, v in net.state_dict().items()}
    missing = dict(state)
    del missing["1.running_var"]
    with pytest.raises(ValueError, match=r"missing: 1\.running_var"):
        net.load_state_dict(missing)
    wrong = dict(state)
    wrong["4.weight"] = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"4\.weight: expected shape \(4, 3\), got \(3, 4\)"):
        net.load_state_dict(wrong)
    extra = dict(state)
    extra["5.weight"] = np.zeros(2, dtype=np.float32)
    with pytest.raises(ValueError, match=r"unexpected: 5\.weight"):
        net.load_state_dict(extra)
    net.load_state_dict(extra, strict=False)  # unexpected keys are fine when not strict
    before = host(net.state_dict()["1.running_var"]).copy()
    partial = {k: np.array(v) + 1 for k, v in missing.items()}  # copies (state aliases the net)
    net.load_state_dict(partial, strict=False)  # so are missing ones: they keep their values
    np.testing.assert_array_equal(host(net.state_dict()["1.running_var"]), before)
    np.testing.assert_allclose(host(net.state_dict()["4.weight"]), partial["4.weight"], rtol=1e-6)


def test_failed_load_changes_nothing():
    net = _small_net(dtype=None)
    before = {k: host(v).copy() for k, v in net.state_dict().items()}
    bad = {k: np.zeros_like(v) for k, v in before.items()}
    bad["0.bias"] = np.zeros(7, dtype=np.float32)
    with pytest.raises(ValueError):
        net.load_state_dict(bad)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(host(v), before[k])


def test_to_float64_casts_params_grads_buffers_and_keeps_values(rng):
    net = _small_net(dtype=None)
    before = {k: host(v).copy() for k, v in net.state_dict().items()}
    assert net.to(dtype="float64") is net
    assert net.dtype == np.float64
    for store in ("params", "grads", "buffers"):
        for m in net.modules():
            assert all(v.dtype == np.float64 for v in getattr(m, store).values())
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(host(v), before[k].astype(np.float64))
    y = net(dev(rng.standard_normal((2, 2, 4, 4))))
    assert y.dtype == np.float64
    with pytest.raises(ValueError, match="float64"):
        net(dev(rng.standard_normal((2, 2, 4, 4)).astype("float32")))


def test_to_rejects_non_floating_dtype():
    with pytest.raises(ValueError, match="floating dtype"):
        _small_net().to(dtype="int32")


def test_default_dtype_is_float32_and_configurable():
    assert backend.default_dtype() == np.float32
    assert layers.Linear(2, 2).params["weight"].dtype == np.float32
    backend.set_default_dtype("float64")  # restored by the conftest fixture
    assert layers.Conv2d(1, 1, 1).params["weight"].dtype == np.float64
    assert layers.BatchNorm2d(1).buffers["running_var"].dtype == np.float64


def test_repr_shows_the_tree():
    text = repr(_small_net())
    assert "Conv2d(2, 3, kernel_size=(3, 3)" in text and "(4): Linear(in_features=3" in text


def test_conv2d_without_input_grad_returns_none_and_the_same_weight_grads(rng):
    """The stem's setting: backward skips dL/dx but the parameter gradients are unchanged."""
    x = dev(rng.standard_normal((2, 3, 5, 6)))
    dy = dev(rng.standard_normal((2, 4, 5, 6)))
    full = layers.Conv2d(3, 4, 3, 1, 1, dtype=F64, rng=np.random.default_rng(0))
    stem = layers.Conv2d(3, 4, 3, 1, 1, dtype=F64, rng=np.random.default_rng(0), input_grad=False)
    full(x)
    stem(x)
    assert full.backward(dy) is not None
    assert stem.backward(dy) is None
    for key in ("weight", "bias"):
        np.testing.assert_allclose(host(stem.grads[key]), host(full.grads[key]), rtol=1e-12, atol=1e-12)
