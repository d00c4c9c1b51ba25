"""What decides a run: :class:`Settings`, checked as a whole before anything is loaded or written,
and the model they describe (:func:`build_model`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from minisd import backend, data, kernels, models, optim
from minisd.residual import MODES, SCALES, SCHEDULES

__all__ = ["Settings", "SettingsError", "build_model"]

SHORTCUTS = ("zero_pad", "projection")
MAX_EPOCHS = 1_000_000        # far beyond any run (the paper: 500); keeps the lr schedule's arithmetic finite
MAX_SEED = 2**63 - 1          # what every generator minisd seeds takes


class SettingsError(ValueError):
    """An invalid combination of training settings."""


@dataclass
class Settings:
    """Everything that decides a run. ``None`` means: the dataset's (or the backend's) default.

    The defaults train a stochastic-depth ResNet-20 on the digits in about a minute on two cores
    (>= 97% test accuracy) with the paper's optimizer: lr 0.1, momentum 0.9, Nesterov, weight decay
    1e-4, lr divided by 10 at 50% and 75% of the epochs.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    depth: int = 20
    schedule: str = "linear"        # survival probabilities: linear decay, uniform, none (constant depth)
    final_survival: float = 0.5     # p_L
    mode: str = "batch"
    scale: str = "eval"
    shortcut: str = "zero_pad"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    warmup_epochs: int = 0          # the first N epochs at lr / 10 (He et al. 2016's warm-up for very deep nets)
    skip_unused: bool = False       # leave parameters of dropped branches untouched (see optim.SGD)
    translate: int | None = None    # augmentation: max shift in pixels (digits 1, cifar10 4)
    flip: bool | None = None        # augmentation: horizontal flips (digits no, cifar10 yes)
    val_size: int | None = None     # digits 180, cifar10 5000 (the paper's 45k/5k split)
    train_subset: int | None = None  # train on the first N training images only (quick tries, tests)
    eval_batch_size: int = 500
    backend: str | None = None      # None: the current backend (MINISD_BACKEND or numpy)
    kernels: str | None = None      # None: the tier in force (MINISD_KERNELS or fast); "reference" is slow
    seed: int = 0

    def validate(self) -> "Settings":
        """Return self if every setting is valid; else SettingsError naming the first that is not."""
        self._check_types()
        self._check_choices()
        self._check_numbers()
        if self.final_survival == 0.0 and self.scale == "train" and self.schedule != "none":
            raise SettingsError("p_L = 0 with --scale train divides by zero; use --scale eval or p_L > 0")
        if self.nesterov and self.momentum == 0:
            raise SettingsError("Nesterov momentum needs momentum > 0")
        return self

    def _check_types(self) -> None:
        """Each setting has its declared type (settings.json or a checkpoint may be edited by hand)."""
        accepted = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
        words = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
                 "None": "null"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in str(f.type).split("|")]
            if value is None and "None" in kinds:
                continue
            allowed = tuple(t for k in kinds for t in accepted.get(k, ()))
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                expected = " or ".join(words.get(k, k) for k in kinds)
                raise SettingsError(f"setting {f.name!r} must be {expected}, got {value!r}")

    def _check_choices(self) -> None:
        """Settings that name one of a fixed set (None, where allowed, means the default)."""
        choices = [
            ("dataset", self.dataset, data.DATASETS),
            ("schedule", self.schedule, SCHEDULES),
            ("mode", self.mode, MODES),
            ("scale rule", self.scale, SCALES),
            ("learning-rate schedule", self.lr_schedule, optim.LR_SCHEDULES),
            ("backend", self.backend, (None,) + tuple(backend.BACKENDS)),
            ("kernel tier", self.kernels, (None,) + tuple(kernels.TIERS)),
            ("shortcut", self.shortcut, SHORTCUTS),
        ]
        for what, value, allowed in choices:
            if value not in allowed:
                names = ", ".join(a for a in allowed if a is not None)
                raise SettingsError(f"unknown {what} {value!r}; expected one of {names}")
        try:
            models.blocks_per_stage(self.depth)
        except ValueError:
            raise SettingsError(f"depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got {self.depth}") from None

    def _check_numbers(self) -> None:
        """Each number in its range, with the message that says which range."""
        checks = [
            (0.0 <= self.final_survival <= 1.0,
             f"final survival probability p_L must be in [0, 1], got {self.final_survival}"),
            (1 <= self.epochs <= MAX_EPOCHS, f"epochs must be a whole number in [1, {MAX_EPOCHS}], got "
                                             f"{_short(self.epochs)}"),
            (self.batch_size >= 2, f"batch size must be >= 2 (batch norm needs two samples), got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a positive number, got {self.lr}"),
            (0 <= self.warmup_epochs < self.epochs,
             f"warm-up epochs must be a whole number from 0 to epochs - 1 ({self.epochs - 1}), got {_short(self.warmup_epochs)}"),
            (self.translate is None or self.translate >= 0, f"translate must be >= 0 pixels, got {self.translate}"),
            (0 <= self.seed <= MAX_SEED, f"seed must be a whole number in [0, 2**63 - 1], got {_short(self.seed)}"),
            (self.train_subset is None or self.train_subset >= 2,
             f"train subset must hold at least 2 images, got {self.train_subset}"),
            (self.val_size is None or self.val_size >= 0, f"validation size must be >= 0 images, got {self.val_size}"),
            (self.eval_batch_size >= 1, f"evaluation batch size must be >= 1, got {self.eval_batch_size}"),
            (self.momentum >= 0 and math.isfinite(self.momentum), f"momentum must be a number >= 0, got {self.momentum}"),
            (self.weight_decay >= 0 and math.isfinite(self.weight_decay),
             f"weight decay must be a number >= 0, got {self.weight_decay}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    def to_dict(self) -> dict:
        """The settings as a JSON-able dict (what settings.json and a checkpoint's metadata hold)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def _short(number) -> str:
    """A number for a message: a 400-digit one is shown by its size, not its digits."""
    text = str(number)
    return text if len(text) <= 20 else f"a number with {len(text)} digits"


def settings_from_values(values, error, missing: str, invalid: str) -> Settings:
    """Validated Settings from a JSON object read from a file that may have been edited by hand;
    ``error`` (an exception class) with the message ``missing`` when ``values`` is not an object,
    or ``invalid`` followed by what is wrong ("...: setting 'depth' must be ...")."""
    if not isinstance(values, dict):
        raise error(missing)
    try:
        return Settings.from_dict(values).validate()
    except (SettingsError, TypeError) as exc:
        raise error(f"{invalid}{exc}") from None


def check_translate(translate, dataset) -> None:
    """A shift of a whole image or more leaves nothing of it (and pads a huge array)."""
    if translate is not None and translate >= dataset.image_size:
        raise SettingsError(f"--translate must be less than the image size: {dataset.name} images are "
                            f"{dataset.image_size}x{dataset.image_size} pixels, got {translate}")


def build_model(settings: Settings, num_classes: int = 10, in_channels: int | None = None):
    """The ResNet that ``settings`` describe, freshly initialised from ``settings.seed``."""
    if in_channels is None:
        in_channels = 1 if settings.dataset == "digits" else 3
    return models.resnet_cifar(depth=settings.depth, num_classes=num_classes, in_channels=in_channels,
                               schedule=settings.schedule, final_survival=settings.final_survival,
                               mode=settings.mode, scale=settings.scale, shortcut=settings.shortcut,
                               seed=settings.seed)
