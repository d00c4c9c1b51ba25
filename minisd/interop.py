"""The PyTorch twin: the same network in PyTorch, with the same weights, gates and rules.

PyTorch is an optional extra (``pip install ".[torch]"``). ``import minisd`` never imports it; this
module does, and says how to install it if it is missing.

    twin = to_torch(model)             # a torch.nn.Module tree: same names, values, dtype, gates
    model = from_torch(twin)           # and back: a minisd network with the twin's weights
    state_dict_to_torch(model.state_dict())   # plain checkpoints, either way
    state_dict_from_torch(torch.load("checkpoint.pt"))

What the twin copies, and how:

* **names**: every module of the twin sits where it sits in minisd (``layer2.0.branch.3``), so
  ``twin.state_dict().keys()`` equal ``model.state_dict().keys()``, in the same order. Batch norm
  is :class:`BatchNorm2d`, ``torch.nn.BatchNorm2d`` without the ``num_batches_tracked`` counter
  (minisd has none; with a fixed momentum PyTorch only counts with it);
* **values**: exact copies of every parameter and buffer, in the same dtype (float64 stays float64);
* **layers**: ``nn.Conv2d`` (no bias in blocks), batch norm with the same eps and momentum
  (running statistics from the unbiased batch variance in both), ``nn.ReLU``, ``nn.Linear``, and the
  paper's parameter-free transition shortcut (:class:`SubsampleZeroPad`) or the 1x1 projection;
* **stochastic depth** (:class:`BasicBlock`): the block's survival probability, ``mode`` ("batch":
  one gate per block per training forward; "row": one per sample) and ``scale`` ("eval": branch
  times p_l at test time, the paper; "train": kept branches divided by p_l in training). A dropped
  branch is **not called** in forward, so autograd never sees it: its parameters get no gradient
  (``.grad`` stays ``None``), its running statistics are untouched, and nothing is multiplied by zero.
  In a network, a dropped block also skips its output ReLU (its input is a ReLU output, so
  ReLU(shortcut(x)) = shortcut(x)), exactly as minisd's does (see ``minisd.residual.BasicBlock``);
* **gates**: drawn on the host from a NumPy generator, as minisd's are: the twin starts from a copy of
  the minisd network's gate-generator state, so the twin and its original draw the same gates in the
  same order. A batch-mode gate is a Python bool: no device round trip decides a branch, and every
  process seeded alike (``seed_gates``) drops the same blocks, which data-parallel training needs.
  ``block.force_gate(True | False | None)`` and ``twin.force_gates(...)`` fix gates as in minisd.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy

try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError('minisd.interop needs PyTorch: pip install ".[torch]" (or pip install torch)') from error

from minisd import backend
from minisd import layers
from minisd import models
from minisd import residual

__all__ = [
    "to_torch",
    "from_torch",
    "state_dict_to_torch",
    "state_dict_from_torch",
    "BatchNorm2d",
    "SubsampleZeroPad",
    "BasicBlock",
    "ResNetCifar",
]


# ----------------------------------------------------------------------------------------------
# The twin's modules
# ----------------------------------------------------------------------------------------------


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` without the ``num_batches_tracked`` buffer, so state-dict keys are
    minisd's. With a fixed momentum PyTorch uses that counter for nothing but counting; a checkpoint
    that has it (from a plain ``nn.BatchNorm2d``) still loads, the count is dropped."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=None, device=None):
        super().__init__(num_features, eps=eps, momentum=momentum, dtype=dtype, device=device)
        self.register_buffer("num_batches_tracked", None)  # a None buffer is left out of state_dict

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # _NormBase's version shim would add a num_batches_tracked entry to a dict without
        # metadata (a plain dict, as minisd's), which strict loading then rejects as unexpected.
        state_dict.pop(prefix + "num_batches_tracked", None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)


class GlobalAvgPool2d(nn.Module):
    """Mean over H and W: (N, C, H, W) -> (N, C), as ``minisd.layers.GlobalAvgPool2d``."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class SubsampleZeroPad(nn.Module):
    """The paper's transition shortcut: subsample by ``stride``, zero-pad the new channels.

    (N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride)). No parameters.
    """

    def __init__(self, in_channels, out_channels, stride=2):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def forward(self, x):
        sub = x[:, :, ::self.stride, ::self.stride]
        # pad's last pair is the channel axis (the pairs run from the last axis backwards)
        return nn.functional.pad(sub, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))


class BasicBlock(nn.Module):
    """Post-activation residual block with stochastic depth, as ``minisd.residual.BasicBlock``.

    branch: conv3x3(stride) - BN - ReLU - conv3x3 - BN; shortcut: identity, zero-pad or projection.
    Training: ReLU(gate * branch(x) * (1/p if scale == "train" else 1) + shortcut(x)), and a
    dropped branch is never called. Evaluation: ReLU(branch(x) * (p if scale == "eval" else 1) +
    shortcut(x)). Input (N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride)).

    ``gate`` is the last gate drawn (a bool; row mode: a NumPy bool array of length N; None in
    evaluation), ``branch_skipped`` and ``output_relu_skipped`` say what the last forward skipped,
    ``gate_rng`` is the NumPy generator gates come from (a network's blocks share one).
    """

    def __init__(self, in_channels, out_channels, stride=1, survival_prob=1.0, mode="batch", scale="eval",
                 shortcut="zero_pad", gate_rng=None, dtype=None, device=None):
        super().__init__()
        # minisd's own checks give the same one-line errors for a bad mode, scale or probability
        residual.BasicBlock.check_settings(survival_prob, mode, scale, shortcut)
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.survival_prob, self.mode, self.scale = float(survival_prob), mode, scale
        self.gate_rng = gate_rng if gate_rng is not None else numpy.random.default_rng()
        self.gate = None
        self.branch_skipped = False
        self.output_relu_skipped = False
        self.input_is_relu_output = False
        self._forced_gate = None
        factory = {"dtype": dtype, "device": device}
        self.branch = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, **factory),
            BatchNorm2d(out_channels, **factory),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, **factory),
            BatchNorm2d(out_channels, **factory),
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "zero_pad":
            self.shortcut = SubsampleZeroPad(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False, **factory),
                                          BatchNorm2d(out_channels, **factory))

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}, scale={self.scale!r}")

    # The gate rules are minisd's own, word for word: the same forcing, the same draws.
    forced_gate = residual.BasicBlock.forced_gate
    _draw_gate = residual.BasicBlock._draw_gate
    _branch_multiplier = residual.BasicBlock._branch_multiplier
    _decide = residual.BasicBlock._decide

    def describe(self):
        return f"interop.BasicBlock({self.extra_repr()})"

    def force_gate(self, gate) -> None:
        """Fix the gate of training forwards: True (keep), False (drop), None (sample again), or in
        row mode a bool mask of length N (NumPy array or tensor), as minisd's ``force_gate``."""
        if isinstance(gate, torch.Tensor):
            gate = gate.detach().cpu().numpy()
        residual.BasicBlock.force_gate(self, gate)

    def forward(self, x):
        s = self.shortcut(x)
        run_branch, multiplier = self._decide(x.shape[0], not isinstance(self.shortcut, nn.Sequential))
        row_scale = None
        if self.training and self.mode == "row":
            # the mask is decided on the host; one copy of N numbers to the device
            host_scale = self.gate.astype(numpy.float64) * multiplier
            row_scale = torch.as_tensor(host_scale, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        if self.output_relu_skipped:
            return s  # x >= 0, so ReLU(shortcut(x)) = shortcut(x): minisd returns s too
        if not run_branch:
            return torch.relu(s)
        z = self.branch(x)
        if row_scale is not None:
            z = z * row_scale
        elif multiplier != 1.0:
            z = z * multiplier
        return torch.relu(z + s)


class ResNetCifar(nn.Module):
    """The paper's CIFAR ResNet, as ``minisd.models.ResNetCifar``: stem conv3x3(16) - BN - ReLU,
    three stages of blocks (16, 32, 64 channels), global average pool, linear.

    ``blocks`` lists the residual blocks in order, ``survival_probs`` their p_l, ``gate_rng`` is the
    NumPy generator they share. (N, in_channels, H, W) images -> (N, num_classes) logits.
    Built directly, it has the paper's initialisation (He, fan_out, for convolutions; PyTorch's
    default for the linear layer, which is minisd's) drawn from PyTorch's generator, and ``seed``
    seeds only the gates; ``to_torch(resnet_cifar(...))`` copies minisd's weights instead.
    """

    def __init__(self, depth=20, num_classes=10, in_channels=3, schedule="linear", final_survival=0.5,
                 mode="batch", scale="eval", shortcut="zero_pad", seed=0, dtype=None, device=None):
        super().__init__()
        n = models.blocks_per_stage(depth)
        self.depth, self.num_classes, self.in_channels = int(depth), int(num_classes), int(in_channels)
        self.schedule, self.final_survival, self.seed = schedule, float(final_survival), int(seed)
        self.gate_rng = numpy.random.default_rng([int(seed), 1])  # minisd's gate stream for this seed
        self.survival_probs = residual.make_schedule(schedule, 3 * n, final_survival)
        factory = {"dtype": dtype, "device": device}
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False, **factory)
        self.bn1 = BatchNorm2d(16, **factory)
        self.relu = nn.ReLU()
        probs, in_ch, stages = iter(self.survival_probs), 16, []
        for stage, width in enumerate((16, 32, 64)):
            stage_blocks = []
            for index in range(n):
                stride = 2 if (stage > 0 and index == 0) else 1
                block = BasicBlock(in_ch, width, stride, next(probs), mode, scale, shortcut, self.gate_rng, **factory)
                block.input_is_relu_output = True  # as in minisd: a dropped block may skip its output ReLU
                stage_blocks.append(block)
                in_ch = width
            stages.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = GlobalAvgPool2d()
        self.fc = nn.Linear(64, num_classes, **factory)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # the paper's He initialisation (fan_out), as minisd's
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @property
    def blocks(self) -> list:
        """The residual blocks, in order (block l = 1..L is blocks[l - 1])."""
        return [block for stage in (self.layer1, self.layer2, self.layer3) for block in stage]

    force_gates = models.ResNetCifar.force_gates
    gates = models.ResNetCifar.gates
    seed_gates = models.ResNetCifar.seed_gates
    expected_active_blocks = models.ResNetCifar.expected_active_blocks

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x))


# ----------------------------------------------------------------------------------------------
# Conversion, both ways
# ----------------------------------------------------------------------------------------------


def _torch_dtype(numpy_dtype):
    return torch.from_numpy(numpy.zeros(0, dtype=numpy_dtype)).dtype


def _numpy_dtype_name(module: nn.Module) -> str | None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return str(tensor.dtype).removeprefix("torch.")
    return None


def _copy_generator(rng: numpy.random.Generator) -> numpy.random.Generator:
    """A new generator in the same state: the twin draws the gates the original would draw next."""
    twin = numpy.random.Generator(type(rng.bit_generator)())
    twin.bit_generator.state = rng.bit_generator.state
    return twin


def _copy_gate_settings(source, target, gate_rng) -> None:
    """Survival probability, mode, scale, forced gate and the ReLU rule, block by block."""
    target.survival_prob, target.mode, target.scale = float(source.survival_prob), source.mode, source.scale
    target.input_is_relu_output = bool(source.input_is_relu_output)
    forced = source.forced_gate
    target._forced_gate = forced.copy() if isinstance(forced, numpy.ndarray) else forced
    target.gate_rng = gate_rng


def _shortcut_kind(*blocks) -> str:
    """"projection" if a transition block has the 1x1-conv shortcut, else "zero_pad"."""
    projection = any(isinstance(block.shortcut, (layers.Sequential, nn.Sequential)) for block in blocks)
    return "projection" if projection else "zero_pad"


def _twin_of(module: layers.Module, dtype, path: str) -> nn.Module:
    """An nn.Module of the same structure and settings as ``module`` (values are loaded after)."""
    factory = {"dtype": dtype}
    if isinstance(module, models.ResNetCifar):
        first = module.blocks[0]
        twin = ResNetCifar(module.depth, module.num_classes, module.in_channels, module.schedule,
                           module.final_survival, first.mode, first.scale, _shortcut_kind(*module.blocks), **factory)
        twin.gate_rng = _copy_generator(module.gate_rng)
        for source, target in zip(module.blocks, twin.blocks):
            _copy_gate_settings(source, target, twin.gate_rng)
        twin.survival_probs = [block.survival_prob for block in twin.blocks]
        return twin
    if isinstance(module, residual.BasicBlock):
        twin = BasicBlock(module.in_channels, module.out_channels, module.stride, module.survival_prob, module.mode,
                          module.scale, _shortcut_kind(module), **factory)
        _copy_gate_settings(module, twin, _copy_generator(module.gate_rng))
        return twin
    if isinstance(module, residual.SubsampleZeroPad):
        return SubsampleZeroPad(module.in_channels, module.out_channels, module.stride)
    if isinstance(module, layers.Conv2d):
        return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                         bias="bias" in module.params, **factory)
    if isinstance(module, layers.BatchNorm2d):
        return BatchNorm2d(module.num_features, module.eps, module.momentum, **factory)
    if isinstance(module, layers.Linear):
        return nn.Linear(module.in_features, module.out_features, bias="bias" in module.params, **factory)
    if isinstance(module, layers.ReLU):
        return nn.ReLU()
    if isinstance(module, layers.Identity):
        return nn.Identity()
    if isinstance(module, layers.GlobalAvgPool2d):
        return GlobalAvgPool2d()
    if isinstance(module, layers.Sequential):
        return nn.Sequential(*[_twin_of(child, dtype, f"{path}.{index}".lstrip("."))
                               for index, child in enumerate(module)])
    raise TypeError(f"to_torch: no PyTorch twin for {type(module).__name__} at {path or 'the root'!r}; expected "
                    "resnet_cifar or one of its layers (BasicBlock, Conv2d, BatchNorm2d, Linear, ReLU, ...)")


def to_torch(model: layers.Module, device=None) -> nn.Module:
    """The PyTorch twin of a minisd network or layer: same module names, parameters and buffers
    (exact copies, same dtype), the same stochastic-depth settings, gate-generator state and forced
    gates, and the same training/evaluation mode. ``device``: where the twin's tensors go (default CPU).
    """
    if not isinstance(model, layers.Module):
        raise TypeError(f"to_torch: expected a minisd module, got {type(model).__name__}")
    twin = _twin_of(model, _torch_dtype(model.dtype) if model.dtype is not None else None, "")
    twin.load_state_dict(state_dict_to_torch(model.state_dict()))
    twin.train(model.training)
    return twin.to(device) if device is not None else twin


def _minisd_of(module: nn.Module, dtype, path: str) -> layers.Module:
    """A minisd module of the same structure and settings as the torch ``module``."""
    where = path or "the root"
    if isinstance(module, ResNetCifar):
        first = module.blocks[0]
        model = models.resnet_cifar(module.depth, module.num_classes, module.in_channels, module.schedule,
                                    module.final_survival, first.mode, first.scale, _shortcut_kind(*module.blocks),
                                    module.seed, dtype)
        model.gate_rng = _copy_generator(module.gate_rng)
        for source, target in zip(module.blocks, model.blocks):
            _copy_gate_settings(source, target, model.gate_rng)
        model.survival_probs = [block.survival_prob for block in model.blocks]
        return model
    if isinstance(module, BasicBlock):
        block = residual.BasicBlock(module.in_channels, module.out_channels, module.stride, module.survival_prob,
                                    module.mode, module.scale, _shortcut_kind(module), dtype=dtype)
        _copy_gate_settings(module, block, _copy_generator(module.gate_rng))
        return block
    if isinstance(module, SubsampleZeroPad):
        return residual.SubsampleZeroPad(module.in_channels, module.out_channels, module.stride)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros" \
                or isinstance(module.padding, str):
            raise ValueError(f"from_torch: {where} is {module}; minisd's Conv2d has groups=1, dilation=1 and "
                             "numeric zero padding")
        return layers.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, bias=module.bias is not None, dtype=dtype)
    if isinstance(module, nn.BatchNorm2d):
        if module.momentum is None or not module.affine or not module.track_running_stats:
            raise ValueError(f"from_torch: {where} is {module}; minisd's BatchNorm2d has a fixed momentum, "
                             "affine=True and running statistics")
        return layers.BatchNorm2d(module.num_features, module.eps, module.momentum, dtype=dtype)
    if isinstance(module, nn.Linear):
        return layers.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
    if isinstance(module, nn.ReLU):
        return layers.ReLU()
    if isinstance(module, nn.Identity):
        return layers.Identity()
    if isinstance(module, GlobalAvgPool2d):
        return layers.GlobalAvgPool2d()
    if isinstance(module, nn.Sequential):
        return layers.Sequential(*[_minisd_of(child, dtype, f"{path}.{name}".lstrip("."))
                                   for name, child in module.named_children()])
    raise TypeError(f"from_torch: no minisd layer for {type(module).__name__} at {where!r}; expected a twin made "
                    "by to_torch or one of nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.Identity, nn.Sequential")


def from_torch(module: nn.Module) -> layers.Module:
    """The minisd network (on the current backend) with the weights, buffers, stochastic-depth
    settings, gate-generator state and mode of a PyTorch twin (or of a plain ``nn.Sequential`` of
    the layers minisd has). Values are exact copies in the same dtype."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    model = _minisd_of(module, _numpy_dtype_name(module), "")
    model.load_state_dict(state_dict_from_torch(module.state_dict()))
    model.train(module.training)
    return model


# ----------------------------------------------------------------------------------------------
# Plain state dicts
# ----------------------------------------------------------------------------------------------

# Prefixes PyTorch's wrappers put before every key: DistributedDataParallel and DataParallel
# ("module."), torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def state_dict_to_torch(state, device=None) -> "OrderedDict[str, torch.Tensor]":
    """minisd state dict (NumPy or CuPy arrays) -> the same keys with CPU (or ``device``) tensors,
    exact copies in the same dtype; ``twin.load_state_dict`` or ``torch.save`` take it."""
    converted = OrderedDict()
    for key, value in state.items():
        tensor = torch.from_numpy(numpy.array(backend.to_numpy(value), copy=True))
        converted[key] = tensor.to(device) if device is not None else tensor
    return converted


def state_dict_from_torch(state) -> "OrderedDict[str, numpy.ndarray]":
    """PyTorch state dict -> the same keys with NumPy arrays (exact copies, same dtype), ready for
    ``model.load_state_dict`` (which moves them to the model's backend).

    Also reads checkpoints of the twin trained with PyTorch's wrappers: a prefix that every key
    carries ("module." from DistributedDataParallel, "_orig_mod." from torch.compile) is removed,
    and batch norm's ``num_batches_tracked`` counters (a plain ``nn.BatchNorm2d``'s) are dropped:
    minisd's batch norm has a fixed momentum and no counter.
    """
    items = [(key, value) for key, value in state.items() if not key.endswith("num_batches_tracked")]
    for prefix in _WRAPPER_PREFIXES:
        if items and all(key.startswith(prefix) for key, _ in items):
            items = [(key[len(prefix):], value) for key, value in items]
    converted = OrderedDict()
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict_from_torch: {key!r} is a {type(value).__name__}, expected a tensor")
        converted[key] = value.detach().cpu().numpy().copy()
    return converted
