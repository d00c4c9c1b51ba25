"""Layers: thin classes that hold parameters, gradients and mode, and call the pairs of the active kernel tier.

The protocol every layer follows (manual backprop)::

    y  = layer.forward(x)    # or layer(x); keeps in the layer what backward needs
    dx = layer.backward(dy)  # returns dL/dx, ADDS dL/dparam into layer.grads, frees what it kept

``params``, ``grads`` and ``buffers`` are plain dicts under PyTorch's names ("weight", "bias",
"running_mean", "running_var"), so ``named_parameters()`` and ``state_dict()`` read like PyTorch's.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator

from minisd import backend
from minisd import kernels
from minisd.functional import as_pair, conv_geometry

__all__ = [
    "Module",
    "Sequential",
    "Identity",
    "Conv2d",
    "BatchNorm2d",
    "ReLU",
    "Linear",
    "GlobalAvgPool2d",
    "kaiming_normal",
]


class Module:
    """Base class: a tree of modules with parameters, gradients, buffers and a training flag.

    Subclasses fill ``self.params`` / ``self.buffers`` in ``__init__``, assign child modules as
    attributes (they are registered in assignment order, as in PyTorch), and implement
    ``forward(x)`` and ``backward(dy)``.
    """

    def __init__(self):
        object.__setattr__(self, "_modules", OrderedDict())
        self.training = True
        self.params: dict = {}
        self.grads: dict = {}
        self.buffers: dict = {}
        # True once backward has added a gradient into self.grads since the last zero_grad();
        # the optimizer can leave parameters that got no gradient this step untouched.
        self.grad_received = False
        self._cache = None
        self._out_shape = None

    # ---- tree ---------------------------------------------------------------------------------

    def __setattr__(self, key, value):
        if isinstance(value, Module):
            self._modules[key] = value
        elif key in self.__dict__.get("_modules", {}):
            del self._modules[key]
        object.__setattr__(self, key, value)

    def children(self) -> Iterator["Module"]:
        """Direct sub-modules, in registration order."""
        return iter(self._modules.values())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(dotted name, module) for this module ("" for the root) and every descendant."""
        yield prefix, self
        for child_name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{child_name}" if prefix else child_name)

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def parameter_slots(self) -> Iterator[tuple[str, "Module", str]]:
        """(dotted name, owning module, key) for every parameter: how an optimizer updates in place."""
        for prefix, module in self.named_modules():
            for key in module.params:
                yield (f"{prefix}.{key}" if prefix else key), module, key

    def named_parameters(self) -> Iterator[tuple[str, object]]:
        """(dotted name, array) for every parameter, own parameters first, in definition order."""
        for full, module, key in self.parameter_slots():
            yield full, module.params[key]

    def parameters(self) -> list:
        return [p for _, p in self.named_parameters()]

    def named_grads(self) -> Iterator[tuple[str, object]]:
        """(dotted name, gradient array): same order and names as named_parameters()."""
        for full, module, key in self.parameter_slots():
            yield full, module.grads[key]

    def named_buffers(self) -> Iterator[tuple[str, object]]:
        for prefix, module in self.named_modules():
            for key, value in module.buffers.items():
                yield (f"{prefix}.{key}" if prefix else key), value

    def num_parameters(self) -> int:
        """Total number of trainable scalars."""
        return int(sum(p.size for _, p in self.named_parameters()))

    # ---- mode and gradients -------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Module":
        """Set training mode on the whole tree (batch statistics, stochastic-depth gates)."""
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self) -> "Module":
        """Evaluation mode: running statistics, every residual branch runs (scaled by its rule)."""
        return self.train(False)

    def zero_grad(self) -> None:
        """Set every gradient to zero, in place (backward adds into them)."""
        for module in self.modules():
            for g in module.grads.values():
                g.fill(0)
            module.grad_received = False

    def _accumulate(self, key: str, grad) -> None:
        """Add a parameter gradient (gradients of a parameter used twice must add up)."""
        self.grads[key] += grad
        self.grad_received = True

    # ---- state --------------------------------------------------------------------------------

    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameters then buffers of each module, under dotted names (arrays are not copied)."""
        state = OrderedDict()
        for prefix, module in self.named_modules():
            for key, value in list(module.params.items()) + list(module.buffers.items()):
                state[f"{prefix}.{key}" if prefix else key] = value
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Copy arrays from ``state`` into this module, checking names, shapes and sizes.

        Values may be NumPy or CuPy arrays: they are moved to where this module's arrays live and
        cast to their dtype. Raises ValueError naming every missing, unexpected or misshapen entry;
        with ``strict=False`` (as in PyTorch) missing and unexpected names are ignored, shapes are
        still checked.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected: {', '.join(unexpected)}")
        for key, target in own.items():
            if key in state and tuple(state[key].shape) != tuple(target.shape):
                problems.append(f"{key}: expected shape {tuple(target.shape)}, got {tuple(state[key].shape)}")
        if problems:
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + "; ".join(problems))
        for key, target in own.items():
            if key not in state:
                continue  # strict=False: keep this module's own value, as PyTorch does
            value = backend.to_device(state[key], backend.backend_of(target))
            target[...] = value.astype(target.dtype, copy=False)

    def to(self, backend_name: str | None = None, dtype=None) -> "Module":
        """Move every parameter, gradient and buffer to a backend and/or cast it to a dtype.

        ``model.to("cupy")``, ``model.to("numpy")``, ``model.to(dtype="float64")``. Returns self.
        """
        target_dtype = None if dtype is None else backend.resolve_dtype(dtype)
        for module in self.modules():
            for store in (module.params, module.grads, module.buffers):
                for key, value in store.items():
                    where = backend_name or backend.backend_of(value)
                    store[key] = backend.to_device(value, where, target_dtype)
            module._cache = None
        return self

    @property
    def dtype(self):
        """dtype of the first parameter or buffer (None for a module without any)."""
        for _, value in self.state_dict().items():
            return value.dtype
        return None

    # ---- calling ------------------------------------------------------------------------------

    def __call__(self, x):
        return self.forward(x)

    def forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dy):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def extra_repr(self) -> str:
        return ""

    def describe(self) -> str:
        """One line naming this layer and its settings, e.g. "Conv2d(3, 16, kernel_size=(3, 3), ...)";
        error messages start with it."""
        return f"{type(self).__name__}({self.extra_repr()})"

    def __repr__(self) -> str:
        head = self.describe()
        if not self._modules:
            return head
        lines = [f"{type(self).__name__}("]
        for child_name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({child_name}): {body}")
        lines.append(")")
        return "\n".join(lines)

    # ---- checks shared by layers ----------------------------------------------------------------

    def _check_input(self, x, ndim: int, channels: int | None = None, layout: str = "(N, C, H, W)"):
        """Raise ValueError naming this layer if x has the wrong rank, channel count, dtype or device."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != ndim:
            raise ValueError(
                f"{self.describe()}: expected a {ndim}-D input {layout}, got "
                f"{'shape ' + str(tuple(shape)) if shape is not None else type(x).__name__}"
            )
        if channels is not None and shape[1] != channels:
            raise ValueError(f"{self.describe()}: expected {channels} channels at axis 1, got input of shape {tuple(shape)}")
        reference = next(iter(self.params.values()), None)
        if reference is not None:
            if x.dtype != reference.dtype:
                raise ValueError(
                    f"{self.describe()}: expected input dtype {reference.dtype} (the layer's dtype), got {x.dtype}; "
                    "cast the input or call .to(dtype=...)"
                )
            if backend.backend_of(x) != backend.backend_of(reference):
                raise ValueError(
                    f"{self.describe()}: input is a {backend.backend_of(x)} array but the layer lives on "
                    f"{backend.backend_of(reference)}; move one with backend.to_device or module.to"
                )

    def _keep(self, cache, out):
        """Remember what backward needs, and the output shape to check dy against."""
        self._cache = cache
        self._out_shape = tuple(out.shape)
        return out

    def _take(self, dy):
        """Fetch (and release) the kept cache, checking that backward follows forward and dy's shape."""
        if self._cache is None:
            raise ValueError(f"{self.describe()}: backward called before forward (or twice for one forward)")
        if tuple(getattr(dy, "shape", ())) != self._out_shape:
            raise ValueError(
                f"{self.describe()}: expected a gradient of shape {self._out_shape} (the forward output), "
                f"got {tuple(getattr(dy, 'shape', ()))}"
            )
        cache, self._cache = self._cache, None
        return cache


def kaiming_normal(rng, shape, fan: int, dtype):
    """He initialisation: N(0, 2 / fan). The paper (and fb.resnet.torch) uses fan_out = O*kh*kw."""
    return (rng.standard_normal(shape) * math.sqrt(2.0 / fan)).astype(dtype)


def _new_param(value):
    """Initial values are drawn on the host (the same numbers on every backend), then moved."""
    return backend.to_device(value)


class Sequential(Module):
    """Runs its modules in order in forward, and their backwards in reverse order."""

    def __init__(self, *modules: Module):
        super().__init__()
        for index, module in enumerate(modules):
            setattr(self, str(index), module)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, dy):
        for module in reversed(list(self._modules.values())):
            dy = module.backward(dy)
        return dy


class Identity(Module):
    """y = x; dx = dy (returns the same array: callers must not write into it)."""

    def forward(self, x):
        return x

    def backward(self, dy):
        return dy


class Conv2d(Module):
    """2-D convolution (cross-correlation) on NCHW input, as torch.nn.Conv2d.

    weight: (out_channels, in_channels, kh, kw), Kaiming-normal with fan_out (the paper);
    bias: (out_channels,), uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch.
    Input (N, in_channels, H, W) -> output (N, out_channels, Ho, Wo),
    Ho = floor((H + 2*padding - kh) / stride) + 1.

    ``input_grad`` (default True): whether backward computes dL/dx. A network's first layer reads
    the images, whose gradient training never uses; with False, backward computes only the
    weight gradients and returns None, as PyTorch skips the gradient of an input that does not
    require grad. (The trainer sets it on the stem; gradient checks keep the default.)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 dtype=None, rng=None, input_grad=True):
        super().__init__()
        self.input_grad = bool(input_grad)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = as_pair(kernel_size)
        self.stride = as_pair(stride)
        self.padding = as_pair(padding)
        dtype = backend.resolve_dtype(dtype)
        rng = rng if rng is not None else backend.host_rng()
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.params["weight"] = _new_param(kaiming_normal(rng, shape, self.out_channels * kh * kw, dtype))
        if bias:
            bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
            self.params["bias"] = _new_param(rng.uniform(-bound, bound, self.out_channels).astype(dtype))
        xp = backend.array_module(self.params["weight"])
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}"
                + ("" if self.input_grad else ", input_grad=False"))

    def forward(self, x):
        self._check_input(x, 4, self.in_channels)
        conv_geometry(x.shape, self.kernel_size, self.stride, self.padding, where=repr(self))  # checks the sizes
        y, cache = kernels.current(x).conv2d_forward(x, self.params["weight"], self.params.get("bias"),
                                                    self.stride, self.padding)
        return self._keep(cache, y)

    def backward(self, dy):
        dx, dweight, dbias = kernels.current(dy).conv2d_backward(dy, self._take(dy), input_grad=self.input_grad)
        self._accumulate("weight", dweight)
        if dbias is not None:
            self._accumulate("bias", dbias)
        return dx


class BatchNorm2d(Module):
    """Batch normalisation per channel over (N, H, W), as torch.nn.BatchNorm2d.

    weight (gamma) = 1, bias (beta) = 0; buffers running_mean = 0, running_var = 1, updated in
    training as running = (1 - momentum) * running + momentum * batch_stat (unbiased variance).
    Also accepts (N, C) input (then it behaves as BatchNorm1d).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), float(momentum)
        dtype = backend.resolve_dtype(dtype)
        xp = backend.xp()
        self.params["weight"] = xp.ones(self.num_features, dtype=dtype)
        self.params["bias"] = xp.zeros(self.num_features, dtype=dtype)
        self.buffers["running_mean"] = xp.zeros(self.num_features, dtype=dtype)
        self.buffers["running_var"] = xp.ones(self.num_features, dtype=dtype)
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x):
        if getattr(x, "ndim", None) == 2:
            self._check_input(x, 2, self.num_features, "(N, C)")
        else:
            self._check_input(x, 4, self.num_features)
        if self.training and x.size // x.shape[1] < 2:
            raise ValueError(f"{self.describe()}: training needs more than one value per channel, got input of shape {x.shape}")
        pairs = kernels.current(x)
        y, cache = pairs.batch_norm_forward(
            x, self.params["weight"], self.params["bias"],
            self.buffers["running_mean"], self.buffers["running_var"], self.training, self.eps,
        )
        if self.training:
            pairs.update_running_stats(self.buffers["running_mean"], self.buffers["running_var"], cache, self.momentum)
        return self._keep(cache, y)

    def backward(self, dy):
        dx, dgamma, dbeta = kernels.current(dy).batch_norm_backward(dy, self._take(dy))
        self._accumulate("weight", dgamma)
        self._accumulate("bias", dbeta)
        return dx


class ReLU(Module):
    """y = max(x, 0), element-wise, any shape."""

    def forward(self, x):
        y, mask = kernels.current(x).relu_forward(x)
        return self._keep(mask, y)

    def backward(self, dy):
        return kernels.current(dy).relu_backward(dy, self._take(dy))


class Linear(Module):
    """y = x @ weight^T + bias, as torch.nn.Linear.

    weight: (out_features, in_features), bias: (out_features,), both uniform(-1/sqrt(in), 1/sqrt(in))
    (PyTorch's default). Input (N, in_features) -> output (N, out_features).
    """

    def __init__(self, in_features, out_features, bias=True, dtype=None, rng=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        dtype = backend.resolve_dtype(dtype)
        rng = rng if rng is not None else backend.host_rng()
        bound = 1.0 / math.sqrt(self.in_features)
        shape = (self.out_features, self.in_features)
        self.params["weight"] = _new_param(rng.uniform(-bound, bound, shape).astype(dtype))
        if bias:
            self.params["bias"] = _new_param(rng.uniform(-bound, bound, self.out_features).astype(dtype))
        xp = backend.array_module(self.params["weight"])
        self.grads = {k: xp.zeros_like(v) for k, v in self.params.items()}

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={'bias' in self.params}"

    def forward(self, x):
        self._check_input(x, 2, self.in_features, "(N, in_features)")
        y, cache = kernels.current(x).linear_forward(x, self.params["weight"], self.params.get("bias"))
        return self._keep(cache, y)

    def backward(self, dy):
        dx, dweight, dbias = kernels.current(dy).linear_backward(dy, self._take(dy))
        self._accumulate("weight", dweight)
        if dbias is not None:
            self._accumulate("bias", dbias)
        return dx


class GlobalAvgPool2d(Module):
    """Mean over H and W: (N, C, H, W) -> (N, C)."""

    def forward(self, x):
        self._check_input(x, 4)
        y, cache = kernels.current(x).global_avg_pool_forward(x)
        return self._keep(cache, y)

    def backward(self, dy):
        return kernels.current(dy).global_avg_pool_backward(dy, self._take(dy))
