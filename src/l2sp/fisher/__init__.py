"""Diagonal Fisher information of a classifier on its source task (the paper's estimator, exact and fast).

    F_j = (1/m) Σ_i Σ_k f_k(x_i) (∂ log f_k(x_i) / ∂w_j)²          (method="exact")

``mc`` replaces the inner expectation by ``samples`` labels drawn from the model's own prediction (unbiased);
``empirical`` uses the true label only (offered for comparison: it is *not* the Fisher). The square is taken
per example, never on a batch-averaged gradient.

Modules, one job each:
- :mod:`~l2sp.fisher.columns`: label columns (which classes, with which weights, per example) and the
  cotangents on the logits whose backward gives the weighted per-class gradients;
- :mod:`~l2sp.fisher.hooks` and :mod:`~l2sp.fisher.func`: the per-example gradient engines (layer formulas
  behind tensor hooks, or ``torch.func``);
- :mod:`~l2sp.fisher.estimator`: :func:`estimate`, the loop over the data;
- :mod:`~l2sp.fisher.files`: :class:`FisherDict`, :func:`save`, :func:`load`, :func:`check_matches`;
- :mod:`~l2sp.fisher.stats`: :func:`summary`.
"""

from l2sp.fisher.columns import METHODS, class_weights
from l2sp.fisher.estimator import BACKENDS as BACKENDS
from l2sp.fisher.estimator import estimate
from l2sp.fisher.files import FORMAT as FORMAT
from l2sp.fisher.files import FisherDict, check_matches, load, save
from l2sp.fisher.stats import summary

__all__ = ["METHODS", "FisherDict", "check_matches", "class_weights", "estimate", "load", "save", "summary"]
