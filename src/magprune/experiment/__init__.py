"""Experiment wing: the reproducible run around the library — config, data, training, the run's stages, DDP.

Rooms: :mod:`.config` (YAML, checked at the door), :mod:`.data` (digits, MNIST, Fashion-MNIST), :mod:`.train`
(the one training loop), :mod:`.stages` (a run as a list of stages, each resumable; where a new stage goes),
:mod:`.pipeline` (the driver that runs them), :mod:`.rundir` (the run directory's files, lock and resume
checkpoint), :mod:`.distributed` (torchrun/DDP), :mod:`.runs` (sensitivity and trade-off of a run or a config),
:mod:`.demo` (the embedded default job). May import every wing below it; global state (threads, umask) is set
here or in the CLI, never in the library.
"""

from magprune.experiment.config import ConfigError, ExperimentConfig, load_config
from magprune.experiment.pipeline import RunError, load_run, run_experiment

__all__ = ["ConfigError", "ExperimentConfig", "RunError", "load_config", "load_run", "run_experiment"]
