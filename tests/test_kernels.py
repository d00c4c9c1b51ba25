"""The two kernel tiers: the switch, and the fast tier held to the reference.

* ``minisd.kernels.use / active / current``: names, context manager, errors, MINISD_KERNELS.
* Every fast pair equals its reference pair (outputs and every gradient) in float64 to 1e-12
  relative, over a grid of batches, image and kernel shapes, strides, paddings, input layouts,
  chunk sizes and thread counts.
* A whole ResNet-20 training step gives the same loss and gradients on both tiers, and under the
  reference switch no fast function runs.
* A smaller set of finite-difference checks on the fast tier (the full set runs on the reference:
  tests/test_functional.py and the layer, block and model tests).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import assert_check, away_from_zero, conv2d_naive, dev, host
from minisd import backend, functional, kernels, models
from minisd.gradcheck import check_pair
from minisd.kernels import fast, parallel

REL = 1e-12


def _kshape(k):
    return (k, k) if isinstance(k, int) else k


def assert_same(a, b, what, rel=REL):
    """|a - b| <= rel * max|b| (both on the host), with ``what`` in the message."""
    a, b = host(a), host(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    scale = max(float(np.abs(b).max()) if b.size else 0.0, 1e-300)
    worst = float(np.abs(a - b).max()) if a.size else 0.0
    assert worst <= rel * scale, f"{what}: max |fast - reference| = {worst:.3g}, {worst / scale:.3g} relative"


def as_layout(x, layout):
    """The same NCHW values in another memory layout: C-ordered, channel-major, or a strided view."""
    x = np.asarray(x)
    if layout == "c-order":
        return dev(np.ascontiguousarray(x))
    if layout == "channel-major":
        return dev(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).transpose(1, 0, 2, 3)
    assert layout == "non-contiguous"  # every other column of a twice-as-wide array
    wide = np.zeros(x.shape[:3] + (2 * x.shape[3],), dtype=x.dtype)
    wide[..., ::2] = x
    return dev(wide)[..., ::2]


@pytest.fixture
def many_chunks(monkeypatch):
    """Cut every batch into chunks of the smallest number of images."""
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 1)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    kernels.set_num_threads(request.param)
    yield request.param
    kernels.set_num_threads(None)


# ------------------------------------------------------------------------------------------------
# The switch
# ------------------------------------------------------------------------------------------------


def test_fast_is_the_default_and_use_sets_the_tier_for_the_process():
    assert kernels.active() == "fast" and kernels.current() is fast
    kernels.use("reference")
    assert kernels.active() == "reference" and kernels.current() is functional
    kernels.use("fast")
    assert kernels.current() is fast


def test_use_as_a_context_restores_the_previous_tier_even_on_error():
    with kernels.use("reference") as chosen:
        assert kernels.active() == "reference" and chosen.name == "reference"
        with kernels.use("fast"):
            assert kernels.active() == "fast"
        assert kernels.active() == "reference"
    assert kernels.active() == "fast"
    with pytest.raises(RuntimeError, match="boom"), kernels.use("reference"):
        raise RuntimeError("boom")
    assert kernels.active() == "fast"


def test_unknown_tier_is_a_value_error_that_lists_the_tiers():
    with pytest.raises(ValueError, match=r"unknown tier 'quick'; expected one of reference, fast"):
        kernels.use("quick")
    assert kernels.active() == "fast"


def test_every_tier_provides_every_pair():
    for name in kernels.TIERS:
        module = kernels.tier(name)
        missing = [f for f in kernels.PAIRS if not callable(getattr(module, f, None))]
        assert not missing, f"tier {name} lacks {missing}"


@pytest.mark.parametrize("value,expected", [("reference", "reference"), ("", "fast")])
def test_minisd_kernels_environment_variable_chooses_the_tier(value, expected):
    env = dict(os.environ, MINISD_KERNELS=value)
    out = subprocess.run([sys.executable, "-c", "from minisd import kernels; print(kernels.active())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_reference_file_has_no_speed_machinery():
    """functional.py is the textbook: it imports only the backend (and typing, for its cache
    records; no threads, no workspace), and no name in it speaks of threads, scratch buffers or
    chunks."""
    tree = ast.parse(open(functional.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"__future__", "typing", "minisd.backend"}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not [n for n in names if any(w in n.lower() for w in ("thread", "scratch", "chunk", "workspace"))]


# ------------------------------------------------------------------------------------------------
# Fast == reference: convolution on a grid
# ------------------------------------------------------------------------------------------------

# (kernel, stride, padding): 1x1, 3x3, 5x5 and non-square kernels; strides 1, 2 and (1, 2);
# paddings 0, 1 and different per axis. Every stride-1 "same" case takes the width-unfolding path.
CONV_GRID = [
    (1, 1, 0), (1, 2, 0), (1, 1, 1),
    (3, 1, 1), (3, 1, 0), (3, 2, 1), (3, 2, 0), (3, (1, 2), 1), (3, 1, (1, 0)),
    (5, 1, 2), (5, 2, 1), (5, 1, 0),
    ((3, 1), 1, (1, 0)), ((1, 3), (1, 2), (0, 1)), ((2, 3), 1, (0, 1)),
]
CONV_IDS = [f"k{k}-s{s}-p{p}".replace(" ", "") for k, s, p in CONV_GRID]
LAYOUTS = ["c-order", "channel-major", "non-contiguous"]


def _conv_both_tiers(x, w, b, s, p, dy_host):
    y_f, cache_f = fast.conv2d_forward(x, w, b, s, p)
    y_r, cache_r = functional.conv2d_forward(x, w, b, s, p)
    dy = dev(dy_host)
    return (y_f, y_r), fast.conv2d_backward(dy, cache_f), functional.conv2d_backward(dy, cache_r)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("k,s,p", CONV_GRID, ids=CONV_IDS)
def test_fast_conv_equals_reference(rng, k, s, p, batch, layout):
    kh, kw = _kshape(k)
    x_host = rng.standard_normal((batch, 3, 5, 7))
    w = dev(rng.standard_normal((4, 3, kh, kw)))
    b = dev(rng.standard_normal(4))
    x = as_layout(x_host, layout)
    y_ref, _ = functional.conv2d_forward(dev(x_host), w, b, s, p)
    (y_f, y_r), grads_f, grads_r = _conv_both_tiers(x, w, b, s, p, rng.standard_normal(y_ref.shape))
    assert_same(y_f, y_r, "y")
    for name, g_f, g_r in zip(("dx", "dweight", "dbias"), grads_f, grads_r):
        assert_same(g_f, g_r, name)


@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (1, 1, 0), ((3, 1), (1, 1), (1, 0)), (5, (1, 2), 2)],
                         ids=["same3x3", "stride2", "1x1", "same3x1", "5x5-s1x2"])
def test_fast_conv_in_many_chunks_on_threads_equals_reference(rng, many_chunks, threads, k, s, p):
    """One image per chunk, on one or two threads: y, dx and dW as the reference, and the chunk
    path without dx (the stem's) gives the same dW."""
    kh, kw = _kshape(k)
    x = dev(rng.standard_normal((5, 3, 6, 7)))
    w = dev(rng.standard_normal((4, 3, kh, kw)))
    y_r, cache_r = functional.conv2d_forward(x, w, None, s, p)
    dy = dev(rng.standard_normal(y_r.shape))
    dx_r, dw_r, _ = functional.conv2d_backward(dy, cache_r)
    y_f, cache_f = fast.conv2d_forward(x, w, None, s, p)
    dx_f, dw_f, _ = fast.conv2d_backward(dy, cache_f)
    dx_none, dw_only, _ = fast.conv2d_backward(dy, cache_f, input_grad=False)
    assert dx_none is None
    for name, a, b in [("y", y_f, y_r), ("dx", dx_f, dx_r), ("dW", dw_f, dw_r), ("dW without dx", dw_only, dw_r)]:
        assert_same(a, b, name)
    np.testing.assert_allclose(host(y_f), conv2d_naive(host(x), host(w), None, s, p), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("chunks", ["one image each", "whole batch"])
@pytest.mark.parametrize("image", [(6, 7), (2, 3), (1, 1)], ids=["6x7", "2x3", "1x1"])
@pytest.mark.parametrize("k,p", [(5, 2), ((5, 3), (2, 1)), ((1, 5), (0, 2)), ((7, 1), (3, 0))],
                         ids=["5x5", "5x3", "1x5", "7x1"])
def test_fast_same_conv_with_kernel_rows_reaching_past_the_image(rng, monkeypatch, image, k, p, chunks):
    """Kernel rows that slide further than the image is tall: output, dx and dW still match loops,
    and the finite-difference check passes on the fast tier.

    With several images in a chunk, a row that slides past its image lands in the next one
    unless it is zeroed (a 7-row kernel on 2-row images slides 3 rows: more than the image).
    """
    kh, kw = _kshape(k)
    x = rng.standard_normal((3, 2) + image)
    w = rng.standard_normal((3, 2, kh, kw))
    if chunks == "one image each":
        monkeypatch.setattr(parallel, "CHUNK_BYTES", 1)
    y, _ = fast.conv2d_forward(dev(x), dev(w), None, 1, p)
    np.testing.assert_allclose(host(y), conv2d_naive(x, w, None, 1, p), rtol=1e-11, atol=1e-11)
    result = assert_check(check_pair(fast.conv2d_forward, fast.conv2d_backward, {"x": dev(x), "weight": dev(w)},
                                     kwargs={"stride": 1, "padding": p}, tol=1e-6))
    assert set(result.errors) == {"x", "weight"}


@pytest.mark.parametrize("tier", ["reference", "fast"])
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1)], ids=["same3x3", "stride2"])
def test_conv_backward_of_an_empty_batch_gives_zero_float_gradients(tier, k, s, p):
    module = kernels.tier(tier)
    x = dev(np.zeros((0, 3, 4, 4)))
    w = dev(np.ones((2, 3, k, k)))
    y, cache = module.conv2d_forward(x, w, dev(np.zeros(2)), s, p)
    dx, dw, db = module.conv2d_backward(dev(np.zeros(y.shape)), cache)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == (2,)
    assert host(dw).dtype == np.float64 and not host(dw).any() and not host(db).any()


# ------------------------------------------------------------------------------------------------
# Fast == reference: batch norm, ReLU, pooling, shortcut, and caches that cross tiers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS + ["2-D"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_batch_norm_equals_reference(rng, training, layout):
    shape = (6, 3) if layout == "2-D" else (3, 3, 5, 7)
    x_host = rng.standard_normal(shape) * 2 + 0.5
    x = dev(x_host) if layout == "2-D" else as_layout(x_host, layout)
    gamma, beta = dev(rng.standard_normal(3)), dev(rng.standard_normal(3))
    stats = {}
    for name in kernels.TIERS:
        module = kernels.tier(name)
        running_mean, running_var = dev(rng.standard_normal(3) * 0 + 0.1), dev(np.full(3, 1.5))
        y, cache = module.batch_norm_forward(x, gamma, beta, running_mean, running_var, training)
        module.update_running_stats(running_mean, running_var, cache, 0.1)
        dy = dev(np.random.default_rng(5).standard_normal(shape))
        stats[name] = (y, *module.batch_norm_backward(dy, cache), running_mean, running_var)
    for what, f, r in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"),
                          stats["fast"], stats["reference"]):
        assert_same(f, r, what)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_relu_pool_and_shortcut_equal_reference(rng, layout):
    x_host = away_from_zero(rng.standard_normal((3, 4, 5, 7)))
    x = as_layout(x_host, layout)
    cases = [
        ("relu", lambda m: m.relu_forward(x), lambda m: m.relu_backward),
        ("pool", lambda m: m.global_avg_pool_forward(x), lambda m: m.global_avg_pool_backward),
        ("shortcut s2", lambda m: m.shortcut_forward(x, 6, 2), lambda m: m.shortcut_backward),
        ("shortcut s1", lambda m: m.shortcut_forward(x, 4, 1), lambda m: m.shortcut_backward),
    ]
    for name, forward, backward in cases:
        y_f, cache_f = forward(fast)
        y_r, cache_r = forward(functional)
        dy = dev(rng.standard_normal(y_r.shape))
        assert_same(y_f, y_r, f"{name}: y")
        assert_same(backward(fast)(dy, cache_f), backward(functional)(dy, cache_r), f"{name}: dx")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_relu_on_channel_groups_equals_reference_bit_for_bit(rng, threads, layout):
    """Large enough to run in groups of channels on threads (2**18 values), with exact zeros of
    both signs and a NaN: the maximum against a row of zeros gives what max(x, 0) gives (a zero
    output and a False mask at the zeros, NaN and False at the NaN)."""
    x_host = rng.standard_normal((8, 8, 64, 64)).astype(np.float32)
    x_host[0, :, 0, :8] = 0.0
    x_host[1, :, 1, :8] = -0.0
    x_host[2, 3, 4, 5] = np.nan
    x = as_layout(x_host, layout)
    y_f, mask_f = fast.relu_forward(x)
    y_r, mask_r = functional.relu_forward(x)
    np.testing.assert_array_equal(host(y_f), host(y_r))
    np.testing.assert_array_equal(host(mask_f), host(mask_r))
    assert y_f.dtype == np.float32
    if layout == "channel-major":  # the layout a ResNet's activations have, kept for the next conv
        assert y_f.transpose(1, 0, 2, 3).flags.c_contiguous


@pytest.mark.parametrize("forward_tier,backward_tier", [("fast", "reference"), ("reference", "fast")])
def test_a_forward_on_one_tier_is_differentiated_on_the_other(rng, forward_tier, backward_tier):
    """Both tiers keep the same caches, so a tier switch between forward and backward is safe."""
    fwd, bwd = kernels.tier(forward_tier), kernels.tier(backward_tier)
    x = dev(rng.standard_normal((2, 3, 6, 5)))
    w = dev(rng.standard_normal((4, 3, 3, 3)))
    gamma, beta = dev(rng.standard_normal(4)), dev(rng.standard_normal(4))
    y, conv_cache = fwd.conv2d_forward(x, w, None, 1, 1)
    z, bn_cache = fwd.batch_norm_forward(y, gamma, beta)
    dz = dev(rng.standard_normal(z.shape))
    mixed = bwd.batch_norm_backward(dz, bn_cache)
    mixed = mixed + bwd.conv2d_backward(mixed[0], conv_cache)
    same = fwd.batch_norm_backward(dz, bn_cache)
    same = same + fwd.conv2d_backward(same[0], conv_cache)
    for what, a, b in zip(("dy", "dgamma", "dbeta", "dx", "dW"), mixed, same):
        if b is not None:
            assert_same(a, b, what, rel=1e-11)


def test_both_tiers_hand_out_the_same_named_cache_records(rng):
    """The caches are the records of minisd/kernels/functional.py on both tiers, field for field."""
    x = dev(rng.standard_normal((2, 3, 6, 5)))
    w = dev(rng.standard_normal((4, 3, 3, 3)))
    gamma, beta = dev(rng.standard_normal(3)), dev(rng.standard_normal(3))
    logits, labels = dev(rng.standard_normal((2, 5))), dev(np.array([1, 4]))
    records = [
        (functional.ConvCache, lambda m: m.conv2d_forward(x, w, None, 2, 1)),
        (functional.BatchNormCache, lambda m: m.batch_norm_forward(x, gamma, beta)),
        (functional.LinearCache, lambda m: m.linear_forward(x[:, :, 0, :].reshape(2, 15), w.reshape(4, 27)[:, :15])),
        (functional.ShortcutCache, lambda m: m.shortcut_forward(x, 6, 2)),
        (functional.SoftmaxCrossEntropyCache, lambda m: m.softmax_cross_entropy_forward(logits, labels)),
    ]
    for record, forward in records:
        (_, cache_f), (_, cache_r) = forward(fast), forward(functional)
        assert type(cache_f) is record and type(cache_r) is record, record.__name__
        for field in record._fields:
            a, b = getattr(cache_f, field), getattr(cache_r, field)
            if hasattr(b, "shape") and b.shape:
                assert_same(a, b, f"{record.__name__}.{field}")
            else:
                assert a == b, f"{record.__name__}.{field}: {a!r} vs {b!r}"


@pytest.mark.parametrize("tier", ["reference", "fast"])
def test_no_backward_of_either_tier_writes_into_its_dout(rng, tier):
    m = kernels.tier(tier)
    x4 = dev(away_from_zero(rng.standard_normal((2, 3, 4, 4))))
    cases = [
        (m.conv2d_forward(x4, dev(rng.standard_normal((3, 3, 3, 3))), dev(np.zeros(3)), 1, 1), m.conv2d_backward),
        (m.conv2d_forward(x4, dev(rng.standard_normal((3, 3, 3, 3))), None, 2, 1), m.conv2d_backward),
        (m.batch_norm_forward(x4, dev(np.ones(3)), dev(np.zeros(3)), dev(np.zeros(3)), dev(np.ones(3)), True),
         m.batch_norm_backward),
        (m.relu_forward(x4), m.relu_backward),
        (m.global_avg_pool_forward(x4), m.global_avg_pool_backward),
        (m.shortcut_forward(x4, 6, 2), m.shortcut_backward),
    ]
    for (out, cache), backward in cases:
        dout_host = rng.standard_normal(out.shape)
        dout = dev(dout_host)
        backward(dout, cache)
        np.testing.assert_array_equal(host(dout), dout_host, err_msg=backward.__name__)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_batch_norm_and_relu_gradchecks(rng, training):
    x = dev(rng.standard_normal((3, 2, 3, 4)))
    gamma, beta = dev(rng.standard_normal(2)), dev(rng.standard_normal(2))
    kwargs = {"training": training}
    if not training:
        kwargs.update(running_mean=dev(rng.standard_normal(2)), running_var=dev(rng.random(2) + 0.5))
    assert_check(check_pair(fast.batch_norm_forward, fast.batch_norm_backward,
                            {"x": x, "gamma": gamma, "beta": beta}, kwargs=kwargs, tol=1e-6))
    assert_check(check_pair(fast.relu_forward, fast.relu_backward,
                            {"x": dev(away_from_zero(rng.standard_normal((2, 3, 4))))}, tol=1e-6))


# ------------------------------------------------------------------------------------------------
# A whole network on either tier
# ------------------------------------------------------------------------------------------------

GATES = [True, False, True, True, False, True, False, True, True]  # ResNet-20: 9 blocks, 3 dropped


def _resnet_step(tier, x_host, labels_host, threads=None):
    """Loss, input gradient and every parameter gradient of one training step of ResNet-20."""
    backend.seed(0)
    model = models.resnet_cifar(depth=20, dtype=x_host.dtype.name, seed=0)
    model.force_gates(GATES)
    x, labels = dev(x_host), dev(labels_host)
    with kernels.use(tier):
        logits = model(x)
        loss, cache = kernels.current().softmax_cross_entropy_forward(logits, labels)
        model.zero_grad()
        dx = model.backward(kernels.current().softmax_cross_entropy_backward(1.0, cache))
    return float(host(loss)), host(dx), {name: host(g).copy() for name, g in model.named_grads()}


def test_resnet20_step_is_the_same_on_both_tiers(rng):
    x = rng.standard_normal((4, 3, 8, 8))
    labels = np.arange(4) % 10
    loss_f, dx_f, grads_f = _resnet_step("fast", x, labels)
    loss_r, dx_r, grads_r = _resnet_step("reference", x, labels)
    assert abs(loss_f - loss_r) <= 1e-10 * abs(loss_r)
    assert_same(dx_f, dx_r, "dx", rel=1e-10)
    assert grads_f.keys() == grads_r.keys()
    dropped = [name for name, g in grads_r.items() if ".branch." in name and not g.any()]
    assert dropped, "some blocks should be dropped (their branch gradients exactly zero)"
    for name in grads_r:
        assert_same(grads_f[name], grads_r[name], name, rel=1e-10)


def test_under_the_reference_switch_no_fast_function_runs(rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a fast kernel ran under kernels.use('reference')")

    for name in kernels.PAIRS:
        monkeypatch.setattr(fast, name, refuse)
    x = rng.standard_normal((2, 3, 8, 8))
    loss, dx, grads = _resnet_step("reference", x, np.array([1, 2]))
    assert np.isfinite(loss) and dx.shape == x.shape and grads
    with pytest.raises(AssertionError, match="a fast kernel ran"):
        _resnet_step("fast", x, np.array([1, 2]))


def test_a_training_step_gives_the_same_bits_on_one_and_two_threads(rng):
    """The chunks are cut by size alone and summed in chunk order, so the thread count changes no
    bit (a run resumed with another MINISD_NUM_THREADS continues exactly)."""
    x = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)  # 32x32 images: many chunks
    labels = np.arange(16) % 10
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        try:
            results.append(_resnet_step("fast", x, labels))
        finally:
            kernels.set_num_threads(None)
    (loss1, dx1, g1), (loss2, dx2, g2) = results
    assert loss1 == loss2
    np.testing.assert_array_equal(dx1, dx2)
    for name in g1:
        np.testing.assert_array_equal(g1[name], g2[name], err_msg=name)


def test_chunk_size_does_not_depend_on_the_thread_count(monkeypatch):
    x = np.empty((128, 16, 32, 32), dtype=np.float32)
    sizes = set()
    for threads in (1, 2, 3, 4):
        kernels.set_num_threads(threads)
        sizes.add(parallel.images_per_chunk(x, 100_000))
    kernels.set_num_threads(None)
    assert len(sizes) == 1


def test_fast_tier_passes_the_directional_check_of_a_resnet_with_dropped_blocks(rng):
    """The finite-difference check of a whole network, on the tier training runs."""
    from minisd.gradcheck import directional_check

    assert kernels.active() == "fast"
    model = models.resnet_cifar(depth=20, dtype="float64", seed=0)
    model.force_gates(GATES)
    directional_check(model, dev(rng.standard_normal((4, 3, 8, 8)))).raise_if_failed()


# ------------------------------------------------------------------------------------------------
# The dropped block of a network: its input is a ReLU output, so no output ReLU
# ------------------------------------------------------------------------------------------------


def _step_with_relu_flags(x_host, labels_host, relu_input_known, gates=GATES):
    """_resnet_step on the fast tier, with every block told (or not) that its input is a ReLU output."""
    backend.seed(0)
    model = models.resnet_cifar(depth=20, dtype=x_host.dtype.name, seed=0)
    for block in model.blocks:
        block.input_is_relu_output = relu_input_known
    model.force_gates(gates)
    x, labels = dev(x_host), dev(labels_host)
    logits = model(x)
    loss, cache = fast.softmax_cross_entropy_forward(logits, labels)
    model.zero_grad()
    dx = model.backward(fast.softmax_cross_entropy_backward(1.0, cache))
    return host(logits), host(dx), {name: host(g).copy() for name, g in model.named_grads()}


@pytest.mark.parametrize("gates", [GATES, [False] * 9, [True, False, False, False, False, True, False, False, True]],
                         ids=["three-dropped", "all-dropped", "transitions-and-runs-dropped"])
def test_a_network_with_pass_through_dropped_blocks_gives_the_same_bits(rng, gates):
    """Skipping a dropped block's output ReLU changes no logit, no parameter gradient and not the
    input gradient, bit for bit (the ReLU that made the block's input applies the same mask),
    also for runs of dropped blocks and dropped transition blocks."""
    x = rng.standard_normal((4, 3, 8, 8))
    labels = np.arange(4) % 10
    logits_a, dx_a, grads_a = _step_with_relu_flags(x, labels, True, gates)
    logits_b, dx_b, grads_b = _step_with_relu_flags(x, labels, False, gates)
    np.testing.assert_array_equal(logits_a, logits_b)
    np.testing.assert_array_equal(dx_a, dx_b)
    for name in grads_b:
        np.testing.assert_array_equal(grads_a[name], grads_b[name], err_msg=name)


def test_a_dropped_block_of_a_network_runs_no_relu_and_returns_its_shortcut(rng, monkeypatch):
    model = models.resnet_cifar(depth=20, dtype="float64", seed=0)
    assert all(block.input_is_relu_output for block in model.blocks)
    calls = []
    for name in ("relu_forward", "relu_backward"):
        original = getattr(fast, name)
        monkeypatch.setattr(fast, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    identity_block, transition_block = model.blocks[1], model.blocks[3]
    x = dev(np.maximum(rng.standard_normal((2, 16, 8, 8)), 0))
    identity_block.force_gate(False)
    y = identity_block(x)
    assert y is x  # ReLU(0 + x) = x: the input itself, no pass over memory
    dy = dev(rng.standard_normal(y.shape))
    assert identity_block.backward(dy) is dy
    transition_block.force_gate(False)
    y = transition_block(x)
    np.testing.assert_array_equal(host(y), host(fast.shortcut_forward(x, 32, 2)[0]))
    transition_block.backward(dev(rng.standard_normal(y.shape)))
    assert calls == []


def test_a_standalone_dropped_block_keeps_its_output_relu(rng):
    """A block on its own makes no assumption about its input (gradient checks feed negative
    values): a dropped block still outputs ReLU(x) and masks its gradient."""
    from minisd.residual import BasicBlock

    block = BasicBlock(3, 3, dtype="float64")
    assert block.input_is_relu_output is False
    block.force_gate(False)
    x_host = away_from_zero(rng.standard_normal((2, 3, 4, 4)))
    y = block(dev(x_host))
    np.testing.assert_array_equal(host(y), np.maximum(x_host, 0))
    dy_host = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(host(block.backward(dev(dy_host))), dy_host * (x_host > 0))


def _as_if_on_a_gpu(monkeypatch):
    """Make the kernels package take every array for a device array (there is no GPU here): the
    tier switch and the chunking decide as on a GPU, while the arithmetic stays NumPy's."""
    for name, module in list(sys.modules.items()):
        if name.split(".")[:2] == ["minisd", "kernels"] and \
                getattr(module, "is_device_array", None) is backend.is_device_array:
            monkeypatch.setattr(module, "is_device_array", lambda a: True)


def test_on_a_gpu_the_reference_runs_and_the_trace_records_the_tier_that_ran(rng, monkeypatch):
    """With "fast" chosen, device arrays run the reference pairs (the CPU tricks launch more
    kernels on a GPU), and a trace says "reference": the tier that ran, not the one chosen."""
    from minisd import trace

    ran = []
    for tier_name, module in (("fast", fast), ("reference", functional)):
        for pair in ("conv2d_forward", "conv2d_backward", "batch_norm_forward", "batch_norm_backward",
                     "relu_forward", "relu_backward", "shortcut_forward", "shortcut_backward"):
            original = getattr(module, pair)
            monkeypatch.setattr(module, pair, lambda *a, _f=original, _t=tier_name, **k: ran.append(_t) or _f(*a, **k))
    model = models.resnet_cifar(depth=8, in_channels=1, seed=0).to("numpy")
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)

    def traced_step():
        with trace.record(model) as t:
            logits = model(x)
            model.backward(np.ones_like(logits))
        return t

    with kernels.use("fast"):
        on_the_host = traced_step()
        assert set(ran) == {"fast"} and on_the_host.kernels == "fast" and kernels.running(x) == "fast"
        ran.clear()
        _as_if_on_a_gpu(monkeypatch)
        on_a_gpu = traced_step()
        assert kernels.active() == "fast" and kernels.running(x) == "reference"
    assert set(ran) == {"reference"}
    assert on_a_gpu.kernels == "reference" and {e.kernels for e in on_a_gpu.events} == {"reference"}
    assert on_a_gpu.table().splitlines()[0] == "kernels: reference tier"
    with kernels.use("reference"):  # the reference runs everywhere
        assert kernels.running(x) == "reference" and kernels.current(x) is functional
