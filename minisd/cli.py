"""The `minisd` command line (train, evaluate, gradcheck, bench).

    minisd train                          stochastic-depth ResNet-20 on the digits, about a minute
    minisd train cifar10 --data-dir DIR --depth 110 --epochs 500 --backend cupy
    minisd train --resume runs/NAME       continue a stopped run exactly where it stopped
    minisd evaluate runs/NAME/best.npz    accuracy of a checkpoint on the test split
    minisd gradcheck                      finite-difference check of a small network with dropped blocks
    minisd bench [TABLE ...]              timings: steps, blocks, layers, phases, memory, gpu (minisd/bench/)

Errors the user can fix (missing data, a corrupted file, a bad option or environment variable,
no GPU, a run folder in use) print one line to stderr and exit with status 1 (2 for a bad command
line), without a traceback. Ctrl-C at any moment, even while NumPy is still being imported,
prints one line and exits with 130; SIGTERM during training saves like Ctrl-C and exits with 143.

This module imports only the standard library at the top: NumPy and minisd's array code are
imported inside :func:`main`, where a Ctrl-C is caught.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import sys
import warnings

from minisd import __version__  # minisd/__init__ imports nothing heavy: NumPy comes inside main
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
DATASETS = ("digits", "cifar10")


def _usage_error(parser, message):
    parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message} (see {parser.prog} --help)\n")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (not the usage block plus the error)."""

    def error(self, message):
        _usage_error(self, message)


def _number(convert, low, high, expected):
    """An argparse type: ``convert(text)`` within [low, high], else a one-line error naming ``expected``."""

    def parse(text):
        try:
            if len(text) > 40:  # 400 digits: refused by size before Python converts them
                raise ValueError
            value = convert(text)
        except ValueError:
            shown = text if len(text) <= 20 else text[:20] + "..."
            raise argparse.ArgumentTypeError(f"expected {expected}, got {shown!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, float("inf"), "a whole number >= 1")
_batch_size = _number(int, 2, float("inf"), "a whole number >= 2 (batch norm needs two samples)")
_count = _number(int, 0, float("inf"), "a whole number >= 0")
_probability = _number(float, 0.0, 1.0, "a number in [0, 1]")


def _epochs(text):
    from minisd.training.settings import MAX_EPOCHS  # noqa: PLC0415  (NumPy: imported inside main)

    return _number(int, 1, MAX_EPOCHS, f"a whole number from 1 to {MAX_EPOCHS:,}")(text)


def _seed(text):
    from minisd.training.settings import MAX_SEED  # noqa: PLC0415

    return _number(int, 0, MAX_SEED, "a whole number from 0 to 2**63 - 1")(text)


def _path(expected):
    """An argparse type: a non-empty path (an unset shell variable gives '')."""

    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return text

    return parse


def _depth(text):
    from minisd import models  # noqa: PLC0415

    value = _positive_int(text)
    try:
        models.blocks_per_stage(value)  # the one place that knows the 6n + 2 rule
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("resnet_cifar: ")) from None
    return value


# Options of `train` whose value may differ on --resume (everything else comes from the checkpoint).
_RESUME_OVERRIDABLE = ("backend", "kernels", "data_dir")


def _add_kernels(p):
    from minisd import kernels  # noqa: PLC0415

    p.add_argument("--kernels", choices=tuple(kernels.TIERS),
                   help="kernel tier: fast (default, or $MINISD_KERNELS) or reference, the textbook code "
                        "of minisd/functional.py (same results, several times slower)")


def _add_train(sub):
    from minisd.training import Settings  # noqa: PLC0415

    d = Settings()
    p = sub.add_parser("train", help="train a stochastic-depth ResNet", allow_abbrev=False,
                       description="Train a stochastic-depth ResNet (Huang et al. 2016) and report the test "
                                   "accuracy of the checkpoint with the best validation accuracy.")
    # No `choices` here: checked after parsing, so that `--depht 20` is reported as an unknown
    # option, not as the invalid dataset "20".
    p.add_argument("dataset", nargs="?", default=None, metavar="{digits,cifar10}",
                   help="digits (packaged with minisd, default) or cifar10 (needs --data-dir)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-bin/ or cifar-10-batches-py/ (nothing is downloaded)")
    p.add_argument("--depth", type=_depth, help=f"ResNet depth 6n+2 (default {d.depth}; the paper: 110)")
    p.add_argument("--schedule", choices=("linear", "uniform", "none"),
                   help=f"survival probabilities: linear decay to p_L (the paper), uniform p_L, or none "
                        f"(constant depth) (default {d.schedule})")
    p.add_argument("--final-survival", "--p-l", dest="final_survival", type=_probability, metavar="P_L",
                   help=f"survival probability p_L of the last block (default {d.final_survival})")
    p.add_argument("--mode", choices=("batch", "row"), help="one gate per block per step (batch, the paper) "
                   "or per sample (row)")
    p.add_argument("--scale", choices=("eval", "train"), help="scale branches by p_l at test time (eval, the paper) "
                   "or divide kept branches by p_l in training (train)")
    p.add_argument("--epochs", type=_epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=_batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, help=f"initial learning rate (default {d.lr}); what happens to it next is "
                   "--lr-schedule's")
    p.add_argument("--lr-schedule", choices=("step", "cosine", "constant"),
                   help=f"step: divide the learning rate by 10 at 50%% and 75%% of the epochs (the paper); cosine: "
                        f"anneal it to 0; constant: keep it (default {d.lr_schedule})")
    p.add_argument("--warmup-epochs", type=_count, metavar="N",
                   help="train the first N epochs at a tenth of the learning rate, then follow --lr-schedule "
                        "(He et al.'s warm-up for very deep networks; default 0)")
    p.add_argument("--skip-unused", action="store_true", default=None,
                   help="leave the parameters of dropped branches untouched (no weight decay or momentum "
                        "step for them)")
    p.add_argument("--translate", type=_count, help="augmentation: random shift up to this many pixels, less than "
                   "the image size (default: 1 for digits, 4 for cifar10)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="augmentation: random horizontal flips (default: off for digits, on for cifar10)")
    p.add_argument("--train-subset", type=_positive_int, metavar="N", help="train on the first N training images only")
    p.add_argument("--val-size", type=_count, metavar="N", help="hold out N training images for validation "
                   "(default: 180 for digits, 5000 for cifar10, the paper's 45k/5k split)")
    p.add_argument("--backend", choices=("numpy", "cupy"), help="array backend (default: numpy, or $MINISD_BACKEND)")
    _add_kernels(p)
    p.add_argument("--seed", type=_seed, help=f"default {d.seed}")
    p.add_argument("--out", type=_path("a folder name"),
                   help="run folder: new, empty, or one minisd made (default: "
                        "runs/<dataset>-resnet<depth>-<schedule>-seed<seed>)")
    p.add_argument("--resume", metavar="RUN", type=_path("a run folder or a checkpoint file"),
                   help="continue the run in this folder (or from this checkpoint file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minisd", description="Stochastic-depth ResNets with hand-written backprop.",
                     allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate,gradcheck,bench}")
    _add_train(sub)
    p = sub.add_parser("evaluate", help="accuracy of a checkpoint", description="Evaluate a checkpoint on a split "
                       "of the dataset it was trained on (every branch runs, scaled by its rule).", allow_abbrev=False)
    p.add_argument("checkpoint", type=_path("a checkpoint file or a run folder"),
                   help="a .npz checkpoint, or a run folder (its best.npz)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test")
    p.add_argument("--data-dir", help="where the CIFAR-10 files are now, if they moved")
    p.add_argument("--backend", choices=("numpy", "cupy"))
    _add_kernels(p)
    p = sub.add_parser("gradcheck", help="finite-difference check of a small ResNet with dropped blocks",
                       description="Directional gradient check (float64) of a small ResNet with a fixed mix "
                                   "of kept and dropped blocks.", allow_abbrev=False)
    p.add_argument("--depth", type=_depth, default=14)
    p.add_argument("--seed", type=_seed, default=0)
    _add_kernels(p)
    sub.add_parser("bench", help="timings (arguments go to minisd.bench)", add_help=False)
    parser.commands = dict(sub.choices)  # for the unknown-option message
    return parser


def _parse(parser, argv):
    """parse_args, but an unknown option is reported as such (with the closest known one) before
    anything else, and the dataset is checked after the options."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser.commands.get(args.command, parser)
        first = next((u for u in unknown if u.startswith("-")), None)
        if first is None:
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        known = [o[2:] for action in command._actions for o in action.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(first.split("=", 1)[0].lstrip("-"), known, n=1)
        command.error(f"unrecognized option {first!r}" + (f"; did you mean --{close[0]}?" if close else ""))
    if args.command == "train" and args.dataset is not None and args.dataset not in DATASETS:
        parser.commands["train"].error(f"argument dataset: invalid choice: {args.dataset!r} (choose from "
                                       f"{', '.join(DATASETS)})")
    return args


def _error(message) -> int:
    print(f"minisd: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _cmd_train(args, parser) -> int:
    from minisd import training  # noqa: PLC0415

    names = [f.name for f in dataclasses.fields(training.Settings)]
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    progress = False if args.quiet else None
    if args.resume is not None:
        extra = sorted(set(given) - set(_RESUME_OVERRIDABLE)) + (["out"] if args.out else [])
        if extra:
            options = ", ".join("--" + k.replace("_", "-") for k in extra)
            return _error(f"--resume continues with the checkpoint's settings; drop {options} "
                          "(only --backend, --kernels and --data-dir may change)")
        result = training.resume(args.resume, progress=progress, backend_name=given.get("backend"),
                              data_dir=given.get("data_dir"), kernels_name=given.get("kernels"))
    else:
        settings = training.Settings(**given)
        result = training.fit(settings, run_dir=args.out, progress=progress)
    return 0 if result is not None else EXIT_ERROR


def _cmd_evaluate(args) -> int:
    import os  # noqa: PLC0415

    from minisd import training  # noqa: PLC0415

    path = args.checkpoint
    if os.path.isdir(path):
        path = os.path.join(path, "best.npz")
    out = training.evaluate_checkpoint(path, args.split, data_dir=args.data_dir, backend_name=args.backend)
    if not math.isfinite(out["loss"]):
        return _error(f"{path} gives a non-finite loss on the {out['split']} split (accuracy {100 * out['acc']:.2f}%): "
                      "its weights are finite but overflow in the forward pass (the run diverged)")
    print(f"{out['dataset']} {out['split']}: accuracy {100 * out['acc']:.2f}%, loss {out['loss']:.4f} "
          f"({out['images']} images; ResNet-{out['depth']}, schedule {out['schedule']}, {path})")
    return 0


def _cmd_gradcheck(args) -> int:
    import numpy  # noqa: PLC0415

    from minisd import backend, gradcheck, kernels, models  # noqa: PLC0415

    model = models.resnet_cifar(depth=args.depth, num_classes=10, in_channels=3, seed=args.seed, dtype="float64")
    gates = [(i % 3) != 1 for i in range(len(model.blocks))]  # keep, drop, keep, keep, drop, ...
    model.force_gates(gates)
    x = backend.to_device(numpy.random.default_rng(args.seed).standard_normal((4, 3, 8, 8)))
    print(f"ResNet-{args.depth}, float64, {kernels.active()} kernels, {len(model.blocks)} blocks, gates: "
          + "".join("K" if g else "d" for g in gates) + " (K kept, d dropped)")
    result = gradcheck.directional_check(model, x)
    print(result.report())
    return 0 if result.passed else EXIT_ERROR


def _check_bench_arguments(bench, argv) -> None:
    """Parse ``minisd bench``'s arguments with its own parser, but with one-line errors, and check
    the values it takes on trust (before any model is built or timed)."""
    parser = bench.build_parser()
    parser.error = lambda message: _usage_error(parser, message)
    args = parser.parse_args(argv)

    def check(option, convert, values):
        for value in values:
            try:
                convert(str(value))
            except argparse.ArgumentTypeError as exc:
                parser.error(f"argument {option}: {exc}")

    check("--depths", _depth, args.depths)
    check("--steps", _positive_int, [args.steps])
    check("--batch-size", _positive_int, [args.batch_size])
    check("--threads", _positive_int, [args.threads])
    check("--final-survival", _probability, [args.final_survival])


def _cmd_bench(argv) -> int:
    from minisd import backend, bench  # noqa: PLC0415

    _check_bench_arguments(bench, argv)
    problem = _environment_problem(None)
    if problem:
        return _error(problem)
    try:
        return int(bench.main(argv) or 0)
    except backend.BackendUnavailable as exc:  # the gpu table on a machine without CuPy or a GPU
        return _error(exc)


def _environment_problem(backend_option, kernels_option=None) -> str | None:
    """One line about a bad MINISD_NUM_THREADS, MINISD_BACKEND or MINISD_KERNELS (None if all are fine).

    A --backend option replaces MINISD_BACKEND, even one that names no backend; --kernels likewise.
    """
    from minisd import backend, kernels  # noqa: PLC0415
    from minisd.kernels import parallel  # noqa: PLC0415

    threads = os.environ.get("MINISD_NUM_THREADS", "").strip()
    if threads:
        try:
            parallel.threads_from_environment(threads)
        except ValueError as exc:
            return str(exc)
    try:
        if backend_option:
            backend.use(backend_option)
        else:
            backend.name()  # raises what MINISD_BACKEND asked for and could not get
    except (ValueError, backend.BackendUnavailable) as exc:
        return str(exc)
    try:
        kernels.use(kernels_option) if kernels_option else kernels.active()
    except ValueError as exc:  # a MINISD_KERNELS that names no tier
        return str(exc)
    return None


def main(argv=None) -> int:
    """The `minisd` command (the console entry point): the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C at any moment outside training, NumPy's import included
        print("minisd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to minisd.bench
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    from minisd import backend, data, training  # noqa: PLC0415

    # NumPy's overflow warnings would bury the one line: training and evaluation check for
    # non-finite losses and weights themselves and say where it happened.
    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
    try:
        problem = _environment_problem(getattr(args, "backend", None), getattr(args, "kernels", None))
        if problem:
            return _error(problem)
        if args.command == "train":
            return _cmd_train(args, parser)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "gradcheck":
            return _cmd_gradcheck(args)
    except training.TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum  # 130 for Ctrl-C, 143 for SIGTERM: what a shell reports for the signal
    except (data.DataError, training.CheckpointError, training.SettingsError, training.RunFolderError,
            training.NonFiniteLossError, backend.BackendUnavailable) as exc:
        return _error(exc)
    except OSError as exc:
        return _error(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else exc)
    except MemoryError:
        return _error("out of memory; try a smaller --batch-size (or a smaller model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
