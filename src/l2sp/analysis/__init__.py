"""Why L2-SP works (the paper's Section 5), for anyone's model: library functions, tables and plots.

- :func:`source_task_drop` (Table 5; :func:`segmentation_source_drop` for a segmentation backbone),
  :func:`layerwise_r2` (Figure 4), :func:`fisher_by_layer` (Figure 5),
  :func:`parameter_distance` / :func:`layer_distance`, :mod:`theory` (Section 5.5);
- :mod:`plots` writes the figures, :mod:`tables` the Markdown/CSV tables; ``l2sp analyze`` wraps them.
"""

from l2sp.analysis import plots, tables, theory
from l2sp.analysis.distance import layer_distance, parameter_distance
from l2sp.analysis.fisher_layers import fisher_by_layer, fisher_summary
from l2sp.analysis.layers import check_layers, default_layers, get_module, set_module
from l2sp.analysis.r2 import StreamingR2, layerwise_r2, r2_summary
from l2sp.analysis.source_drop import accuracy, reattach_head, segmentation_source_drop, source_task_drop

__all__ = [
    "StreamingR2",
    "accuracy",
    "check_layers",
    "default_layers",
    "fisher_by_layer",
    "fisher_summary",
    "get_module",
    "layer_distance",
    "layerwise_r2",
    "parameter_distance",
    "plots",
    "r2_summary",
    "reattach_head",
    "segmentation_source_drop",
    "set_module",
    "source_task_drop",
    "tables",
    "theory",
]
