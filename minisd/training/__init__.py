"""Training: one step (:func:`train_step`), and everything a run needs around it."""
from minisd.training.step import train_step

__all__ = ["train_step"]
