"""Exercise 7: the test-time rule, for one block and for a whole network (scaled against a Monte
Carlo ensemble of sampled networks)."""
from __future__ import annotations

import numpy

from minisd import backend, models, residual
from minisd.exercises._grading import compare, graded_call
from minisd.exercises._report import Report, StudentError, as_array, call_student, host

RELU_MISPLACED = ("the ReLU is in the wrong place: the block adds the two paths first and applies the ReLU to "
                  "the sum (a post-activation block); a ReLU on one path alone changes the output")


def check_test_time_rule(block_output_at_test_time) -> Report:
    """Check ``block_output_at_test_time(branch_out, shortcut_out, p) -> y``: the paper's test-time
    rule for a block, y = ReLU(p * branch_out + shortcut_out)."""
    report = Report("block_output_at_test_time")
    call = "block_output_at_test_time(branch_out, shortcut_out, p)"
    rng = numpy.random.default_rng(41)
    methods = [(residual.BasicBlock, "forward", "BasicBlock.forward")]
    try:
        for p in (0.5, 0.8, 1.0):
            branch = rng.standard_normal((2, 3, 4, 4))
            shortcut = rng.standard_normal((2, 3, 4, 4))
            given = (branch.copy(), shortcut.copy())
            first = graded_call(block_output_at_test_time, "block_output_at_test_time", call, (given[0], given[1], p),
                                {}, methods)
            mine = as_array(first, "y", branch.shape)
            if not (numpy.array_equal(given[0], branch) and numpy.array_equal(given[1], shortcut)):
                report.add(False, "block_output_at_test_time changed its inputs",
                           ["compute y in a new array; the branch and shortcut outputs may be used elsewhere"])
            again = as_array(call_student(block_output_at_test_time, "block_output_at_test_time", call,
                                          branch.copy(), shortcut.copy(), p), "y", branch.shape)
            correct = numpy.maximum(p * branch + shortcut, 0.0)
            if not numpy.array_equal(again, mine):
                report.add(False, f"p = {p}: two calls with the same inputs gave different outputs",
                           ["no gate is drawn at test time: every branch runs, scaled by p (the expectation of "
                            "the training-time gate)"], key=("random",))
                continue
            relu = lambda a: numpy.maximum(a, 0.0)  # noqa: E731
            hints = [(relu(branch + shortcut) if p != 1.0 else None,
                      "the branch is not scaled: at test time it is weighted by its expected gate"),
                     (p * branch + shortcut, "the ReLU after the sum is missing"),
                     (relu(p * branch) + shortcut, RELU_MISPLACED),
                     (p * relu(branch) + shortcut, RELU_MISPLACED),
                     (relu(p * branch) + relu(shortcut), RELU_MISPLACED),
                     (p * branch + relu(shortcut), RELU_MISPLACED),
                     (p * relu(branch + shortcut) if p != 1.0 else None, RELU_MISPLACED),
                     (relu(branch / p + shortcut) if p != 1.0 else None,
                      "dividing by p is the inverted rule's training-time scaling; the paper's test-time rule "
                      "weights the branch by its expected gate"),
                     (relu((1 - p) * branch + shortcut) if p != 0.5 else None,
                      "p is the survival probability: 1 - p is the probability of being dropped")]
            compare(report, "y", mine, correct, hints, label=f"p = {p}")
    except StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# A whole network
# ----------------------------------------------------------------------------------------------


def small_network(seed=0, final_survival=0.5):
    """A ResNet-14 (6 blocks, float64) with non-trivial batch-norm statistics, in eval mode."""
    model = models.resnet_cifar(depth=14, num_classes=10, in_channels=1, final_survival=final_survival,
                                seed=seed, dtype="float64")
    rng = numpy.random.default_rng(seed)
    model.train()
    for _ in range(3):  # a few training forwards give the running statistics their values
        model.forward(backend.to_device(rng.standard_normal((16, 1, 8, 8)), dtype="float64"))
    return model.eval()


def _reference_with_gates(model, x, gates):
    """The network in evaluation with every branch multiplied by its gate (1 or 0) instead of p_l."""
    saved = [block.survival_prob for block in model.blocks]
    try:
        for block, gate in zip(model.blocks, gates):
            block.survival_prob = 1.0 if gate else 0.0
        return host(model.forward(x))
    finally:
        for block, p in zip(model.blocks, saved):
            block.survival_prob = p


def check_network_test_time(network_at_test_time) -> Report:
    """Check ``network_at_test_time(model, x, gates=None) -> logits`` for a ResNetCifar in evaluation
    mode: with ``gates=None`` every block follows the test-time rule (branch weighted by p_l); with a
    list of L bools, block l's branch is kept (weight 1) or dropped, as one sampled network of the
    ensemble. The stem, the head and block.branch / block.shortcut are the building blocks;
    BasicBlock.forward and ResNetCifar.forward are unavailable while it runs."""
    report = Report("network_at_test_time")
    call = "network_at_test_time(model, x, gates)"
    methods = [(residual.BasicBlock, "forward", "BasicBlock.forward"),
               (models.ResNetCifar, "forward", "ResNetCifar.forward")]
    functions = {}
    try:  # the test-time rules of a whole network, where this version of minisd has them
        from minisd import ensemble  # noqa: PLC0415

        functions = {f"ensemble.{name}": [getattr(ensemble, name)] for name in ("deterministic_probs", "monte_carlo_probs")
                     if hasattr(ensemble, name)}
    except ImportError:
        pass
    rng = numpy.random.default_rng(43)
    try:
        model = small_network()
        x = backend.to_device(rng.standard_normal((6, 1, 8, 8)), dtype="float64")
        correct = host(model.forward(x))
        scaled = as_array(graded_call(network_at_test_time, "network_at_test_time", call, (model, x.copy(), None),
                                      functions, methods), "logits", correct.shape)
        report.note(f"ResNet-14 ({len(model.blocks)} blocks, p_L = 0.5), 6 images:")
        hints = [(_reference_with_gates(model, x, [True] * len(model.blocks)),
                  "no branch is weighted: at test time block l's branch is multiplied by its p_l"),
                 ]
        compare(report, "logits", scaled, correct, hints, label="test-time rule (gates=None)")
        count = len(model.blocks)
        for what, gates in [("blocks 2, 3 and 6 dropped", [l not in (2, 3, 6) for l in range(1, count + 1)]),
                            ("every block dropped", [False] * count)]:
            expected = _reference_with_gates(model, x, gates)
            mine = as_array(graded_call(network_at_test_time, "network_at_test_time", call, (model, x.copy(), gates),
                                        functions, methods), "logits", correct.shape)
            compare(report, "logits", mine, expected, [
                (_reference_with_gates(model, x, [True] * count), "the gates are ignored: a dropped block returns its "
                                                              "shortcut only")], label=what)
        if not model.training and all(not b.training for b in model.blocks):
            report.add(True, "the model stays in evaluation mode (running statistics, no gate drawn)")
        else:
            report.add(False, "the model was switched to training mode",
                       ["at test time batch norm uses its running statistics: leave model.eval() as it is"])
    except StudentError as problem:
        report.stop(str(problem))
    return report
