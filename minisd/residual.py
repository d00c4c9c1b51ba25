"""Residual blocks with stochastic depth (Huang, Sun, Liu, Sedra, Weinberger, ECCV 2016).

The paper's block (post-activation ResNet)::

    H_l = ReLU(b_l * f_l(H_{l-1}) + shortcut(H_{l-1})),     b_l ~ Bernoulli(p_l)

* training, b_l = 1: the branch f_l runs as usual;
* training, b_l = 0: f_l is **not called** in forward and its backward is **never called**; the
  gradient reaches the input through the output ReLU and the shortcut only. This skipped work is
  where the paper's ~25% training-time saving comes from;
* test time: every branch runs, scaled by its survival probability:
  H_l = ReLU(p_l * f_l(H_{l-1}) + shortcut(H_{l-1}))  (``scale="eval"``, the paper's rule);
  or ``scale="train"``: kept branches are divided by p_l during training and run unscaled at test
  time (inverted scaling, as timm and torchvision do). Both have the same expected output.

``mode="batch"`` draws one gate per block per step for the whole mini-batch (the paper);
``mode="row"`` draws one gate per sample (timm's ``drop_path``, torchvision's
``stochastic_depth(mode="row")``): the branch runs on the whole batch and dropped samples get
exactly zero gradient at the branch's output. (Their *input* gradient through the branch is not
zero when the branch has batch norm: batch statistics couple the samples, in timm too.)

Gates are drawn on the host from a seeded NumPy generator (a Python bool per block in batch mode),
so the same seed gives the same gates on NumPy and CuPy, and no device round trip decides whether
a branch runs.
"""
from __future__ import annotations

import numpy

from minisd import backend
from minisd import kernels
from minisd.layers import BatchNorm2d, Conv2d, Identity, Module, ReLU, Sequential

__all__ = [
    "linear_decay",
    "uniform",
    "constant",
    "make_schedule",
    "expected_active_blocks",
    "SubsampleZeroPad",
    "BasicBlock",
    "SCHEDULES",
]

SCHEDULES = ("linear", "uniform", "none")
MODES = ("batch", "row")
SCALES = ("eval", "train")


# ----------------------------------------------------------------------------------------------
# Survival-probability schedules
# ----------------------------------------------------------------------------------------------


def _check_probability(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{what}: expected a survival probability in [0, 1], got {value}")
    return value


def linear_decay(num_blocks: int, final_survival: float = 0.5) -> list[float]:
    """The paper's rule: p_l = 1 - (l / L) * (1 - p_L) for blocks l = 1..L (input: p_0 = 1).

    Every residual block counts, transition blocks included, so the last block has p_L.
    """
    p_last = _check_probability(final_survival, "linear_decay")
    if num_blocks < 1:
        raise ValueError(f"linear_decay: expected num_blocks >= 1, got {num_blocks}")
    return [1.0 - (l / num_blocks) * (1.0 - p_last) for l in range(1, num_blocks + 1)]


def uniform(num_blocks: int, survival: float = 0.5) -> list[float]:
    """The same survival probability p for every block."""
    p = _check_probability(survival, "uniform")
    return [p] * int(num_blocks)


def constant(num_blocks: int) -> list[float]:
    """Constant depth (no stochastic depth): p_l = 1 for every block."""
    return [1.0] * int(num_blocks)


def make_schedule(schedule: str, num_blocks: int, final_survival: float = 0.5) -> list[float]:
    """``"linear"`` (linear decay to p_L), ``"uniform"`` (p_L everywhere) or ``"none"`` (all 1)."""
    if schedule == "linear":
        return linear_decay(num_blocks, final_survival)
    if schedule == "uniform":
        return uniform(num_blocks, final_survival)
    if schedule in ("none", "constant", None):
        return constant(num_blocks)
    raise ValueError(f"unknown stochastic-depth schedule {schedule!r}; expected one of {SCHEDULES}")


def expected_active_blocks(probs) -> float:
    """E[number of active blocks] = sum of p_l (the paper: about 40 of 54 for ResNet-110, p_L = 0.5)."""
    return float(sum(probs))


# ----------------------------------------------------------------------------------------------
# The parameter-free transition shortcut
# ----------------------------------------------------------------------------------------------


class SubsampleZeroPad(Module):
    """The paper's transition shortcut: subsample by ``stride``, zero-pad the new channels.

    (N, in_channels, H, W) -> (N, out_channels, ceil(H/stride), ceil(W/stride)). No parameters.
    """

    def __init__(self, in_channels, out_channels, stride=2):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        if self.out_channels < self.in_channels:
            raise ValueError(f"{self.describe()}: out_channels must be >= in_channels")

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"

    def forward(self, x):
        self._check_input(x, 4, self.in_channels)
        y, cache = kernels.current(x).shortcut_forward(x, self.out_channels, self.stride)
        return self._keep(cache, y)

    def backward(self, dy):
        return kernels.current(dy).shortcut_backward(dy, self._take(dy))


# ----------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------


class BasicBlock(Module):
    """Post-activation residual block with stochastic depth.

    branch:   conv3x3(stride) - BN - ReLU - conv3x3 - BN
    shortcut: identity; for a transition (stride != 1 or more channels) the paper's subsample and
              zero-pad (``shortcut="zero_pad"``) or a 1x1 conv + BN (``shortcut="projection"``).
    output:   ReLU(gate * branch(x) * scale + shortcut(x)).

    Input (N, in_channels, H, W) -> output (N, out_channels, ceil(H/stride), ceil(W/stride)).

    Attributes for tests and teaching:
        gate        last gate drawn in training: a bool (batch mode), a NumPy bool array of length
                    N (row mode), or None before any training forward. In evaluation it is None.
        force_gate  force_gate(True | False | None | bool array): fix the gate (None: sample again).
        branch_skipped  True if the last forward did not run the branch.
        output_relu_skipped  True if the last forward also skipped the output ReLU (a dropped block
                    whose input is known to be a ReLU output: see ``input_is_relu_output``).
        input_is_relu_output  False (the default): make no assumption about the input. A model
                    sets it to True on blocks whose input is always the output of a ReLU (or of
                    another such block), as ResNetCifar does: then a dropped block with a
                    parameter-free shortcut returns shortcut(x) without the output ReLU (see
                    :meth:`forward`).
    """

    def __init__(self, in_channels, out_channels, stride=1, survival_prob=1.0, mode="batch", scale="eval",
                 shortcut="zero_pad", dtype=None, rng=None, gate_rng=None):
        super().__init__()
        self.survival_prob = self.check_settings(survival_prob, mode, scale, shortcut)
        self.in_channels, self.out_channels, self.stride = int(in_channels), int(out_channels), int(stride)
        self.mode, self.scale = mode, scale
        self.gate_rng = gate_rng if gate_rng is not None else backend.host_rng()
        self.gate = None
        self.branch_skipped = False
        self.output_relu_skipped = False
        self._forced_gate = None
        self.input_is_relu_output = False
        self.branch = Sequential(
            Conv2d(in_channels, out_channels, 3, stride, 1, bias=False, dtype=dtype, rng=rng),
            BatchNorm2d(out_channels, dtype=dtype),
            ReLU(),
            Conv2d(out_channels, out_channels, 3, 1, 1, bias=False, dtype=dtype, rng=rng),
            BatchNorm2d(out_channels, dtype=dtype),
        )
        if stride == 1 and in_channels == out_channels:
            self.shortcut = Identity()
        elif shortcut == "zero_pad":
            self.shortcut = SubsampleZeroPad(in_channels, out_channels, stride)
        else:
            self.shortcut = Sequential(
                Conv2d(in_channels, out_channels, 1, stride, 0, bias=False, dtype=dtype, rng=rng),
                BatchNorm2d(out_channels, dtype=dtype),
            )

    @staticmethod
    def check_settings(survival_prob, mode, scale, shortcut) -> float:
        """One-line ValueError for a bad setting (the PyTorch twin checks with this too); returns p."""
        if mode not in MODES:
            raise ValueError(f"BasicBlock: unknown mode {mode!r}; expected one of {MODES}")
        if scale not in SCALES:
            raise ValueError(f"BasicBlock: unknown scale rule {scale!r}; expected one of {SCALES}")
        if shortcut not in ("zero_pad", "projection"):
            raise ValueError(f"BasicBlock: unknown shortcut {shortcut!r}; expected 'zero_pad' or 'projection'")
        p = _check_probability(survival_prob, "BasicBlock")
        if p == 0.0 and scale == "train":
            raise ValueError("BasicBlock: survival_prob=0 with scale='train' would divide by zero; "
                             "use scale='eval' or a positive survival probability")
        return p

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"survival_prob={self.survival_prob:.4g}, mode={self.mode!r}, scale={self.scale!r}")

    def __repr__(self):
        return f"BasicBlock({self.extra_repr()})"

    # ---- gates --------------------------------------------------------------------------------

    def force_gate(self, gate) -> None:
        """Fix the gate used by training forwards: True (keep), False (drop), a bool array of
        length N (row mode: keep per sample), or None to sample again from ``gate_rng``."""
        if gate is None or isinstance(gate, (bool, numpy.bool_)):
            self._forced_gate = None if gate is None else bool(gate)
            return
        mask = numpy.asarray(backend.to_numpy(gate))
        if self.mode != "row" or mask.ndim != 1 or mask.dtype != bool:
            raise ValueError(f"{self.describe()}: force_gate expects True, False, None, or (row mode) a 1-D bool array; "
                             f"got {gate!r}")
        self._forced_gate = mask

    @property
    def forced_gate(self):
        return self._forced_gate

    def _draw_gate(self, batch_size: int):
        """Batch mode: one Python bool. Row mode: a NumPy bool array, one entry per sample."""
        forced = self._forced_gate
        if self.mode == "batch":
            if forced is not None:
                return forced  # a bool: force_gate takes arrays in row mode only
            if self.survival_prob >= 1.0:
                return True  # no draw: p = 1 must not consume random numbers
            return bool(self.gate_rng.random() < self.survival_prob)
        if forced is not None:
            if isinstance(forced, numpy.ndarray):
                if forced.shape != (batch_size,):
                    raise ValueError(f"{self.describe()}: forced row gate has shape {forced.shape}, batch has {batch_size} samples")
                return forced.copy()
            return numpy.full(batch_size, forced, dtype=bool)
        if self.survival_prob >= 1.0:
            return numpy.ones(batch_size, dtype=bool)
        return self.gate_rng.random(batch_size) < self.survival_prob

    def _branch_multiplier(self) -> float:
        """What a kept branch is multiplied by: 1/p in training with inverted scaling, p at test
        time with the paper's rule, else 1."""
        p = self.survival_prob
        if self.training:
            return 1.0 / p if self.scale == "train" else 1.0
        return p if self.scale == "eval" else 1.0

    # ---- forward / backward -------------------------------------------------------------------

    def _decide(self, batch_size: int, parameter_free_shortcut: bool) -> tuple[bool, float]:
        """The host-side decisions of one forward (the PyTorch twin makes them with this too):
        draws the gate in training, sets ``gate``, ``branch_skipped`` and ``output_relu_skipped``,
        and returns (run_branch, the multiplier of a kept branch)."""
        multiplier = self._branch_multiplier()
        if self.training:
            self.gate = self._draw_gate(batch_size)
            # row mode: every sample dropped skips the branch too
            run_branch = self.gate if self.mode == "batch" else bool(self.gate.any())
        else:
            self.gate = None
            run_branch = multiplier != 0.0  # p = 0 at test time with the paper's rule: f * 0
        self.branch_skipped = not run_branch
        self.output_relu_skipped = not run_branch and self.input_is_relu_output and parameter_free_shortcut
        return run_branch, multiplier

    def forward(self, x):
        self._check_input(x, 4, self.in_channels)
        xp = backend.array_module(x)
        s = self.shortcut(x)
        run_branch, multiplier = self._decide(x.shape[0], not isinstance(self.shortcut, Sequential))
        row_scale = None
        if self.training and self.mode == "row":
            # One host-to-device copy of N numbers; the mask itself was decided on the host.
            row_scale = xp.asarray(self.gate.astype(x.dtype) * x.dtype.type(multiplier))
            row_scale = row_scale.reshape(-1, 1, 1, 1)
        if self.output_relu_skipped:
            # The dropped block of a network, for almost nothing. Its input x is a ReLU output,
            # so x >= 0, and the parameter-free shortcut (identity, or subsample and zero-pad)
            # keeps s >= 0: ReLU(0 + s) = s, so forward returns s itself (no pass, no mask).
            # Backward then returns shortcut.backward(dy), without the output ReLU's mask
            # (x > 0). That mask is the mask of the ReLU that produced x (relu(u) > 0 exactly
            # where u > 0), which multiplies the gradient by it again on its way back: every
            # parameter's and the network input's gradient is bit for bit the same. Only the
            # gradient at this block's input differs, where x == 0 (a dead pixel), taking
            # ReLU'(0) = 1 there instead of 0 (both are subgradients); the ReLU before it zeroes
            # those entries. A standalone block (input_is_relu_output False, the default, as in
            # the gradient checks, which feed negative inputs) keeps the ReLU. The output ReLU was
            # most of a dropped block's cost (measured: docs/performance.md#a-dropped-block-skips-its-output-relu).
            return self._keep((None, False, None, multiplier), s)  # no mask: no output ReLU
        if run_branch:
            # The branch's output (a fresh array from its last batch norm, whose cache keeps only
            # the centred values) belongs to this block: scale and sum in place, no new arrays.
            z = self.branch(x)
            if row_scale is not None:
                z *= row_scale
            elif multiplier != 1.0:
                z *= x.dtype.type(multiplier)
            z += s
        else:
            z = s
        y, mask = kernels.current(z).relu_forward(z)
        return self._keep((mask, run_branch, row_scale, multiplier), y)

    def backward(self, dy):
        mask, ran_branch, row_scale, multiplier = self._take(dy)
        if mask is None:  # dropped, input known to be a ReLU output: no output ReLU (see forward)
            return self.shortcut.backward(dy)
        dz = kernels.current(dy).relu_backward(dy, mask)  # a new array: the dy we were given is never written
        dx = self.shortcut.backward(dz)
        if not ran_branch:
            # Dropped branch: its backward is never called; its parameters keep zero gradient.
            return dx
        if row_scale is not None:
            df = dz * row_scale  # dropped samples: exactly zero gradient into the branch
        elif multiplier != 1.0:
            df = dz * dz.dtype.type(multiplier)
        else:
            df = dz
        dx_branch = self.branch.backward(df)  # a fresh array (the first conv's dx): add in place
        dx_branch += dx  # paths merge at the input: gradients add
        return dx_branch
