"""The test-time rule on a whole network, against the ensemble it stands for.

A network trained with stochastic depth is, step by step, a random sub-network: block l runs with
probability p_l. At test time the paper runs every block, its branch multiplied by p_l
(``scale="eval"``); inverted scaling divides kept branches by p_l in training and runs them as they
are at test time (``scale="train"``). Either way the one deterministic network stands in for the
average over all sub-networks, which is what this module measures:

* :func:`deterministic_probs`   softmax of the network in evaluation mode, with its own rule or the
                                other one (``rule="other"``: the eval rule forgotten, or the train
                                rule's network scaled by p_l once more)
* :func:`monte_carlo_probs`     the average softmax over sampled sub-networks (gates drawn as in
                                training, batch norm on its running statistics)
* :func:`compare_test_time_rules`  test accuracy of the three and the distance between their outputs

Sampling never touches the model's own gate generator, and the model's mode and forced gates are
as they were afterwards.
"""
from __future__ import annotations

import contextlib

import numpy

from minisd import backend

__all__ = ["softmax", "deterministic_probs", "monte_carlo_probs", "compare_test_time_rules"]

OTHER_SCALE = {"eval": "train", "train": "eval"}


def softmax(logits) -> numpy.ndarray:
    """(N, K) logits on any backend -> (N, K) float64 probabilities on the host."""
    z = numpy.asarray(backend.to_numpy(logits), dtype=numpy.float64)
    z = numpy.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@contextlib.contextmanager
def _kept_state(model):
    """Restore the model's training flag, its blocks' scale rules and forced gates on exit."""
    was_training = model.training
    saved = [(block, block.scale, block.forced_gate) for block in model.blocks]
    try:
        yield
    finally:
        model.train(was_training)
        for block, scale, forced in saved:
            block.scale = scale
            block.force_gate(forced)


def deterministic_probs(model, x, rule: str = "own") -> numpy.ndarray:
    """Softmax of ``model`` on ``x`` in evaluation mode: every block runs.

    rule: "own" (the network's test-time rule) or "other" (the other rule's test-time network:
    for ``scale="eval"`` the branches unscaled, the rule forgotten; for ``scale="train"`` the
    branches multiplied by p_l, the paper's rule applied on top of inverted scaling).
    """
    if rule not in ("own", "other"):
        raise ValueError(f"deterministic_probs: rule must be 'own' or 'other', got {rule!r}")
    with _kept_state(model):
        model.eval()
        if rule == "other":
            for block in model.blocks:
                block.scale = OTHER_SCALE[block.scale]
        return softmax(model(x))


def monte_carlo_probs(model, x, samples: int, seed: int = 0) -> numpy.ndarray:
    """The average of the softmax outputs of ``samples`` sub-networks on ``x``.

    Each sub-network keeps block l with probability p_l, one draw per block for the whole batch
    (as a training step does in batch mode), with the training-time multiplier of its rule (1 for
    ``scale="eval"``, 1/p_l for ``scale="train"``); batch norm uses its running statistics, as at
    test time. Gates come from a generator seeded with ``seed``, not from the model's.
    """
    if samples < 1:
        raise ValueError(f"monte_carlo_probs: samples must be >= 1, got {samples}")
    rng = numpy.random.default_rng(seed)
    probs = numpy.asarray([block.survival_prob for block in model.blocks])
    total = None
    with _kept_state(model):
        model.eval()
        for block in model.blocks:
            block.training = True  # the block draws (here: is given) a gate; its layers stay in eval mode
        for _ in range(samples):
            for block, keep in zip(model.blocks, rng.random(len(probs)) < probs):
                block.force_gate(bool(keep))
            p = softmax(model(x))
            total = p if total is None else total + p
    return total / samples


def compare_test_time_rules(model, split, samples: int = 64, seed: int = 0, batch_size: int = 500) -> dict:
    """Test accuracy of the network with its own rule, with the other rule, and of the Monte Carlo
    ensemble of ``samples`` sub-networks, on ``split`` (a :class:`minisd.data.Split`), with the
    distance of each deterministic network's output from the ensemble's.

    Returns {"own", "other", "ensemble"} -> accuracy; {"own_distance", "other_distance"}: the mean
    over images of the total-variation distance 0.5 * sum_k |p_k - q_k| between the softmax outputs
    (0: the same distribution, 1: disjoint); and {"own_agreement", "other_agreement"}: the share of
    images whose predicted label is the ensemble's.
    """
    from minisd import data  # noqa: PLC0415  (data is only needed here)

    own, other, ensemble, labels = [], [], [], []
    for xb, yb in data.batches(split, batch_size):
        own.append(deterministic_probs(model, xb, "own"))
        other.append(deterministic_probs(model, xb, "other"))
        ensemble.append(monte_carlo_probs(model, xb, samples, seed))
        labels.append(numpy.asarray(backend.to_numpy(yb)))
    own, other, ensemble = (numpy.concatenate(a) for a in (own, other, ensemble))
    labels = numpy.concatenate(labels)

    def accuracy(p):
        return float((p.argmax(axis=1) == labels).mean())

    def distance(p):
        return float(0.5 * numpy.abs(p - ensemble).sum(axis=1).mean())

    def agreement(p):
        return float((p.argmax(axis=1) == ensemble.argmax(axis=1)).mean())

    return {"own": accuracy(own), "other": accuracy(other), "ensemble": accuracy(ensemble),
            "own_distance": distance(own), "other_distance": distance(other),
            "own_agreement": agreement(own), "other_agreement": agreement(other),
            "samples": samples, "images": int(labels.size)}
