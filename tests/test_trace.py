"""minisd.trace: events for every layer, gates of dropped blocks, norms that match direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import dev, host

from minisd import functional as F
from minisd import backend, models, trace
from minisd.residual import BasicBlock


def small_model(**kwargs):
    kwargs.setdefault("depth", 8 + 6)  # ResNet-14: 2 blocks per stage, 6 blocks
    kwargs.setdefault("in_channels", 1)
    kwargs.setdefault("dtype", "float64")
    return models.resnet_cifar(**kwargs)


def batch(rng, n=4, size=8):
    return dev(rng.standard_normal((n, 1, size, size))), np.arange(n) % 10


def train_step(model, x, labels):
    logits = model(x)
    _, cache = F.softmax_cross_entropy_forward(logits, labels)
    model.zero_grad()
    dlogits = F.softmax_cross_entropy_backward(1.0, cache)
    dx = model.backward(dlogits)
    return logits, dlogits, dx


def traced_step_all_blocks(rng):
    """A small model with every block forced on, and the trace of one training step of it."""
    model = small_model()
    model.force_gates(True)
    x, labels = batch(rng)
    with trace.record(model) as t:
        train_step(model, x, labels)
    return model, t


def norm(a):
    return float(np.linalg.norm(host(a).ravel()))


def test_every_module_has_a_forward_and_a_backward_event(rng):
    model, t = traced_step_all_blocks(rng)
    names = [name for name, _ in model.named_modules()]
    for phase in ("forward", "backward"):
        recorded = [e.name for e in t.select(phase=phase)]
        assert sorted(recorded) == sorted(names), phase
    assert len(t) == 2 * len(names)
    assert t.events[0].name == "" and t.events[0].phase == "forward"
    assert t.forward()[0].in_shape == (4, 1, 8, 8) and t.forward()[0].out_shape == (4, 10)
    # Events are in the order calls started: a block comes before the layers inside it.
    first_block = t.find("layer1.0")
    assert first_block.index < t.find("layer1.0.branch.0").index
    assert all(e.seconds >= 0 for e in t)


def test_recording_leaves_no_trace_on_the_modules(rng):
    model = small_model()
    x, labels = batch(rng)
    model.force_gates([True, False] * 3)
    plain_logits, _, plain_dx = train_step(model, x, labels)
    with trace.record(model):
        assert "forward" in model.layer1.__dict__  # wrapped on the instance while recording
        traced_logits, _, traced_dx = train_step(model, x, labels)
    for m in model.modules():
        assert "forward" not in m.__dict__ and "backward" not in m.__dict__
        assert type(m).forward is m.forward.__func__
    np.testing.assert_array_equal(host(plain_logits), host(traced_logits))
    np.testing.assert_array_equal(host(plain_dx), host(traced_dx))


def test_wrappers_are_removed_after_an_error(rng):
    model = small_model()
    with pytest.raises(ValueError):
        with trace.record(model):
            model(dev(rng.standard_normal((2, 3, 8, 8))))  # wrong channel count
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_dropped_blocks_are_reported_skipped_with_no_branch_events(rng):
    model = small_model()
    gates = [True, False, True, False, False, True]
    model.force_gates(gates)
    x, labels = batch(rng)
    with trace.record(model) as t:
        train_step(model, x, labels)
    names = {id(m): n for n, m in model.named_modules()}
    for block, kept in zip(model.blocks, gates):
        name = names[id(block)]
        for phase in ("forward", "backward"):
            event = t.find(name, phase)
            assert event.gate == ("kept" if kept else "dropped")
            assert event.skipped is (not kept)
            assert event.kept_fraction == float(kept)
            assert event.survival_prob == pytest.approx(block.survival_prob)
            branch_events = [e for e in t.select(phase=phase) if e.name.startswith(name + ".branch")]
            assert bool(branch_events) is kept, (name, phase)
            # The shortcut always runs.
            assert t.find(name + ".shortcut", phase)
        if not kept:
            for _, g in block.branch.named_grads():
                assert not host(g).any()
    assert [e.skipped for e in t.block_events("backward")] == [not g for g in gates]


def test_gradient_norms_equal_norms_computed_directly(rng):
    model = small_model()
    model.force_gates([True, False, True, True, False, True])
    x, labels = batch(rng)
    with trace.record(model, keep_arrays=True) as t:
        logits, dlogits, dx = train_step(model, x, labels)
    top_f, top_b = t.find("", "forward"), t.find("", "backward")
    assert top_f.in_norm == pytest.approx(norm(x), rel=1e-12)
    assert top_f.out_norm == pytest.approx(norm(logits), rel=1e-12)
    assert top_b.in_norm == pytest.approx(norm(dlogits), rel=1e-12)
    assert top_b.out_norm == pytest.approx(norm(dx), rel=1e-12)
    assert top_b.out_mean == pytest.approx(float(host(dx).mean()), rel=1e-9, abs=1e-15)
    assert top_b.out_std == pytest.approx(float(host(dx).std()), rel=1e-9)
    # Every event's statistics match the arrays it kept, and what leaves one layer enters the next.
    for e in t:
        assert isinstance(e.in_array, np.ndarray) and isinstance(e.out_array, np.ndarray)
        assert e.in_norm == pytest.approx(np.linalg.norm(e.in_array.ravel()), rel=1e-12)
        assert e.out_norm == pytest.approx(np.linalg.norm(e.out_array.ravel()), rel=1e-12)
        assert e.in_array.shape == e.in_shape and e.out_array.shape == e.out_shape
    assert t.find("relu", "backward").in_norm == t.find("layer1", "backward").out_norm
    # A block's backward output is the gradient at its input.
    for block_event, block in zip(t.block_events("backward"), model.blocks):
        assert block_event.out_shape == (4, block.in_channels) + block_event.out_shape[2:]
    assert t.block_events("backward")[0].out_norm == t.find("layer1", "backward").out_norm
    # Parameter gradients of a layer, as the trace reports them.
    conv = t.find("conv1", "backward")
    assert conv.grad_norm == pytest.approx(norm(model.conv1.grads["weight"]), rel=1e-12)


def test_row_mode_reports_the_fraction_of_kept_samples(rng):
    model = small_model(mode="row")
    model.force_gates([np.array([True, False, True, True])] + [np.zeros(4, bool)] + [None] * 4)
    x, labels = batch(rng)
    with trace.record(model) as t:
        train_step(model, x, labels)
    first, second = t.block_events("forward")[:2]
    assert first.gate == "rows" and first.kept_fraction == 0.75 and first.skipped is False
    assert second.kept_fraction == 0.0 and second.skipped is True


def test_evaluation_mode_has_no_gate_and_runs_every_branch(rng):
    model = small_model()
    model.eval()
    x, _ = batch(rng)
    with trace.record(model) as t:
        model(x)
    blocks = t.block_events("forward")
    assert len(blocks) == len(model.blocks)
    assert all(e.gate == "eval" and e.skipped is False for e in blocks)
    assert t.backward() == []


def test_table_list_and_records(rng):
    model, t = traced_step_all_blocks(rng)
    text = t.table(which="all")
    for name, _ in model.named_modules():
        assert (name or "(ResNetCifar)") in text
    assert "forward" in text and "backward" in text
    short = t.table(phase="backward", which="layers", max_rows=5)
    assert "more rows" in short and len(short.splitlines()) == 3 + 5 + 1  # tier line, header, rule
    records = t.to_records()
    assert len(records) == len(t) and "in_array" not in records[0] and records[0]["label"] == "(ResNetCifar)"
    assert t.find("", "forward").seconds > 0  # the model's own call
    blocks_only = t.table(which="blocks").splitlines()[3:]
    assert len(blocks_only) == 2 * len(model.blocks) and all("BasicBlock" in line for line in blocks_only)
    with pytest.raises(ValueError, match="which"):
        t.table(which="leaves")
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            t.to_frame()
    else:
        assert len(t.to_frame()) == len(t)


def test_a_block_alone_can_be_traced(rng):
    block = BasicBlock(2, 4, stride=2, survival_prob=0.5, dtype="float64")
    block.force_gate(False)
    x = dev(rng.standard_normal((3, 2, 6, 6)))
    with trace.record(block) as t:
        y = block(x)
        block.backward(dev(rng.standard_normal(y.shape)))
    assert [e.name for e in t] == ["", "shortcut", "", "shortcut"]
    assert t.block_events("backward")[0].skipped is True


def test_place_names_stem_blocks_parts_and_head(rng):
    model, t = traced_step_all_blocks(rng)
    assert t.block_names == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert t.place(t.find("conv1")) == trace.Place("stem")
    assert t.place(t.find("relu", "backward")) == trace.Place("stem")
    assert t.place(t.find("fc")) == trace.Place("head")
    assert t.place(t.find("layer2")) == trace.Place("stage")
    assert t.place(t.find("")) == trace.Place("model")
    assert t.place(t.find("layer2.1")) == trace.Place("block", 3, "block")
    assert t.place(t.find("layer2.1.branch.3", "backward")) == trace.Place("block", 3, "branch")
    assert t.place(t.find("layer3.0.shortcut")) == trace.Place("block", 4, "shortcut")


def test_describe_says_what_a_dropped_gate_did(rng):
    model = small_model()
    model.force_gates([True, False, True, True, True, True])
    x, labels = batch(rng)
    with trace.record(model) as t:
        train_step(model, x, labels)
    forward, backward = t.find("layer1.1", "forward"), t.find("layer1.1", "backward")
    assert forward.dropped and backward.dropped and not t.find("layer1.0").dropped
    # In the network a block's input is a ReLU output, so a dropped block skips its output ReLU too,
    # and its text says so (the gradient is not masked on the way through).
    assert forward.relu_skipped and backward.relu_skipped
    assert "DROPPED" in forward.describe() and "y = shortcut(x)" in forward.describe()
    assert "through the shortcut only" in backward.describe() and "mask" not in backward.describe()
    assert "kept" in t.find("layer1.0", "backward").describe()
    assert t.find("layer1.0", "forward").relu_skipped is False
    # One numbering scheme: an event's text carries no index of its own (the stepper numbers steps).
    assert not backward.describe().startswith("[")


def test_describe_a_dropped_standalone_block_keeps_its_output_relu(rng):
    """A block on its own makes no assumption about its input: dropped, it still applies the ReLU."""
    block = BasicBlock(4, 4, survival_prob=0.5)
    block.force_gate(False)
    x = dev(rng.standard_normal((2, 4, 5, 5)))  # negative entries: the ReLU matters
    with trace.record(block) as t:
        y = block(x)
        block.backward(dev(np.ones(y.shape)))
    forward, backward = t.find("", "forward"), t.find("", "backward")
    assert forward.dropped and not forward.relu_skipped
    assert "y = ReLU(shortcut(x))" in forward.describe()
    assert "through the ReLU mask and the shortcut only" in backward.describe()


def test_trace_knows_nothing_of_plots_or_the_stepper():
    """The dependency runs one way: the stepper imports the plots and the trace, the plots import no
    stepper, and the trace imports neither (recording needs no matplotlib)."""
    import ast
    import pathlib
    import subprocess
    import sys

    import minisd

    package = pathlib.Path(minisd.__file__).parent

    def imports(*paths):
        """Modules imported anywhere in the files under ``paths`` (files or folders of the package)."""
        found = set()
        files = [f for p in paths for f in ((package / p).rglob("*.py") if (package / p).is_dir() else [package / p])]
        for tree in (ast.parse(f.read_text()) for f in files):
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        return found

    trace_imports = imports("trace.py")
    assert not {m for m in trace_imports if "plots" in m or "stepper" in m or "matplotlib" in m}, trace_imports
    assert "minisd.stepper" not in imports("plots")
    assert {"minisd.plots.trace_drawings", "minisd.trace"} <= imports("stepper.py")
    loaded = subprocess.run([sys.executable, "-c", "import sys, minisd.trace; "
                             "print('matplotlib' in sys.modules, 'minisd.stepper' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert loaded.stdout.split() == ["False", "False"], loaded.stderr


def test_the_trace_records_which_kernel_tier_ran():
    from minisd import kernels, models

    model = models.resnet_cifar(depth=8, in_channels=1, seed=0)
    x = dev(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    for tier in ("reference", "fast"):
        with kernels.use(tier), trace.record(model) as t:
            model(x)
            ran = kernels.running(x)  # the tier chosen, except on a GPU: the reference
        assert ran == (tier if not backend.is_device_array(x) else "reference")
        assert t.kernels == ran and {e.kernels for e in t.events} == {ran}
        assert t.table().splitlines()[0] == f"kernels: {ran} tier"
    with trace.record(model) as t:
        with kernels.use("reference"):
            logits = model(x)
        model.backward(logits * 0 + 1)
    backward_tier = kernels.running(x)
    assert t.kernels == ("mixed" if backward_tier == "fast" else "reference")
    assert {e.kernels for e in t.forward()} == {"reference"} and {e.kernels for e in t.backward()} == {backward_tier}


def test_one_numbering_table_step_is_stepper_step_and_blocks_are_1_to_L(rng):
    """t.table()'s first column is the step number the stepper gives the same event (filters hide
    rows, never renumber them), and its column l numbers the residual blocks 1..L as the paper does."""
    from minisd.stepper import Stepper

    model, t = traced_step_all_blocks(rng)
    L = len(model.blocks)
    for which in ("layers", "all"):
        s = Stepper(t, which=which, draw=False)
        rows = t.table(which=which).splitlines()[3:]
        assert len(rows) == len(s)
        for n in (1, len(s) // 2, len(s)):
            assert rows[n - 1].split()[0] == str(n)
            assert s.heading(n).startswith(f"step {n} of {len(s)}")
            assert s.walk[n - 1].name in rows[n - 1]
    s = Stepper(t, draw=False)
    for line in t.table(phase="backward", which="blocks").splitlines()[3:]:
        number, phase, l, name = line.split()[:4]
        event = s.walk[int(number) - 1]
        assert (event.phase, event.name, event.block) == (phase, name, int(l))
    blocks = t.block_events("forward")
    assert [e.block for e in blocks] == list(range(1, L + 1))
    inside = t.find(t.block_names[-1] + ".branch.0")
    assert inside.block == L and f"block l = {L}: " in inside.describe()
    assert t.find("conv1").block is None and "block l" not in t.find("conv1").describe()
