"""magprune: Han et al. (2015) magnitude pruning for PyTorch — prune, retrain, and keep pruned weights at zero."""

from magprune.criteria import GlobalSparsity, LayerSparsity, StdThreshold, han2015
from magprune.masks import OptimizerHandle, Pruner, PruningInvariantError
from magprune.models import create_model, list_models, register_model
from magprune.report import SparsityReport, sparsity_report
from magprune.retrain import DropoutRescaler, freeze, rescaled_dropout, weight_penalty
from magprune.schedules import GradualCubic, Iterative, OneShot, PruningSchedule

__version__ = "0.1.0"

__all__ = [
    "DropoutRescaler",
    "GlobalSparsity",
    "GradualCubic",
    "Iterative",
    "LayerSparsity",
    "OneShot",
    "OptimizerHandle",
    "Pruner",
    "PruningInvariantError",
    "PruningSchedule",
    "SparsityReport",
    "StdThreshold",
    "__version__",
    "create_model",
    "freeze",
    "han2015",
    "list_models",
    "register_model",
    "rescaled_dropout",
    "sparsity_report",
    "weight_penalty",
]
