"""Checkers for the exercises in ``notebooks/exercises/``: write the piece yourself, be told what is wrong.

::

    from minisd import exercises
    exercises.check_im2col(im2col, col2im)                    # 1. unfolding, with the adjoint test
    exercises.check_conv_backward(conv_backward)              # 2. convolution backward via im2col
    exercises.check_batch_norm_backward(batch_norm_backward)  # 3. batch norm backward (training)
    exercises.check_numerical_gradient(numerical_gradient)    # 4. a finite-difference gradient checker
    exercises.check_gradient_checker(backward_is_correct)     #    graded on right and wrong backwards
    exercises.check_draw_gate(draw_gate)                      # 5. the stochastic-depth block: gate,
    exercises.check_block_forward(block_forward)              #    forward (both scale rules, row mode)
    exercises.check_block_backward(block_backward)            #    and backward
    exercises.check_schedule(linear_decay)                    # 6. survival schedule, expected depth,
    exercises.check_expected_depth(expected_depth)            #    and the time model fitted to
    exercises.check_time_model(fit_time_model, predicted_saving)  # measured steps
    exercises.check_test_time_rule(block_output_at_test_time)     # 7. the test-time rule, one block
    exercises.check_network_test_time(network_at_test_time)       #    and a whole network
    exercises.check_sgd_step(sgd_step)                        # 8. SGD, Nesterov, weight decay, skip_unused
    exercises.check_gradient_logs(block_grad_means, answer)   # 9. reading block_grad from real runs

Each checker calls the student's function on a few small float64 problems and compares every
result with minisd's own (the reference) and, for gradients, with central finite differences (the
truth, computed from the forward alone). It returns a :class:`Report`: a notebook shows it as plain
text, ``bool`` of it says whether everything passed. It says which result is wrong, in which
entries, by how much, and names the mistake where it is a common one (it recognises a mistake by
computing what that mistake would give): a hint names the mistake, never the formula.

While the student's function runs, minisd's own implementation of what is asked is unavailable
(both kernel tiers, and the layer or block method that would do the work): a stand-in that raises
takes its place, so an answer that hands the work to minisd fails with one sentence. The building
blocks the exercise is about stay available (im2col and col2im for the convolution backward, the
branch's own backward for the block). An exception, sys.exit or a value of the wrong type becomes
one line, never a traceback.

One module per exercise; the report and the shared grading are in ``_report`` and ``_grading``.
"""
from __future__ import annotations

from minisd.exercises._report import Report
from minisd.exercises.batch_norm import check_batch_norm_backward
from minisd.exercises.block import block_forward, check_block_backward, check_block_forward, check_draw_gate
from minisd.exercises.convolution import check_conv_backward, check_im2col
from minisd.exercises.gradient_checker import check_gradient_checker, check_numerical_gradient
from minisd.exercises.gradient_logs import check_gradient_logs, gradient_log_runs
from minisd.exercises.optimizer import check_sgd_step
from minisd.exercises.schedule import check_expected_depth, check_schedule, check_time_model, time_steps
from minisd.exercises.rule_at_test_time import check_network_test_time, check_test_time_rule, small_network

__all__ = [
    "Report",
    "check_im2col",
    "check_conv_backward",
    "check_batch_norm_backward",
    "check_numerical_gradient",
    "check_gradient_checker",
    "check_draw_gate",
    "block_forward",
    "check_block_forward",
    "check_block_backward",
    "check_schedule",
    "check_expected_depth",
    "time_steps",
    "check_time_model",
    "check_test_time_rule",
    "small_network",
    "check_network_test_time",
    "check_sgd_step",
    "gradient_log_runs",
    "check_gradient_logs",
]
