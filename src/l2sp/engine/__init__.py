"""The fine-tuning engine: typed configs, the iteration-based trainer, evaluation, checkpoints, runs."""

from l2sp.engine.config import Config, preset_names, resolve
from l2sp.engine.evaluate import evaluate
from l2sp.engine.run import RunArtifacts, finetune, load_run
from l2sp.engine.schedule import Schedule

__all__ = [
    "Config",
    "RunArtifacts",
    "Schedule",
    "evaluate",
    "finetune",
    "load_run",
    "preset_names",
    "resolve",
]
