"""Training: one step, the loop around it, and the run folder it keeps.

    from minisd.training import Settings, fit, train_step
    result = fit(Settings(dataset="digits", depth=20, epochs=30))
    result.test_acc                      # test accuracy of the best-validation checkpoint

    loss, logits = train_step(model, x, labels)   # forward, loss, backward: the step everything calls

Where each idea lives:

* :mod:`~minisd.training.step`        ``train_step``: forward, loss, backward
* :mod:`~minisd.training.loop`        ``fit`` and ``resume``: epochs, progress, Ctrl-C, NaN stops
* :mod:`~minisd.training.settings`    ``Settings`` (checked as a whole) and the model they describe
* :mod:`~minisd.training.checkpoints` ``.npz`` checkpoints: save, load, evaluate
* :mod:`~minisd.training.metrics`     ``evaluate`` and ``GradientMagnitudes`` (the paper's Figure 8)
* :mod:`~minisd.training.run_folder`  whose folder it is, the lock, partial files, reuse of a folder
* :mod:`~minisd.training.interrupts`  the Ctrl-C (and SIGTERM) flag
* :mod:`~minisd.training.files`       atomic writes, reading regular files only

A run folder holds::

    settings.json      the settings, with dataset defaults resolved (backend, augmentation), and
                       "format": "minisd-run", the mark of a folder minisd made (rewritten on resume)
    metrics.jsonl      one JSON line per epoch: lr, train loss/acc, val loss/acc, test loss/acc, active
                       fraction, time, gradient magnitudes (first_conv_grad, block_grad)
    last.npz           checkpoint after the last finished epoch (or where Ctrl-C stopped the run)
    best.npz           checkpoint of the epoch with the best validation accuracy
    curves.png         training curves
    summary.json       test accuracy of the best checkpoint, written at the end
    .lock              held (flock) by the run that uses the folder; the kernel releases it when
                       that process ends, however it ends, so a crashed run never blocks the folder

Checkpoints are ``.npz`` files written to a temporary file and renamed (a crash while saving
leaves the previous checkpoint intact; the next run in the folder removes the partial file). They
hold plain, finite floating-point arrays only (their headers are checked before any is read;
never pickled objects): ``model.<name>`` (parameters and buffers), ``optim.<name>`` (momentum
buffers) and ``meta``, one JSON string with the settings,
the position (epoch and step), the history, the optimizer's hyperparameters and the generator
states (the model's gate generator and the backend's host generator; the shuffle and augmentation
generators are derived from (seed, epoch), see :func:`minisd.data.epoch_generators`, so the
position is their state). A checkpoint is never written with a NaN or infinite value: weights that
stop being finite end the run, and the last finite checkpoint stays as it was.

Resuming restores all of that, so a run interrupted at any step and resumed ends with the same
weights as an uninterrupted run with the same seed (bit for bit on NumPy).

A folder that holds no checkpoint (a run that died in its first epoch) holds nothing to lose: a
new run may use it, and resuming it starts the run again from its settings.json. A folder that is
not minisd's (see :mod:`~minisd.training.run_folder`) is refused before anything in it is removed or
rewritten, and every file is written by a rename (never through a link). Ctrl-C and SIGTERM stop a
run the same way: a checkpoint at the next safe point, then the command that resumes it.

Two kinds of numbers in each epoch record serve the paper's curves rather than the run itself:

* ``test_loss`` / ``test_acc``: the model after this epoch on the test split, as the paper plots
  test error per epoch. They are only reported: the checkpoint is chosen by ``val_acc`` alone.
* ``first_conv_grad``: the mean absolute gradient of the stem convolution's weight, averaged over
  the epoch's steps (the paper's Figure 8); ``block_grad``: the same for each residual block's
  branch parameters, averaged over the steps where that block ran (null for a block that never
  ran in the epoch). See :class:`~minisd.training.metrics.GradientMagnitudes`.
"""
from minisd.training.checkpoints import (CheckpointError, NonFiniteCheckpointError, evaluate_checkpoint,
                                         load_checkpoint, model_from_checkpoint, save_checkpoint)
from minisd.training.interrupts import TrainingInterrupted
from minisd.training.loop import NonFiniteLossError, RunResult, fit, resume
from minisd.training.metrics import GradientMagnitudes, evaluate
from minisd.training.run_folder import RunFolderError, read_settings_json
from minisd.training.settings import Settings, SettingsError
from minisd.training.step import train_step

__all__ = [
    "train_step",
    "Settings",
    "RunResult",
    "GradientMagnitudes",
    "fit",
    "resume",
    "read_settings_json",
    "evaluate",
    "evaluate_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "CheckpointError",
    "NonFiniteLossError",
    "NonFiniteCheckpointError",
    "TrainingInterrupted",
    "RunFolderError",
    "SettingsError",
]
