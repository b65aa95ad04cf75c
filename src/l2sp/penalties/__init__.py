"""The penalties: a registry of kinds (one :class:`Penalty` subclass each) and the :class:`Regularizer`.

    l2sp.penalties.penalty_names()        # ('l2', 'l2-sp', 'l2-sp-fisher', 'l1-sp', 'gl-sp', 'gl-sp-fisher', ...)
    l2sp.penalties.get_penalty("l2-sp")   # the class: .label, .needs_w0, .needs_fisher, .grouped, .smoothed, ...
    l2sp.register_penalty("my-kind")      # a class decorator: a new kind from the user's own code

See ``docs/extending.md`` for writing a kind.
"""

from __future__ import annotations

from l2sp.optim import MODES, Mode
from l2sp.penalties import builtin
from l2sp.penalties.base import Block, Penalty, check_coefficient, get_penalty, penalty_names, register_penalty
from l2sp.penalties.regularizer import Fisher, Regularizer, regularizer

KINDS: tuple[str, ...] = penalty_names()  # the six built-ins (registered by now), for compatibility

__all__ = ["KINDS", "MODES", "Block", "Fisher", "Mode", "Penalty", "Regularizer", "builtin", "check_coefficient",
           "get_penalty", "penalty_names", "register_penalty", "regularizer"]
