"""Figures for teaching stochastic depth, built on ``matplotlib.figure.Figure`` (never pyplot).

Every figure function returns the Figure and, given ``save="path.png"``, also writes a PNG at 150 dpi.

* :mod:`~minisd.plots.figure`          the one figure factory, colours, saving
* :mod:`~minisd.plots.lecture`         survival schedules, gate activity, gradient flow, training
                                       curves, convolution filters, feature maps
* :mod:`~minisd.plots.trace_drawings`  one traced event, the network map, the stepper's frame
* :mod:`~minisd.plots.paper`           the paper's figures from runs over seeds (Figure 8, test error,
                                       step time, the test-time rule, the p_L sweep)
* :mod:`~minisd.plots.runs`            reading a run folder's metrics.jsonl
"""
from minisd.plots.figure import (CONSTANT_COLOR, DROPPED_COLOR, KEPT_COLOR, RUN_COLORS, figure_png,
                                 lecture_figure, new_figure, save_figure)
from minisd.plots.lecture import (conv_filters, default_feature_layers, feature_maps, fit_line, gate_activity,
                                  gradient_flow, gradient_flow_data, stem_gradient_vs_active_blocks,
                                  survival_schedules, training_curves)
from minisd.plots.paper import (block_gradient_map, branch_gradient_norms, first_conv_gradient, fit_step_time,
                                gradient_magnitude, monte_carlo_convergence, paired_seeds, step_time_vs_active_blocks,
                                survival_sweep, test_error_curves, training_time)
from minisd.plots.runs import block_matrix, column, read_metrics, seed_matrix
from minisd.plots.trace_drawings import (NetworkRaster, network, network_data, stepper_frame, trace_color_limits,
                                         trace_event)

__all__ = [
    "survival_schedules", "gate_activity", "gradient_flow", "gradient_flow_data", "fit_line",
    "stem_gradient_vs_active_blocks", "training_curves",
    "conv_filters", "feature_maps", "default_feature_layers",
    "trace_event", "trace_color_limits", "network", "network_data", "stepper_frame", "NetworkRaster",
    "gradient_magnitude", "first_conv_gradient", "block_gradient_map", "test_error_curves", "fit_step_time", "step_time_vs_active_blocks",
    "monte_carlo_convergence", "branch_gradient_norms", "survival_sweep", "training_time", "paired_seeds",
    "read_metrics", "column", "seed_matrix", "block_matrix",
    "lecture_figure", "new_figure", "save_figure", "figure_png",
    "KEPT_COLOR", "DROPPED_COLOR", "CONSTANT_COLOR", "RUN_COLORS",
]
