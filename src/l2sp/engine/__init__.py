"""The fine-tuning engine: typed configs, one runner for every task (loop, checkpoints, resume, NaN guard,
logging, evaluation schedule, run directory) with hooks, evaluation, runs."""

from l2sp.engine.config import Config, preset_names, resolve
from l2sp.engine.evaluate import evaluate
from l2sp.engine.run import RunArtifacts, finetune, load_run
from l2sp.engine.runner import Runner, Task
from l2sp.engine.schedule import Schedule
from l2sp.engine.trainer import Hook, Trainer

__all__ = [
    "Config",
    "Hook",
    "RunArtifacts",
    "Runner",
    "Schedule",
    "Task",
    "Trainer",
    "evaluate",
    "finetune",
    "load_run",
    "preset_names",
    "resolve",
]
