"""Library behind the notebooks: the runs table, score breakdowns and plots, sweeps, data set-up.

``evaluate.ipynb`` and ``setup_data.ipynb`` only call functions from here. Typical use::

    from micronet import report
    rows = report.collect_runs()                      # every run under results/
    print(report.runs_table(rows, fmt="text"))
    fig = report.plot_ppl_vs_score(rows, convention="paper")
    report.save_figure(fig, "ppl_vs_score.png")

Every plot is drawn from a ``*_data`` function (points, groups, labels, limits) that tests assert on.
Modules: :mod:`.runs` (collecting runs, tables), :mod:`.plots`, :mod:`.sweep` (sparsity x bits),
:mod:`.layout` (figure helpers), :mod:`.data_setup` (data set-up, split statistics, the table formatter).
"""

from micronet.report.data_setup import (DATASET_MODELS, DEFAULT_CUTOFFS, checksum_rows, data_config,
                                        format_split_statistics, format_table, model_cutoffs, print_checksums,
                                        print_split_statistics, read_sha256sums, setup_data, split_statistics)
from micronet.report.layout import label_boxes, save_figure
from micronet.report.plots import (PPL_TARGET, README_RUNS, REFERENCE_CURVES, REFERENCE_ROOTS, REFERENCE_RUNS,
                                   REFERENCE_POINTS, REFERENCE_SWEEP_PARENT, component_data, curve_data, load_score,
                                   plot_components, plot_ppl_vs_score, plot_training_curves, ppl_score_data,
                                   readme_figures)
from micronet.report.runs import (CONVENTIONS, MISSING, collect_runs, pick_run, read_training_curve, run_names,
                                  runs_notes, runs_table)
from micronet.report.sweep import descendants, plot_sweep, sweep_points

__all__ = [
    "CONVENTIONS", "DATASET_MODELS", "DEFAULT_CUTOFFS", "MISSING", "PPL_TARGET", "README_RUNS", "REFERENCE_CURVES", "REFERENCE_ROOTS", "REFERENCE_RUNS",
    "REFERENCE_POINTS", "REFERENCE_SWEEP_PARENT", "descendants",
    "checksum_rows", "collect_runs", "component_data", "curve_data", "data_config", "format_split_statistics",
    "format_table", "label_boxes", "load_score", "model_cutoffs", "pick_run", "plot_components", "plot_ppl_vs_score",
    "plot_sweep", "plot_training_curves", "ppl_score_data", "print_checksums", "print_split_statistics",
    "read_sha256sums", "read_training_curve", "readme_figures", "run_names", "runs_notes", "runs_table",
    "save_figure", "setup_data", "split_statistics", "sweep_points",
]
