"""The PyTorch twin (minisd.interop) computes what minisd computes.

Everything is compared in float64, as a relative error over each whole array,
max |minisd - torch| / max |minisd|, which must be 1e-9 or less (measured: about 1e-15). PyTorch
is an optional extra: without it this module is skipped with one line. (That ``import minisd``
never imports torch is tested in test_imports.py, where it runs without torch too.)
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason='PyTorch is an optional extra: pip install ".[torch]"')

from helpers import dev, host, randomise_batch_norm  # noqa: E402

from minisd import functional as F  # noqa: E402
from minisd import interop, layers, models, optim, residual  # noqa: E402

TOLERANCE = 1e-9
# ResNet-20 has 9 blocks: blocks 4 and 7 (l = 4, 7) are the transitions. This mix drops a
# transition (4), a block right after a dropped one (2 then 3 kept, 8 and 9 both dropped) and the last.
MIXED_GATES = [True, False, True, False, True, True, True, False, False]


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |ours| over the whole array (0 when both are all zero)."""
    ours = np.asarray(host(ours), dtype=np.float64)
    theirs = theirs.detach().cpu().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours.shape == theirs.shape
    scale = np.abs(ours).max()
    difference = np.abs(ours - theirs).max()
    return float(difference / scale) if scale > 0 else float(difference)


def float64_network(rng, **settings):
    """resnet_cifar(20) in float64 with random batch-norm affine parameters and running statistics,
    so that no comparison runs at the special point gamma = 1, beta = 0, mean = 0, var = 1."""
    model = randomise_batch_norm(models.resnet_cifar(20, dtype="float64", **settings), rng)
    for module in model.modules():
        if isinstance(module, layers.BatchNorm2d):
            module.buffers["running_mean"][...] = dev(rng.normal(0.0, 0.2, module.num_features))
            module.buffers["running_var"][...] = dev(rng.uniform(0.5, 2.0, module.num_features))
    return model


def one_step_in_both(model, twin, x, labels):
    """One training forward and backward in each framework; returns what the test compares."""
    logits = model(dev(x))
    loss, cache = F.softmax_cross_entropy_forward(logits, dev(labels))
    model.zero_grad()
    dx = model.backward(F.softmax_cross_entropy_backward(1.0, cache))

    x_torch = torch.tensor(x, requires_grad=True)
    twin_logits = twin(x_torch)
    twin_loss = torch.nn.functional.cross_entropy(twin_logits, torch.from_numpy(labels))
    twin_loss.backward()
    return (loss, dx), (twin_loss, x_torch.grad)


def assert_same_step(model, twin, rng, dropped_names=()):
    """Loss, input gradient, every parameter gradient, the running statistics after the step, and
    the evaluation output afterwards: all within TOLERANCE. Returns the worst relative error."""
    x = rng.standard_normal((8, 3, 8, 8))
    labels = rng.integers(0, 10, 8)
    (loss, dx), (twin_loss, twin_dx) = one_step_in_both(model, twin, x, labels)
    errors = {"loss": relative_error(loss, twin_loss), "input gradient": relative_error(dx, twin_dx)}

    twin_params = dict(twin.named_parameters())
    assert list(twin_params) == [name for name, _ in model.named_parameters()]
    for name, grad in model.named_grads():
        twin_grad = twin_params[name].grad
        if twin_grad is None:  # autograd never saw the parameter: its branch was not called
            assert name in dropped_names and not np.any(host(grad)), name
            continue
        errors[f"grad {name}"] = relative_error(grad, twin_grad)
    assert {n for n, p in twin_params.items() if p.grad is None} == set(dropped_names)

    twin_buffers = dict(twin.named_buffers())
    for name, value in model.named_buffers():
        errors[f"after the step: {name}"] = relative_error(value, twin_buffers[name])

    model.eval(), twin.eval()
    x_eval = rng.standard_normal((8, 3, 8, 8))
    with torch.no_grad():
        errors["evaluation output"] = relative_error(model(dev(x_eval)), twin(torch.from_numpy(x_eval)))
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"
    print(f"worst relative error {errors[worst]:.2e} ({worst}); loss {errors['loss']:.1e}, "
          f"input gradient {errors['input gradient']:.1e}, evaluation {errors['evaluation output']:.1e}")
    return errors[worst]


def dropped_branch_names(model, gates):
    """Dotted names of the branch parameters of the blocks whose gate is False."""
    return {f"{prefix}.branch.{name}" for (prefix, block), gate in zip(block_names(model), gates)
            if not np.any(gate) for name, _ in block.branch.named_parameters()}


def block_names(model):
    """(dotted name, block) for each residual block, in order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, residual.BasicBlock)]


# ----------------------------------------------------------------------------------------------
# The same values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_twin_state_dict_has_minisd_keys_order_values_and_dtype(dtype):
    model = models.resnet_cifar(20, dtype=dtype, seed=3)
    twin = interop.to_torch(model)
    ours, theirs = model.state_dict(), twin.state_dict()
    assert list(theirs) == list(ours)  # no num_batches_tracked, same order
    for key, value in ours.items():
        assert theirs[key].dtype == getattr(torch, dtype), key
        assert np.array_equal(host(value), theirs[key].numpy()), key
    assert twin.training and [b.survival_prob for b in twin.blocks] == model.survival_probs


def test_twin_holds_copies_not_views():
    model = models.resnet_cifar(20, dtype="float64")
    twin = interop.to_torch(model)
    with torch.no_grad():
        twin.conv1.weight.add_(1.0)
    assert not np.array_equal(host(model.conv1.params["weight"]), twin.conv1.weight.detach().numpy())


# ----------------------------------------------------------------------------------------------
# One training step, float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["eval", "train"])
def test_training_step_with_mixed_forced_gates_matches_in_float64(rng, scale):
    model = float64_network(rng, scale=scale)
    model.force_gates(MIXED_GATES)
    twin = interop.to_torch(model)  # the forced gates travel with it
    assert [b.forced_gate for b in twin.blocks] == MIXED_GATES
    assert_same_step(model, twin, rng, dropped_branch_names(model, MIXED_GATES))
    assert twin.gates() == model.gates() == [None] * 9  # evaluation ran last


def test_projection_shortcut_network_matches_in_float64(rng):
    model = float64_network(rng, shortcut="projection")
    model.force_gates(MIXED_GATES)
    assert_same_step(model, interop.to_torch(model), rng, dropped_branch_names(model, MIXED_GATES))


def test_row_mode_with_inverted_scaling_matches_in_float64(rng):
    model = float64_network(rng, mode="row", scale="train")
    masks = [rng.random(8) < 0.5 for _ in model.blocks]
    masks[0][:] = True  # every sample kept
    masks[4][:] = False  # every sample dropped: the branch is skipped, as in batch mode
    masks[8][:2] = [True, False]  # at least one of each
    model.force_gates(masks)
    assert_same_step(model, interop.to_torch(model), rng, dropped_branch_names(model, masks))


def test_one_sgd_step_moves_the_weights_alike(rng):
    """PyTorch's SGD leaves a parameter whose .grad is None untouched: minisd's skip_unused=True."""
    model = float64_network(rng)
    model.force_gates(MIXED_GATES)
    twin = interop.to_torch(model)
    settings = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    ours, theirs = optim.SGD(model, skip_unused=True, **settings), torch.optim.SGD(twin.parameters(), **settings)
    for _ in range(2):  # the second step uses the momentum buffers
        x, labels = rng.standard_normal((8, 3, 8, 8)), rng.integers(0, 10, 8)
        theirs.zero_grad()
        one_step_in_both(model, twin, x, labels)
        ours.step(), theirs.step()
    twin_params = dict(twin.named_parameters())
    for name, value in model.named_parameters():
        assert relative_error(value, twin_params[name]) <= TOLERANCE, name


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_twin_draws_the_same_gates_as_minisd(rng, mode):
    model = models.resnet_cifar(20, final_survival=0.3, mode=mode, dtype="float64", seed=5)
    twin = interop.to_torch(model)
    x = rng.standard_normal((4, 3, 8, 8))
    drawn = []
    for _ in range(4):
        model(dev(x))
        with torch.no_grad():
            twin(torch.from_numpy(x))
        drawn.append(model.gates())
        assert [np.array_equal(a, b) for a, b in zip(twin.gates(), model.gates())] == [True] * 9
    assert any(not np.all(g) for gates in drawn for g in gates)  # some were dropped: the check can fail


def test_a_dropped_branch_in_the_twin_is_never_called(rng):
    model = float64_network(rng)
    twin = interop.to_torch(model)
    twin.force_gates(MIXED_GATES)
    calls = [0] * len(twin.blocks)
    for index, block in enumerate(twin.blocks):
        block.branch.register_forward_hook(lambda module, inputs, output, index=index: calls.__setitem__(
            index, calls[index] + 1))
    before = {name: value.clone() for name, value in twin.named_buffers()}
    logits = twin(torch.from_numpy(rng.standard_normal((4, 3, 8, 8))))
    logits.sum().backward()
    assert calls == [int(gate) for gate in MIXED_GATES]
    assert [b.branch_skipped for b in twin.blocks] == [not gate for gate in MIXED_GATES]
    assert [b.output_relu_skipped for b in twin.blocks] == [not gate for gate in MIXED_GATES]
    for block, gate in zip(twin.blocks, MIXED_GATES):
        assert all((p.grad is None) == (not gate) for p in block.branch.parameters())
        for name, value in block.branch.named_buffers():
            assert torch.equal(value, dict(block.branch.named_buffers())[name])
    changed = {name for name, value in twin.named_buffers() if not torch.equal(value, before[name])}
    kept_prefixes = [f"layer{1 + i // 3}.{i % 3}." for i, gate in enumerate(MIXED_GATES) if gate]
    assert changed == {name for name in before if name.startswith(("bn1.", *kept_prefixes))}

    twin.eval()
    with torch.no_grad():
        twin(torch.from_numpy(rng.standard_normal((4, 3, 8, 8))))
    assert calls == [int(gate) + 1 for gate in MIXED_GATES]  # evaluation runs every branch


def test_force_gate_takes_a_tensor_mask_in_row_mode_and_rejects_bad_gates():
    block = interop.to_torch(residual.BasicBlock(4, 4, survival_prob=0.5, mode="row", dtype="float64"))
    block.force_gate(torch.tensor([True, False, True]))
    block(torch.randn(3, 4, 5, 5, dtype=torch.float64))
    assert block.gate.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="force_gate expects True, False, None"):
        block.force_gate(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="unknown mode 'rows'"):
        interop.BasicBlock(4, 4, mode="rows")


# ----------------------------------------------------------------------------------------------
# Round trips and checkpoints
# ----------------------------------------------------------------------------------------------


def test_round_trip_is_exact_with_settings_and_gate_stream(rng):
    model = float64_network(rng, mode="row", scale="train", final_survival=0.2, seed=7)
    model.blocks[2].force_gate(np.array([True, False, True, False]))
    model.blocks[5].force_gate(False)
    model.eval()
    back = interop.from_torch(interop.to_torch(model))
    assert type(back) is models.ResNetCifar and not back.training
    assert list(back.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert back.state_dict()[key].dtype == value.dtype and np.array_equal(host(back.state_dict()[key]),
                                                                                host(value)), key
    for ours, theirs in zip(model.blocks, back.blocks):
        assert (ours.survival_prob, ours.mode, ours.scale) == (theirs.survival_prob, theirs.mode, theirs.scale)
        assert np.array_equal(ours.forced_gate, theirs.forced_gate) if ours.forced_gate is not None \
            else theirs.forced_gate is None
    model.train(), back.train()
    x = dev(rng.standard_normal((4, 3, 8, 8)))
    assert np.array_equal(host(model(x)), host(back(x)))  # same weights, same gates drawn: same bits


def test_checkpoint_saved_by_pytorch_loads_into_minisd(rng, tmp_path):
    """A twin trained with PyTorch's wrappers: DDP's "module." prefix and plain nn.BatchNorm2d
    counters are read as minisd's names."""
    model = float64_network(rng)
    twin = interop.to_torch(model)
    state = {f"module.{key}": value for key, value in twin.state_dict().items()}
    state["module.bn1.num_batches_tracked"] = torch.tensor(12)
    torch.save(state, tmp_path / "twin.pt")
    fresh = models.resnet_cifar(20, dtype="float64", seed=1)
    fresh.load_state_dict(interop.state_dict_from_torch(torch.load(tmp_path / "twin.pt")))
    for key, value in model.state_dict().items():
        assert np.array_equal(host(fresh.state_dict()[key]), host(value)), key


def test_minisd_state_dict_loads_strictly_into_twin_and_plain_batch_norm():
    model = models.resnet_cifar(20, dtype="float64", seed=2)
    twin = interop.ResNetCifar(20, dtype=torch.float64)  # built directly: PyTorch's own random weights
    twin.load_state_dict(interop.state_dict_to_torch(model.state_dict()))  # strict, no metadata
    assert torch.equal(twin.fc.weight, torch.from_numpy(host(model.fc.params["weight"])))
    plain = torch.nn.BatchNorm2d(16, dtype=torch.float64)  # the counter of a plain one is not required
    plain.load_state_dict(interop.state_dict_to_torch({k[4:]: v for k, v in model.state_dict().items()
                                                       if k.startswith("bn1.")}))
    assert torch.equal(plain.running_var, twin.bn1.running_var)


def test_twin_built_directly_has_minisd_names_and_converts_back():
    twin = interop.ResNetCifar(32, num_classes=7, mode="row", scale="train", dtype=torch.float64)
    model = interop.from_torch(twin)
    assert list(model.state_dict()) == list(models.resnet_cifar(32, num_classes=7).state_dict())
    assert [(b.mode, b.scale) for b in model.blocks] == [("row", "train")] * 15
    # the paper's He initialisation (fan_out): std sqrt(2 / (16 * 9)) for the stem
    assert abs(float(twin.conv1.weight.detach().std()) - (2 / (16 * 9)) ** 0.5) < 0.03


def test_building_blocks_convert_both_ways(rng):
    stack = layers.Sequential(layers.Conv2d(3, 8, 3, stride=2, padding=1, dtype="float64"),
                              layers.BatchNorm2d(8, dtype="float64"), layers.ReLU(), layers.GlobalAvgPool2d(),
                              layers.Linear(8, 5, dtype="float64"))
    twin = interop.to_torch(stack)
    assert isinstance(twin, torch.nn.Sequential) and isinstance(twin[1], interop.BatchNorm2d)
    x = rng.standard_normal((4, 3, 9, 9))
    assert relative_error(stack(dev(x)), twin(torch.from_numpy(x))) <= TOLERANCE
    back = interop.from_torch(twin)
    assert [type(m) for m in back] == [type(m) for m in stack]


def test_standalone_dropped_block_keeps_its_output_relu(rng):
    """Outside a network the input may be negative: a dropped block returns ReLU(shortcut(x))."""
    block = residual.BasicBlock(4, 8, stride=2, survival_prob=0.5, dtype="float64")
    block.force_gate(False)
    twin = interop.to_torch(block)
    x = rng.standard_normal((2, 4, 6, 6))
    out = twin(torch.from_numpy(x))
    assert relative_error(block(dev(x)), out) == 0.0 and float(out.min()) == 0.0
    assert twin.branch_skipped and not twin.output_relu_skipped


def test_unsupported_modules_fail_with_one_line():
    with pytest.raises(TypeError, match="from_torch: no minisd layer for LSTM at 'the root'"):
        interop.from_torch(torch.nn.LSTM(3, 3))
    with pytest.raises(ValueError, match="from_torch: 1 is .*groups=1"):
        interop.from_torch(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(TypeError, match="to_torch: expected a minisd module"):
        interop.to_torch(torch.nn.ReLU())
