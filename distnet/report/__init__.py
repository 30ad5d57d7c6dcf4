"""`distnet report`: read a sweep's runs (or any runs) from MLflow, draw the figures the project
exists for, write them with a Markdown report, and log both as artifacts of the sweep's parent run.

Figures (matplotlib, log y where the quantity spans decades; seeds are averaged, the band is the
min..max over seeds):
- speed_<activation>_<init>.png: Nielsen's speed of learning (hidden-layer bias-gradient norm on
  the probe set) vs epoch, one panel per depth, one line per hidden layer;
- init_profile.png: that norm at init (epoch 0) vs hidden-layer index, one panel per
  activation x init, one line per depth;
- accuracy.png: final test (or validation) accuracy, depth x init heatmap, one panel per activation;
- saturation_<activation>_<init>.png: fraction of saturated units per hidden layer vs epoch, one
  panel per depth, one line per hidden layer;
- activation_<activation>_<init>.png: each hidden layer's activation mean vs epoch, the band its
  units' standard deviation (Glorot and Bengio's figure 2);
- grad_norm_<activation>_<init>.png: every layer's weight-gradient norm at every step, from the
  runs' step tables (steptable), one panel per depth, one line per layer.

The per-group figures (and init_profile's panels) are drawn for at most GROUP_FIGURES (activation,
init) groups, spread over the grid (report.md names them; `--all-figures` draws every group); the
heatmaps and the tables cover every cell. A sweep's runs are read from its listing and its cell
records (cellrecords), run by run only where records are missing.

Four layers, a module each, each using only those before it: `runs` (reading: which runs, and each
as a Run), `extract` (the numbers behind every figure and table, testable on their own), `draw`
(the figures) and `write` (report.md, the files, the artifacts). This package's names are theirs.
"""

from distnet.report.draw import accuracy_figure, figure_counts, layer_figure, trainability_figure, within_layer
from distnet.report.extract import (Band, TrainabilityMap, accuracy_grid, band, cell_table, init_grad_profile,
                                    init_profile, init_table, layer_curves, per_layer_factor, step_curves,
                                    trainability_maps)
from distnet.report.runs import ReportError, Run, find_runs, read_runs
from distnet.report.write import drawn_groups, report, write_report

__all__ = ["Band", "ReportError", "Run", "TrainabilityMap", "accuracy_figure", "accuracy_grid", "band",
           "cell_table", "drawn_groups", "figure_counts", "find_runs", "init_grad_profile", "init_profile",
           "init_table", "layer_curves", "layer_figure", "per_layer_factor", "read_runs", "report",
           "step_curves", "trainability_figure", "trainability_maps", "within_layer", "write_report"]
