"""Experiments built on the engine: repeated seeds with mean ± std tables, hyper-parameter search."""

from l2sp.experiments.search import grid_search
from l2sp.experiments.seeds import run_seeds, summarize

__all__ = ["grid_search", "run_seeds", "summarize"]
